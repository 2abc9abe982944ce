#!/usr/bin/env python
"""Where a DDI scan's time goes, per module: CPU time of each step at real shapes (bf16 W0).

CPU time (``time.thread_time``, this thread only) rather than wall time, so the split is meaningful on a
loaded, shared machine; one torch thread (what scan() gives each module worker). Also a cProfile of a scan
of a 4-layer 7B-shaped base. Writes results/profile_scan.{json,md}.

    python benchmarks/profile_scan.py
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import synth  # noqa: E402
import torch  # noqa: E402

from safeprune.scoring.linalg import OmegaCache, _orth, left_projected_energy, lowrank_svals  # noqa: E402
from safeprune.weights import fro_norm64, open_weights  # noqa: E402

F64 = torch.float64


def cpu_ms(f, n=5):
    best = float("inf")
    for _ in range(n):
        t = time.thread_time()
        f()
        best = min(best, time.thread_time() - t)
    return round(best * 1e3, 2)


def steps(src, key: str, r: int = 8, oversample: int = 8) -> dict:
    Wb = src.get(key, dtype=None)
    m, n = Wb.shape
    ell = r + oversample
    om = OmegaCache().get(n, ell, "cpu", torch.bfloat16)
    Q = _orth(Wb @ om)
    Z = _orth(Wb.T @ Q.to(torch.bfloat16))
    B, A = torch.randn(m, r), torch.randn(r, n)
    out = {
        "shape": f"{m}x{n}",
        "bytes": Wb.numel() * 2,
        "read (pread, page cache warm)": cpu_ms(lambda: src.get(key, dtype=None)),
        "norm (float64 blocks)": cpu_ms(lambda: fro_norm64(Wb)),
        "W @ Omega (bf16, x3 per module)": cpu_ms(lambda: Wb @ om),
        "W.T @ Q (bf16, x2)": cpu_ms(lambda: Wb.T @ Q.to(torch.bfloat16)),
        "W @ Z (bf16)": cpu_ms(lambda: Wb @ Z.to(torch.bfloat16)),
        "Q.T @ W (bf16, x1)": cpu_ms(lambda: Q.to(torch.bfloat16).T @ Wb),
        "QR of m x l (float64, x5)": round(max(0.0, cpu_ms(lambda: _orth(Wb @ om)) - cpu_ms(lambda: Wb @ om)), 2),
        "small SVD l x n (float64)": cpu_ms(
            lambda: torch.linalg.svd(torch.randn(ell, n, dtype=F64), full_matrices=False)
        ),
        "r x r algebra (svals + projection)": cpu_ms(lambda: (lowrank_svals(B, A), left_projected_energy(Q, B, A))),
        "bf16 -> fp32 full copy (avoided)": cpu_ms(lambda: Wb.float()),
        "fp32 W @ Omega (for comparison)": round(
            cpu_ms(lambda: Wb.float() @ om.float()) - cpu_ms(lambda: Wb.float()), 2
        ),
    }
    passes = 3 * out["W @ Omega (bf16, x3 per module)"] + 2 * out["W.T @ Q (bf16, x2)"] + out["Q.T @ W (bf16, x1)"]
    out["total per module (read+norm+6 passes+QRs+SVD+algebra)"] = round(
        out["read (pread, page cache warm)"]
        + out["norm (float64 blocks)"]
        + passes
        + out["QR of m x l (float64, x5)"] * 5
        + out["small SVD l x n (float64)"]
        + out["r x r algebra (svals + projection)"],
        1,
    )
    return out


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="safeprune-prof-") as d:
        spec = synth.LLAMA2_7B.with_layers(2)
        base = synth.write_base(Path(d) / "base", spec)
        ad = synth.write_adapter(Path(d) / "ad", spec, synth.ATTN, 8, 16)
        src = open_weights(base)
        rows = [steps(src, "model.layers.0.self_attn.q_proj.weight"), steps(src, "model.layers.0.mlp.up_proj.weight")]
        src.close()
        from safeprune.scoring.scanner import scan

        scan(ad, base, "ddi", threads=1)
        pr = cProfile.Profile()
        pr.enable()
        scan(ad, base, "ddi", threads=1)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    load = round(os.getloadavg()[0], 2)
    res = {
        "command": "python benchmarks/profile_scan.py",
        "load": load,
        "torch_threads": 1,
        "steps_cpu_ms": rows,
        "cprofile_scan_2L_qkvo_sequential": s.getvalue(),
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "profile_scan.json").write_text(json.dumps(res, indent=2))
    keys = [k for k in rows[0] if k not in ("shape", "bytes")]
    md = [
        "# Where the scan's time goes (CPU ms per module, 1 torch thread, bf16 W0)",
        "",
        f"Command: `python benchmarks/profile_scan.py`; load average {load}",
        "",
        "| step | " + " | ".join(r["shape"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    md += [f"| {k} | " + " | ".join(str(r[k]) for r in rows) + " |" for k in keys]
    md += [
        "",
        "cProfile of a sequential scan (threads=1) of a 2-layer 7B-shaped base, q/k/v/o r=8:",
        "",
        "```",
        s.getvalue().strip(),
        "```",
    ]
    (out / "profile_scan.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
