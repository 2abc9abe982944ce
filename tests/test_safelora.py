"""SafeLoRA: the low-rank C·B and cosine against a dense reference of the official formula, properties,
selection direction, and the projected adapter round trip through PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safeprune
from pairs import dense_C, module_pair, perturb_model
from safeprune.adapter import load_adapter
from safeprune.errors import InputError
from safeprune.scoring.methods.safelora import cosine_from_grams
from safeprune.scoring.scanner import scan
from safeprune.weights.pair import apply_alignment, dense_alignment_matrix


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory, llama_dir):
    return perturb_model(llama_dir, tmp_path_factory.mktemp("pair") / "unaligned", scale=0.02, rank=3)


def _dense_cos(C: torch.Tensor, dW: torch.Tensor) -> float:
    """The official formula: cosine_similarity(vec(C·ΔW), vec(ΔW)) (unrounded)."""
    x, y = (C @ dW).reshape(-1), dW.reshape(-1)
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("out,inp,k,block", [(7, 5, 2, 1), (16, 24, 4, 8), (40, 12, 8, 1 << 20), (33, 65, 3, 100)])
def test_apply_alignment_matches_dense(out, inp, k, block):
    g = torch.Generator().manual_seed(out * 100 + inp)
    wa = torch.randn(out, inp, generator=g)
    wu = wa + 0.1 * torch.randn(out, inp, generator=g)
    Z = torch.randn(out, k, generator=g, dtype=torch.float64)
    CZ, vfro = apply_alignment(wa, wu, Z, block_elems=block)
    C = dense_alignment_matrix(wa, wu)
    ref = C @ Z
    assert torch.linalg.norm(CZ - ref) / torch.linalg.norm(ref) < 1e-10
    assert vfro == pytest.approx(float(torch.linalg.norm(wa.double() - wu.double())), rel=1e-12)


def test_apply_alignment_zero_difference():
    w = torch.randn(6, 4)
    CZ, vfro = apply_alignment(w, w.clone(), torch.randn(6, 2, dtype=torch.float64))
    assert vfro == 0.0 and torch.count_nonzero(CZ) == 0


def test_apply_alignment_nonfinite():
    from safeprune.errors import NonFiniteError

    wa = torch.randn(6, 4)
    wa[2, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        apply_alignment(wa, torch.randn(6, 4), torch.randn(6, 2, dtype=torch.float64))


def test_scores_match_dense_reference(llama_dir, llama_adapter, unaligned_dir):
    table = scan(llama_adapter, None, "safelora", aligned=llama_dir, unaligned=unaligned_dir)
    ad = load_adapter(llama_adapter)
    assert len(table) == len(ad)
    for m in ad:
        wa, wu = module_pair(llama_dir, unaligned_dir, m.name)
        C = dense_C(wa, wu)
        dW = m.delta_weight()
        row = table.row(m.name)
        assert row["cos"] == pytest.approx(_dense_cos(C, dW), rel=1e-6, abs=1e-9)
        assert row["proj_ratio"] == pytest.approx(float(torch.linalg.norm(C @ dW) / torch.linalg.norm(dW)), rel=1e-6)
        assert row["v_fro"] == pytest.approx(float(torch.linalg.norm(wa - wu)), rel=1e-6)
        assert 0.0 <= row["cos"] <= 1.0


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(2, 24),
    inp=st.integers(2, 24),
    r=st.integers(1, 6),
    c=st.floats(1e-3, 1e3),
    seed=st.integers(0, 10_000),
)
def test_cosine_properties(out, inp, r, c, seed):
    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(out, inp, generator=g, dtype=torch.float64)
    wu = torch.randn(out, inp, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    CB, _ = apply_alignment(wa, wu, B)
    cos, ratio = cosine_from_grams(B, CB, A)
    # C is PSD: cos in [0, 1]; dense reference agrees
    assert -1e-12 <= cos <= 1.0
    ref = _dense_cos(dense_alignment_matrix(wa, wu), B @ A)
    assert cos == pytest.approx(ref, rel=1e-6, abs=1e-9)
    # invariant to scaling C (V -> c·V scales C by c) and to scaling the update
    CB2, _ = apply_alignment(c * wa, c * wu, B)
    assert cosine_from_grams(B, CB2, A)[0] == pytest.approx(cos, rel=1e-6, abs=1e-9)
    assert cosine_from_grams(c * B, c * CB, A)[0] == pytest.approx(cos, rel=1e-6, abs=1e-9)
    assert cosine_from_grams(B, CB2, A)[1] == pytest.approx(c * ratio, rel=1e-6)


def test_selection_lowest_cosine_first(llama_dir, llama_adapter, unaligned_dir):
    table = scan(llama_adapter, None, "safelora", aligned=llama_dir, unaligned=unaligned_dir)
    sel = safeprune.select(table, "safelora", top=3)
    cos = sorted(r["cos"] for r in table.rows)
    assert [table.row(n)["cos"] for n in sel.selected] == cos[:3]
    tau = cos[4]
    sel = safeprune.select(table, "safelora", threshold=tau)
    assert set(sel.selected) == {r["module"] for r in table.rows if r["cos"] <= tau}


def test_identical_pair_is_an_error(tmp_path, llama_dir, llama_adapter):
    same = perturb_model(llama_dir, tmp_path / "copy", scale=0.0)
    with pytest.raises(InputError, match="identical"):
        scan(llama_adapter, None, "safelora", aligned=llama_dir, unaligned=same)


def test_module_with_zero_difference_is_never_selected(tmp_path, llama_dir, llama_adapter):
    un = perturb_model(llama_dir, tmp_path / "un", scale=0.02, skip=("layers.0.self_attn.q_proj",))
    table = scan(llama_adapter, None, "safelora", aligned=llama_dir, unaligned=un)
    row = table.row("model.layers.0.self_attn.q_proj")
    assert row["v_fro"] == 0.0 and math.isnan(row["cos"])
    sel = safeprune.select(table, "safelora", top=len(table) - 1)
    assert "model.layers.0.self_attn.q_proj" not in sel.selected


def test_project_round_trip_peft(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    from peft import PeftModel

    from helpers import load_model, tree_checksums

    before = tree_checksums(llama_adapter)
    edited = safeprune.project(llama_adapter, llama_dir, unaligned_dir, top=4)
    out = edited.save(tmp_path / "proj")
    assert tree_checksums(llama_adapter) == before
    man = json.loads((out / "safeprune.json").read_text())
    assert man["action"] == "project" and man["edit"]["modules"] == edited.selection.selected
    assert sum(m["action"] == "project" for m in man["modules"]) == 4
    ad = load_adapter(llama_adapter)
    pm = PeftModel.from_pretrained(load_model(llama_dir), str(out))
    mods = dict(pm.named_modules())
    for m in ad:
        layer = mods["base_model.model." + m.name]
        delta = layer.get_delta_weight("default").double()
        if m.name in edited.selection.selected:
            wa, wu = module_pair(llama_dir, unaligned_dir, m.name)
            ref = dense_C(wa, wu) @ m.delta_weight()
        else:
            ref = m.delta_weight()
        assert torch.linalg.norm(delta - ref) <= 1e-5 * torch.linalg.norm(ref)


def test_project_preserves_dtype_and_projects_bias(tmp_path, llama_dir, unaligned_dir):
    from helpers import make_adapter

    ad_dir = make_adapter(
        llama_dir, tmp_path / "ad", "llama", r=4, alpha=8, targets=["q_proj", "v_proj"], lora_bias=True
    )
    ad = load_adapter(ad_dir)
    edited = safeprune.project(ad, llama_dir, unaligned_dir, top=2)
    for name in edited.selection.selected:
        m, e = ad.modules[name], edited.modules[name]
        wa, wu = module_pair(llama_dir, unaligned_dir, name)
        C = dense_C(wa, wu)
        assert e.lora_B.dtype == m.lora_B.dtype
        assert torch.allclose(e.lora_B.double(), C @ m.lora_B.double(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(e.lora_B_bias.double(), C @ m.lora_B_bias.double(), rtol=1e-5, atol=1e-7)
        assert torch.equal(e.lora_A, m.lora_A)
