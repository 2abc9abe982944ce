"""Determinism and properties: same inputs + seed -> bit-identical tables; hypothesis properties of the DDI
formula's components and of the adapter writer (write -> read -> identical).

Dense reference comparisons of DDI live in test_ddi.py; here the properties must hold for *any* input.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import safeprune
from safeprune.adapter import LoraAdapter, LoraModule, load_adapter, scaling_for, write_adapter
from safeprune.scoring import ModuleContext, get_scorer
from safeprune.scoring.table import ScoreTable

SRC = Path(__file__).resolve().parents[1] / "src"
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The property tests score thousands of tiny matrices: on a shared 2-core machine, torch's thread pool
    costs more than the arithmetic (measured 0.05 s vs 0.002 s per 20×20 module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows_and_methods(table: ScoreTable) -> str:
    """The table's content (every float by its exact repr) without the timing metadata."""
    return json.dumps(
        {"rows": table.to_records(), "methods": {k: vars(v) for k, v in table.methods.items()}},
        sort_keys=True,
        default=str,
    )


# -------------------------------------------------------------------------------------------------
# bit-identical tables
# -------------------------------------------------------------------------------------------------


def test_same_seed_bit_identical_in_process(llama_adapter, llama_dir):
    a = safeprune.scoring.scan(llama_adapter, llama_dir, "ddi", seed=3)
    b = safeprune.scoring.scan(safeprune.load_adapter(llama_adapter), llama_dir, "ddi", seed=3)
    assert rows_and_methods(a) == rows_and_methods(b)
    # the prefetching reader thread does not change a bit either
    c = safeprune.scoring.scan(llama_adapter, llama_dir, "ddi", seed=3, prefetch=False)
    assert rows_and_methods(a) == rows_and_methods(c)


def test_same_seed_bit_identical_across_processes(llama_adapter, llama_dir, tmp_path):
    """The CLI in a fresh process writes the same table, float for float, as the API here."""
    j = tmp_path / "scores.json"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeprune.cli",
            "-q",
            "scan",
            str(llama_adapter),
            "--base",
            str(llama_dir),
            "--seed",
            "7",
            "--json",
            str(j),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    theirs = json.loads(j.read_text())
    ours = json.loads(safeprune.scoring.scan(llama_adapter, llama_dir, "ddi", seed=7).to_json())
    assert theirs["rows"] == ours["rows"]  # JSON floats round-trip exactly: equal means bit-identical
    assert theirs["methods"] == ours["methods"]


def test_different_seed_changes_only_the_random_part(llama_adapter, llama_dir):
    a = safeprune.scoring.scan(llama_adapter, llama_dir, "ddi", seed=0)
    b = safeprune.scoring.scan(llama_adapter, llama_dir, "ddi", seed=1)
    for ra, rb in zip(a.rows, b.rows):
        for col in ("S", "M", "M_norm", "delta_fro", "base_fro"):  # no randomness in these
            assert ra[col] == rb[col]
    assert any(ra["O"] != rb["O"] for ra, rb in zip(a.rows, b.rows))  # the seed is really used


def test_ranking_ignores_row_order(llama_adapter, llama_dir):
    import random

    t = safeprune.scoring.scan(llama_adapter, llama_dir, "ddi")
    rows = [dict(r) for r in t.rows]
    random.Random(0).shuffle(rows)
    t2 = ScoreTable(rows=rows, methods=t.methods, meta=t.meta)
    t2.add_ranks()
    assert {r["module"]: r["rank_ddi"] for r in t2.rows} == {r["module"]: r["rank_ddi"] for r in t.rows}
    assert sorted(r["rank_ddi"] for r in t.rows) == list(range(1, len(t) + 1))


# -------------------------------------------------------------------------------------------------
# DDI components: properties for any (A, B, W0)
# -------------------------------------------------------------------------------------------------

from helpers import dict_source  # noqa: E402

DictSource = dict_source  # one in-memory WeightSource for the tests (tests/helpers.py)


NAME = "model.layers.0.self_attn.q_proj"


def ddi_scores(A, B, W0, alpha=8.0, seed=0, **opts) -> dict:
    r = A.shape[0]
    m = LoraModule(NAME, A, B, r=r, alpha=alpha, scaling=scaling_for(alpha, r, False))
    ctx = ModuleContext(m, {"base": DictSource({NAME + ".weight": W0})})
    return get_scorer("ddi", seed=seed, **opts).score(ctx)


@st.composite
def lora_case(draw):
    out = draw(st.integers(2, 24))
    inp = draw(st.integers(2, 24))
    r = draw(st.integers(1, min(out, inp, 6)))
    seed = draw(st.integers(0, 2**31 - 1))
    log_a = draw(st.floats(-3, 3))
    log_w = draw(st.floats(-3, 3))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g) * 10**log_a
    B = torch.randn(out, r, generator=g)
    W0 = torch.randn(out, inp, generator=g) * 10**log_w
    return A, B, W0


BOUNDED = ("S", "O", "M_norm", "ddi_norm")


@PROPS
@given(lora_case(), st.sampled_from(["column", "row"]), st.sampled_from(["norm", "raw"]))
def test_components_bounded_and_finite(case, subspace, magnitude):
    A, B, W0 = case
    s = ddi_scores(A, B, W0, subspace=subspace, magnitude=magnitude)
    assert all(math.isfinite(v) for v in s.values())
    for k in BOUNDED:
        assert 0.0 <= s[k] <= 1.0, (k, s[k])
    assert s["M"] >= 0 and s["ddi"] >= 0
    assert s["M_norm"] < 1.0 and s["ddi_norm"] < 1.0
    if magnitude == "norm":
        assert s["ddi"] <= s["M_norm"] + 1e-15  # S, O ≤ 1


@PROPS
@given(lora_case(), st.integers(-12, 12), st.floats(-4, 4), st.sampled_from(["column", "row"]))
def test_scaling_dW_leaves_S_and_O_unchanged(case, k, log_c, subspace):
    """S and O describe the direction of ΔW, not its size: ΔW -> c·ΔW changes only M (by c).

    eps=0 (no regulariser): the invariance is then exact up to rounding. c = 2^k scales the float32 B
    exactly; any other c goes through alpha (the float64 scaling factor)."""
    A, B, W0 = case
    s1 = ddi_scores(A, B, W0, subspace=subspace, eps=0.0)
    s2 = ddi_scores(A, B * 2.0**k, W0, subspace=subspace, eps=0.0)
    assert s2["S"] == pytest.approx(s1["S"], rel=1e-12)
    assert s2["O"] == pytest.approx(s1["O"], rel=1e-9, abs=1e-12)
    assert s2["M"] == pytest.approx(2.0**k * s1["M"], rel=1e-12)
    c = 10**log_c
    s3 = ddi_scores(A, B, W0, alpha=8.0 * c, subspace=subspace, eps=0.0)
    assert s3["S"] == pytest.approx(s1["S"], rel=1e-9)
    assert s3["O"] == pytest.approx(s1["O"], rel=1e-9, abs=1e-12)
    assert s3["M"] == pytest.approx(c * s1["M"], rel=1e-9)


@PROPS
@given(lora_case(), st.integers(0, 2**31 - 1))
def test_scores_depend_on_dW_not_on_its_factorisation(case, gseed):
    """(A, B) and (G·A, B·G⁻¹) are the same update: every score must agree."""
    A, B, W0 = case
    r = A.shape[0]
    g = torch.Generator().manual_seed(gseed)
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    G = Q @ torch.diag(torch.linspace(0.5, 2.0, r, dtype=torch.float64))  # well conditioned
    A2 = (G @ A.double()).float()
    B2 = (B.double() @ torch.linalg.inv(G)).float()
    s1, s2 = ddi_scores(A, B, W0), ddi_scores(A2, B2, W0)
    for k in ("S", "O", "M", "M_norm", "ddi"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k


@PROPS
@given(lora_case())
def test_zero_update_scores_zero(case):
    """B = 0 (PEFT's initialisation, or a pruned module in --mode zero) means ΔW = 0: DDI = 0."""
    A, B, W0 = case
    s = ddi_scores(A, torch.zeros_like(B), W0)
    assert s["ddi"] == 0.0 and s["ddi_norm"] == 0.0 and s["M"] == 0.0 and s["S"] == 0.0
    assert s["delta_fro"] == 0.0


@PROPS
@given(lora_case(), st.integers(-10, 10), st.sampled_from(["column", "row"]))
def test_scaling_W0_changes_only_M(case, k, subspace):
    """W0 -> c·W0 has the same singular subspaces: S and O stay, M divides by c (c = 2^k: exact in float32)."""
    A, B, W0 = case
    c = 2.0**k
    s1, s2 = ddi_scores(A, B, W0, subspace=subspace, eps=0.0), ddi_scores(A, B, W0 * c, subspace=subspace, eps=0.0)
    assert s2["S"] == s1["S"]
    assert s2["O"] == pytest.approx(s1["O"], rel=1e-6, abs=1e-9)
    assert s2["M"] == pytest.approx(s1["M"] / c, rel=1e-12)


@PROPS
@given(st.integers(4, 24), st.integers(4, 24), st.integers(1, 3), st.integers(0, 2**31 - 1), st.booleans())
def test_O_is_zero_inside_and_one_outside_W0s_subspace(out, inp, r, seed, inside):
    """W0 of exact rank r: an update in its column space has O = 0, one orthogonal to it O = 1."""
    assume(out > 2 * r)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    sv = torch.linspace(3.0, 1.0, r, dtype=torch.float64)
    W0 = (U[:, :r] * sv) @ V[:, :r].T
    cols = U[:, :r] if inside else U[:, r : 2 * r]
    B = cols @ torch.randn(r, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    s = ddi_scores(A, B, W0)
    assert s["O"] == pytest.approx(0.0 if inside else 1.0, abs=1e-6)


@PROPS
@given(lora_case(), st.integers(0, 1000))
def test_same_seed_same_bits(case, seed):
    A, B, W0 = case
    assert ddi_scores(A, B, W0, seed=seed) == ddi_scores(A, B, W0, seed=seed)


@PROPS
@given(lora_case())
def test_S_is_one_for_rank_one_updates(case):
    A, B, W0 = case
    s = ddi_scores(A[:1], B[:, :1], W0, eps=0.0)
    assert s["S"] == pytest.approx(1.0, rel=1e-12)
    # with the default relative ε = 1e-12·tr(G), S = 1/(1 + 1e-12)
    assert ddi_scores(A[:1], B[:, :1], W0)["S"] == pytest.approx(1.0 / (1.0 + 1e-12), rel=1e-12)


# -------------------------------------------------------------------------------------------------
# the adapter writer: write -> read -> identical
# -------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


@st.composite
def adapters(draw):
    n = draw(st.integers(1, 4))
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([1, 4, 8, 16.0, 0.5]))
    dtype = draw(st.sampled_from(DTYPES))
    rslora = draw(st.booleans())
    named = draw(st.booleans())  # older trainers keep the adapter name in the key
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rank_pattern, alpha_pattern = {}, {}
    modules = {}
    for i in range(n):
        proj = PROJS[i]
        path = f"model.layers.{i}.self_attn.{proj}"
        ri = r
        if draw(st.booleans()):
            ri = draw(st.integers(1, 5))
            if ri != r:
                rank_pattern[proj] = ri
        ai = float(alpha)
        if draw(st.booleans()):
            ai = float(draw(st.sampled_from([2, 32, 3.5])))
            alpha_pattern[proj] = ai
        out, inp = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        A = (torch.randn(ri, inp, generator=g) * 10 ** draw(st.floats(-3, 3))).to(dtype)
        B = torch.randn(out, ri, generator=g).to(dtype)
        has_bias = draw(st.booleans())
        mid = ".default" if named else ""
        modules[path] = LoraModule(
            path,
            A,
            B,
            r=ri,
            alpha=ai,
            scaling=scaling_for(ai, ri, rslora),
            lora_B_bias=torch.randn(out, generator=g).to(dtype) if has_bias else None,
            key_A=f"base_model.model.{path}.lora_A{mid}.weight",
            key_B=f"base_model.model.{path}.lora_B{mid}.weight",
            key_B_bias=f"base_model.model.{path}.lora_B{mid}.bias" if has_bias else None,
        )
    extra = {}
    if draw(st.booleans()):
        extra["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(3, 4, generator=g).to(dtype)
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({m.module_type for m in modules.values()}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": draw(st.text(max_size=12)),
        "task_type": "CAUSAL_LM",
    }
    meta = {"format": "pt", "note": draw(st.text(max_size=8))}
    return LoraAdapter(config=cfg, modules=modules, extra_tensors=extra, metadata=meta)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_writer_roundtrip(ad):
    with tempfile.TemporaryDirectory() as d:
        out = write_adapter(ad, Path(d) / "out")
        back = load_adapter(out)
        assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert [p for p in os.listdir(d) if p != "out"] == []  # no temporary directory left
    assert back.config == ad.config
    assert back.metadata == ad.metadata
    sd, sd2 = ad.state_dict(), back.state_dict()
    assert list(sd2) == list(sd) or set(sd2) == set(sd)
    for k, v in sd.items():
        assert sd2[k].dtype == v.dtype and torch.equal(sd2[k], v), k
    for name, m in ad.modules.items():
        b = back.modules[name]
        assert (b.r, b.alpha, b.scaling, b.key_A, b.key_B, b.key_B_bias) == (
            m.r,
            m.alpha,
            m.scaling,
            m.key_A,
            m.key_B,
            m.key_B_bias,
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_writer_is_deterministic(ad):
    """Writing the same adapter twice gives the same config bytes, the same tensor bytes and the same header
    content. (Not always the same header *bytes*: safetensors keeps __metadata__ in a Rust HashMap, whose
    iteration order varies between writes when there is more than one metadata key.)"""
    from safeprune.io.safetensors import read_safetensors_header

    with tempfile.TemporaryDirectory() as d:
        a = write_adapter(ad, Path(d) / "a")
        b = write_adapter(ad, Path(d) / "b")
        assert (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()
        (ha, sa), (hb, sb) = (read_safetensors_header(x / "adapter_model.safetensors") for x in (a, b))
        assert ha == hb
        assert (a / "adapter_model.safetensors").read_bytes()[sa:] == (b / "adapter_model.safetensors").read_bytes()[
            sb:
        ]
