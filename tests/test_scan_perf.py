"""The fast scan path (issue #6): positional safetensors reads, stored-dtype weights, bf16 matmuls, float64
blocked norms, thread setting, device handling, and a smoke run of the benchmark code."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_adapter, make_model
from safeprune.adapter import load_adapter
from safeprune.errors import NonFiniteError, UsageError
from safeprune.scoring import ModuleContext
from safeprune.scoring.linalg import exact_left_basis, left_projected_energy, matmul_weight, range_finder
from safeprune.scoring.scanner import resolve_device, scan, scan_threads
from safeprune.weights import checked_fro_norm, fro_norm64, open_weights, read_module_weight

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("bf") / "base", "llama", layers=2, dtype=torch.bfloat16, shard_size="60KB"
    )


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory, bf16_dir) -> Path:
    return make_adapter(bf16_dir, tmp_path_factory.mktemp("bfa") / "adapter", "llama", r=4, alpha=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_positional_reads_match_safetensors(tmp_path, dtype):
    from safetensors import safe_open

    d = make_model(tmp_path / "m", "llama", layers=2, dtype=dtype, shard_size="40KB")
    src = open_weights(d)
    assert len(src.files()) > 1
    for key in sorted(src.keys()):
        with safe_open(src.file_of(key), framework="pt") as h:
            ref = h.get_tensor(key)
        got = src.get(key, dtype=None)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref), key
    assert not src._handles  # nothing was memory-mapped
    src.close()
    assert not src._fds


def test_fro_norm64_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(700, 900, generator=g) * 3
    for t in (w, w.bfloat16(), w.half(), w.T, w.bfloat16().T):
        ref = float(torch.linalg.vector_norm(t.double()))
        assert fro_norm64(t) == pytest.approx(ref, rel=1e-12)
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        checked_fro_norm(bad.bfloat16(), "w", "here")


def test_bf16_range_finder_matches_float32_and_dense():
    g = torch.Generator().manual_seed(1)
    m, n, t = 512, 384, 8
    U0 = torch.linalg.qr(torch.randn(m, 40, generator=g))[0]
    V0 = torch.linalg.qr(torch.randn(n, 40, generator=g))[0]
    s = torch.arange(1, 41, dtype=torch.float32) ** -0.7
    Wb = ((U0 * s) @ V0.T + 0.002 * torch.randn(m, n, generator=g)).bfloat16()
    B, A = torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g)
    B[:, :2] += 5 * U0[:, :2] @ torch.randn(2, 2, generator=g)  # partly inside W0's top subspace
    tr = float(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum())
    O = {}
    for name, W in (("bf16", Wb), ("f32", Wb.float())):
        U = range_finder(W, t).U
        O[name] = 1 - left_projected_energy(U, B, A) / tr
    O["dense"] = 1 - left_projected_energy(exact_left_basis(Wb.float(), t), B, A) / tr
    assert abs(O["bf16"] - O["f32"]) < 1e-4
    assert abs(O["bf16"] - O["dense"]) < 1e-3


def test_matmul_weight_policy():
    w = torch.randn(8, 8)
    assert matmul_weight(w) is w
    assert matmul_weight(w.half()).dtype == torch.float32  # CPU fp16 matmuls are slow: convert
    assert matmul_weight(w.bfloat16(), "float32").dtype == torch.float32
    assert matmul_weight(w.bfloat16()).dtype in (torch.bfloat16, torch.float32)


def test_scan_on_bf16_base_auto_equals_float32(bf16_dir, bf16_adapter):
    a = scan(bf16_adapter, bf16_dir, "ddi")
    b = scan(bf16_adapter, bf16_dir, "ddi", matmul_dtype="float32")
    assert a.meta["threads"] >= 1
    for ra, rb in zip(a.rows, b.rows):
        assert ra["module"] == rb["module"]
        assert ra["base_fro"] == pytest.approx(rb["base_fro"], rel=1e-12)
        for k in ("S", "M_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-9)
        assert abs(ra["O"] - rb["O"]) < 1e-3
        assert ra["ddi"] == pytest.approx(rb["ddi"], rel=1e-2, abs=1e-6)


def test_module_context_keeps_stored_dtype(bf16_dir, bf16_adapter):
    ad = load_adapter(bf16_adapter)
    m = next(iter(ad))
    src = open_weights(bf16_dir)
    ctx = ModuleContext(m, {"base": src}, "cpu")
    raw = ctx.raw_weight("base")
    assert raw.dtype == torch.bfloat16 and raw.device.type == "cpu"
    assert ctx.weight("base").dtype == torch.float32
    assert torch.equal(ctx.weight("base"), raw.float())
    ref = float(torch.linalg.vector_norm(read_module_weight(src, m).double()))
    assert ctx.norm("base") == pytest.approx(ref, rel=1e-12)
    ctx2 = ModuleContext(m, {"base": src}, torch.device("cpu"))
    ctx2.prefetched("base", raw.clone())
    assert ctx2.raw_weight("base").dtype == torch.bfloat16
    ctx.release()
    assert not ctx._raw and not ctx._weights


def test_threads_setting_and_restore(monkeypatch, llama_dir, llama_adapter):
    monkeypatch.setenv("SAFEPRUNE_THREADS", "1")
    assert scan_threads() == 1
    assert scan_threads(3) == 3
    monkeypatch.setenv("SAFEPRUNE_THREADS", "x")
    with pytest.raises(UsageError):
        scan_threads()
    monkeypatch.delenv("SAFEPRUNE_THREADS")
    assert 1 <= scan_threads() <= 8
    with pytest.raises(UsageError):
        scan_threads(0)
    before = torch.get_num_threads()
    t = scan(llama_adapter, llama_dir, "ddi", threads=1)
    assert t.meta["threads"] == 1 and not t.meta["parallel_modules"]
    assert torch.get_num_threads() == before
    t3 = scan(llama_adapter, llama_dir, "ddi", threads=3)  # modules scored concurrently: same table
    assert t3.meta["parallel_modules"]
    assert torch.get_num_threads() == before
    assert [r["module"] for r in t3.rows] == [r["module"] for r in t.rows]
    for a, b in zip(t.rows, t3.rows):
        for k, v in a.items():
            assert b[k] == (pytest.approx(v, rel=1e-12, abs=1e-300) if isinstance(v, float) else v), k
    t4 = scan(llama_adapter, llama_dir, "ddi", threads=3, reuse_subspace=True)  # stateful: in order
    assert not t4.meta["parallel_modules"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_usage_error(llama_dir, llama_adapter):
    with pytest.raises(UsageError, match="no such CUDA device"):
        resolve_device("cuda")
    with pytest.raises(UsageError):
        scan(llama_adapter, llama_dir, "ddi", device="cuda")
    assert resolve_device("auto").type == "cpu"


def test_benchmark_code_path_smoke(tmp_path):
    """The functions bench_scan.py runs, at hidden 64 and in-process (the real run takes ~20 min)."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_scan
        import synth
    finally:
        sys.path.remove(str(BENCH))
    spec = synth.TINY
    base = synth.write_base(tmp_path / "base", spec)
    assert len(bench_scan.shard_files(base)) > 1 and (base / "model.safetensors.index.json").is_file()
    pair = synth.write_base(tmp_path / "unaligned", spec, delta=synth.unaligned_delta())
    src_a, src_u = open_weights(base), open_weights(pair)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(src_a.get(k), src_u.get(k))
    k2 = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(src_a.get(k2), src_u.get(k2))
    ad = synth.write_adapter(tmp_path / "ad", spec, synth.ATTN, 8, 16)
    args = {
        "adapter": str(ad),
        "base": str(base),
        "methods": ["ddi"],
        "table_out": str(tmp_path / "rows.json"),
        "threads": 1,
    }
    fl = bench_scan.worker_floor(dict(args, role_bases=[str(base)]))
    assert fl["tensors"] == 4 * spec.layers
    assert fl["bytes"] == sum(2 * o * i for _, o, i in synth.adapter_modules(spec, synth.ATTN))
    sc = bench_scan.worker_scan(args)
    assert sc["modules"] == 4 * spec.layers and sc["seconds"] > 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    dref = bench_scan.dense_reference(ad, base, rows, None)
    assert dref["modules_covered"] == dref["modules_total"] == 4 * spec.layers
    for d in dref["agreement"]:  # the dense reference agrees with the scan
        assert d["abs_diff_S"] < 1e-6 and d["abs_diff_M_norm"] < 1e-6 and d["abs_diff_O"] < 0.05
    case = {
        "case": "t",
        "modules": 8,
        "floor_bytes": fl["bytes"],
        "floor_seconds_median": fl["seconds"],
        "scan_seconds_median": sc["seconds"],
        "ratio_b_over_a_median": 1.0,
        "ratio_b_over_a_all": [1.0],
        "scan_peak_rss_mb_max": sc["hwm_mb"],
        "repeats": [{"scan": dict(sc, load=0.0)}],
        "dense": dref,
        "ratio_c_over_b": 2.0,
        "dense_max_abs_diff": {"O": 0.0, "ddi": 0.0},
    }
    md = bench_scan.markdown(
        {
            "mode": "tiny",
            "command": "x",
            "date": "d",
            "host": "h",
            "torch": "t",
            "torch_threads": 1,
            "cache": "warm",
            "cache_method": "warm read",
            "idle_rss_mb": 1.0,
            "cases": [case],
            "skipped_methods": ["safelora"],
        }
    )
    assert "| t | 8 |" in md and "safelora" in md
    assert math.isfinite(sc["hwm_mb"])


def test_inference_vllm_summary(llama_adapter):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_inference
    finally:
        sys.path.remove(str(BENCH))
    s = bench_inference.vllm_summary(Path(llama_adapter))
    assert s["lora_modules"] == len(load_adapter(llama_adapter))
    assert s["file_bytes"] > s["lora_params"] > 0


def test_safelora_scale_benchmark_smoke(tmp_path, monkeypatch):
    """bench_safelora_scale.py end to end at hidden 64, workers in-process: safeprune's SafeLoRA scan and the
    two dense d×d references (all C kept / per module) agree on every cosine and on the ranking."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_safelora_scale as bench
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr(bench, "run_worker", lambda kind, args: bench.WORKERS[kind](args))
    assert bench.main(["--tiny", "--workdir", str(tmp_path), "--out", str(tmp_path / "res"), "--tag", "t"]) == 0
    res = json.loads((tmp_path / "res" / "t.json").read_text())
    for g in res["agreement"].values():
        assert g["modules"] in (10, 14) and g["max_rel_diff"] < 1e-5 and g["same_ranking"]
    assert res["agreement"]["ours_vs_dense64"]["max_rel_diff"] < 1e-9
    r = res["results"]
    assert r["ours_all"]["modules"] == 14 and r["ours_qkvo"]["modules"] == 8
    assert r["official"]["C_matrices_mb"] > 0 and set(res["official_per_shape_compute"]) == {
        "64x64",
        "32x64",
        "160x64",
        "64x160",
    }
    assert "official/ours (all)" in res["ratios"] and "streamed/ours (all)" in res["ratios"]
    md = (tmp_path / "res" / "t.md").read_text()
    assert "(b) official" in md and "same ranking: True" in md
    assert not any(p.name.startswith("safeprune-slscale-") for p in tmp_path.iterdir())  # pair cleaned up
