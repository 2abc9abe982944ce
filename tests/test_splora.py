"""SPLoRA / E-DIEM: sound mode against dense references, the official mode against a dense re-statement of
the public code's arithmetic, the quantile helper against torch.quantile, and the selection rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import safeprune
from pairs import dense_C, module_pair, perturb_model
from safeprune.adapter import load_adapter
from safeprune.scoring.methods.splora import FrameCache, quantile_linear
from safeprune.scoring.scanner import scan


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory, llama_dir):
    return perturb_model(llama_dir, tmp_path_factory.mktemp("pair") / "unaligned", scale=0.02, rank=3)


@pytest.fixture(scope="module")
def sound_table(llama_dir, llama_adapter, unaligned_dir):
    return scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, null_samples=16, seed=3)


# -- quantiles ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 50, 1000, 4097, 123457])
@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 0.1, 0.9])
def test_quantile_bit_identical_to_torch(n, q):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g)
    assert torch.equal(quantile_linear(t, q), torch.quantile(t, q))
    t2 = torch.randn(3, max(1, n // 3) + 1, generator=g)
    assert torch.equal(quantile_linear(t2, q), torch.quantile(t2.reshape(-1), q))


def test_quantile_above_torch_limit():
    n = (1 << 24) + 5  # torch.quantile refuses this size
    t = torch.empty(n).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.quantile(t, 0.25)
    for q in (0.25, 0.75):
        ref = np.quantile(t.numpy().astype(np.float64), q)
        assert float(quantile_linear(t, q)) == pytest.approx(ref, abs=1e-6)


# -- sound mode -----------------------------------------------------------------------------------------


def test_frames_are_orthonormal_and_seeded():
    F = FrameCache(seed=1).get(20, 3, 5)
    eye = torch.eye(3, dtype=torch.float64)
    for k in range(5):
        assert torch.allclose(F[k].T @ F[k], eye, atol=1e-12)
    assert torch.equal(F, FrameCache(seed=1).get(20, 3, 5))
    assert not torch.equal(F, FrameCache(seed=2).get(20, 3, 5))


def test_sound_matches_dense_reference(sound_table, llama_dir, llama_adapter, unaligned_dir):
    ad = load_adapter(llama_adapter)
    frames = FrameCache(seed=3)
    for m in ad:
        wa, wu = module_pair(llama_dir, unaligned_dir, m.name)
        C = dense_C(wa, wu)
        dW = m.delta_weight()
        d = float(torch.linalg.norm(C @ dW - dW))
        row = sound_table.row(m.name)
        assert row["ediem_dist"] == pytest.approx(d, rel=1e-6)
        assert row["ediem_dist_rel"] == pytest.approx(d / float(torch.linalg.norm(dW)), rel=1e-6)
        # dense null: ΔW̃_k = s·(F_k R_B)·A, a rotation of ΔW's output space (same spectrum)
        _, RB = torch.linalg.qr(m.lora_B.double(), mode="reduced")
        F = frames.get(m.out_features, m.r, 16)
        null = []
        for k in range(16):
            dWk = m.scaling * (F[k] @ RB) @ m.lora_A.double()
            assert torch.allclose(torch.linalg.svdvals(dWk), torch.linalg.svdvals(dW), rtol=1e-8, atol=1e-10)
            null.append(float(torch.linalg.norm(C @ dWk - dWk)))
        null_t = torch.tensor(null, dtype=torch.float64)
        med = float(torch.quantile(null_t, 0.5))
        iqr = float(torch.quantile(null_t, 0.75) - torch.quantile(null_t, 0.25))
        assert row["ediem_null_median"] == pytest.approx(med, rel=1e-6)
        assert row["ediem_null_iqr"] == pytest.approx(iqr, rel=1e-5, abs=1e-12)
        assert row["ediem"] == pytest.approx((d - med) / iqr, rel=1e-5, abs=1e-6)


def test_sound_is_seeded(sound_table, llama_dir, llama_adapter, unaligned_dir):
    again = scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, null_samples=16, seed=3)
    assert again.column("ediem") == sound_table.column("ediem")
    other = scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, null_samples=16, seed=4)
    assert other.column("ediem") != sound_table.column("ediem")


def test_sound_prunes_highest_first(sound_table):
    sel = safeprune.select(sound_table, "splora", top=4)
    vals = sorted((r["ediem"] for r in sound_table.rows), reverse=True)
    assert [sound_table.row(n)["ediem"] for n in sel.selected] == vals[:4]


# -- official mode --------------------------------------------------------------------------------------


def _official_ediem(X: torch.Tensor, Y: torch.Tensor) -> float | None:
    """Dense re-statement of the public code's E-DIEM (IQR variant) on given float32 X = C·B·A, Y = B·A:
    50 identical reference pairs, torch.quantile, eps = 1e-6."""
    eps = 1e-6
    if torch.equal(X, Y):
        return None
    d = torch.norm(X - Y, p="fro") + eps
    distances = torch.tensor([torch.norm(X - Y, p="fro") for _ in range(50)])
    expected = torch.mean(distances)
    scale = torch.quantile(distances, 0.75) - torch.quantile(distances, 0.25) + eps
    v_M = torch.quantile(X, 0.75) - torch.quantile(X, 0.25)
    v_m = torch.quantile(X, 0.25) - torch.quantile(Y, 0.25)
    u = (d - expected) / scale
    if v_M - v_m == 0:
        return None
    return float(((u - v_m) / (v_M - v_m)) * (v_M - v_m))


def test_official_matches_dense_restatement(llama_dir, llama_adapter, unaligned_dir):
    table = scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, mode="official")
    ad = load_adapter(llama_adapter)
    for m in ad:
        wa, wu = module_pair(llama_dir, unaligned_dir, m.name)
        C = dense_C(wa, wu)
        # the exact float32 operands the scorer uses: C·B (low-rank route) rounded to float32
        CB32 = (C @ m.lora_B.double()).float()
        X, Y = CB32 @ m.lora_A.float(), m.lora_B.float() @ m.lora_A.float()
        row = table.row(m.name)
        ref = _official_ediem(X, Y)
        assert row["ediem"] == pytest.approx(ref, rel=1e-5, abs=2e-5)
        # the degenerate reference set: the "core" is float32 rounding of d over 1e-6, not a distance
        assert row["ediem_dist"] == pytest.approx(float(torch.linalg.norm(X - Y)), rel=1e-5)
        # the dense float32 C@B of the original gives the same operands to float32 accuracy
        X_dense = (C.float() @ m.lora_B.float()) @ m.lora_A.float()
        assert torch.allclose(X_dense, X, rtol=1e-4, atol=1e-6)


def test_official_selection_rules(llama_dir, llama_adapter, unaligned_dir):
    head = scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, mode="official")
    first = scan(llama_adapter, None, "splora", aligned=llama_dir, unaligned=unaligned_dir, mode="official-first")
    assert head.column("ediem") == first.column("ediem")
    L, K = len(head), 4
    vals = sorted(r["ediem"] for r in head.rows)
    s_first = safeprune.select(first, "splora", top=K)
    assert [first.row(n)["ediem"] for n in s_first.selected] == vals[:K]  # the K lowest
    s_head = safeprune.select(head, "splora", top=K)
    assert len(s_head.selected) == L - K + 1  # HEAD: all but the K-1 highest
    kept = {r["module"] for r in head.rows} - set(s_head.selected)
    assert sorted(head.row(n)["ediem"] for n in kept) == vals[L - K + 1 :]
    assert "official SPLoRA rule" in s_head.rule.describe()
    thr = vals[5]
    s_thr = safeprune.select(head, "splora", threshold=thr)
    assert set(s_thr.selected) == {r["module"] for r in head.rows if r["ediem"] <= thr}


def test_prune_splora_zero_and_peft_load(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    from peft import PeftModel

    from helpers import load_model

    edited = safeprune.prune(
        llama_adapter,
        None,
        method="splora",
        aligned=llama_dir,
        unaligned=unaligned_dir,
        top=3,
        mode="zero",
        options={"splora": {"null_samples": 8}},
    )
    out = edited.save(tmp_path / "pruned")
    pm = PeftModel.from_pretrained(load_model(llama_dir), str(out))
    mods = dict(pm.named_modules())
    for name in load_adapter(llama_adapter).module_names:
        delta = mods["base_model.model." + name].get_delta_weight("default")
        assert (float(delta.abs().max()) == 0.0) == (name in edited.selection.selected)


def test_null_samples_validated():
    from safeprune.errors import UsageError
    from safeprune.scoring import get_scorer

    with pytest.raises(UsageError):
        get_scorer("splora", null_samples=2)
    with pytest.raises(UsageError):
        get_scorer("splora", mode="paper")
    assert math.isfinite(get_scorer("splora").null_samples)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(3, 20),
    inp=st.integers(3, 20),
    r=st.integers(1, 4),
    c=st.floats(1e-2, 1e2),
    seed=st.integers(0, 10_000),
)
def test_sound_ediem_invariances(out, inp, r, c, seed):
    """E-DIEM (sound) is scale-free in the update (B, A and s) and depends on A only through AAᵀ."""
    from safeprune.scoring.methods.splora import sound_ediem

    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(out, inp, generator=g)
    wu = wa + 0.3 * torch.randn(out, inp, generator=g)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    frames = FrameCache(seed=0)
    base = sound_ediem(wa, wu, B, A, 2.0, frames, 8)
    if not math.isfinite(base["ediem"]) or base["ediem_null_iqr"] < 1e-9 * base["ediem_null_median"]:
        return  # degenerate null (e.g. r = out): nothing to compare
    Q, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    for other in (
        sound_ediem(wa, wu, c * B, A, 2.0, frames, 8),
        sound_ediem(wa, wu, B, A, 2.0 * c, frames, 8),
        sound_ediem(wa, wu, B, c * A, 2.0, frames, 8),
        sound_ediem(wa, wu, B, A @ Q, 2.0, frames, 8),
    ):
        assert other["ediem"] == pytest.approx(base["ediem"], rel=1e-6, abs=1e-6)
        assert other["ediem_dist_rel"] == pytest.approx(base["ediem_dist_rel"], rel=1e-9)
