#!/usr/bin/env python
"""Testbed: DDI scan time against the time to read the same W0 tensors once (and a dense reference).

    python benchmarks/testbed_scan_vs_read.py --base $SAFEPRUNE_TESTBED_MODELS/aligned \
        --adapter ../shared/testbed/adapters/mix_s0 --out benchmarks/results [--cache cold]

All timings in one run, page cache warm for every variant (one untimed read pass first); each variant is
repeated and the median reported. Writes testbed_scan_{warm,cold}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import safeprune
from safeprune.weights import module_weight_key, open_weights


def timed(fn, repeats: int, before=lambda: None) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default="warm",
        help="cold: drop the page cache (root; /proc/sys/vm/drop_caches) before every timed run",
    )
    a = ap.parse_args()

    def drop() -> None:
        if a.cache == "cold":
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

    adapter = safeprune.load_adapter(a.adapter)
    src = open_weights(a.base)
    keys = [module_weight_key(src, m) for m in adapter]

    def read_all():
        n = 0
        for k in keys:
            n += src.get(k).numel()
        return n

    read_all()  # warm: every variant below reads from the page cache (unless --cache cold)
    t_read, n_elems = timed(read_all, a.repeats, drop)
    t_scan, table = timed(lambda: safeprune.scoring.scan(adapter, src), a.repeats, drop)
    t_exact, _ = timed(lambda: safeprune.scoring.scan(adapter, src, exact_subspace=True), 1, drop)

    def dense_reference():  # full SVD of W0 + dense ΔW and its Gram matrix, per module
        for m in adapter:
            W = src.get(module_weight_key(src, m)).double()
            dW = m.delta_weight()
            torch.linalg.eigvalsh(dW.T @ dW)
            U = torch.linalg.svd(W, full_matrices=False)[0][:, : m.r]
            (U @ (U.T @ dW)).norm()

    t_dense, _ = timed(dense_reference, 1, drop)
    res = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "adapter": a.adapter,
        "base": a.base,
        "modules": len(adapter),
        "w0_elements": n_elems,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "page_cache": a.cache,
        "seconds": {
            "read_w0_once": t_read,
            "scan_ddi": t_scan,
            "scan_ddi_exact_subspace": t_exact,
            "dense_reference": t_dense,
        },
        "ratios": {
            "scan_over_read": t_scan / t_read,
            "exact_over_scan": t_exact / t_scan,
            "dense_over_scan": t_dense / t_scan,
        },
        "scan_meta": table.meta,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"testbed_scan_{a.cache}.json").write_text(json.dumps(res, indent=2))
    s = res["seconds"]
    md = [
        "# Testbed: DDI scan vs reading W0 once",
        "",
        f"`{res['command']}`",
        "",
        f"{len(adapter)} modules (q/k/v/o of SmolLM2-135M, r=8), {n_elems / 1e6:.1f} M W0 elements (fp32), {a.cache} page "
        f"cache, median of {a.repeats} runs; torch threads {res['torch_threads']}, load average "
        f"{', '.join(f'{x:.1f}' for x in res['load_average'])} (machine shared with other jobs).",
        "",
        "| what | seconds | ratio |",
        "|---|---|---|",
        f"| read every W0 once (the floor) | {s['read_w0_once']:.3f} | 1.00 |",
        f"| `safeprune scan` (DDI, randomized range finder) | {s['scan_ddi']:.3f} | {s['scan_ddi'] / s['read_w0_once']:.2f} × read |",
        f"| scan with `--exact-subspace` (full SVD of W0) | {s['scan_ddi_exact_subspace']:.3f} | {res['ratios']['exact_over_scan']:.1f} × scan |",
        f"| dense reference (dense ΔW, eigvalsh, full SVD) | {s['dense_reference']:.3f} | {res['ratios']['dense_over_scan']:.1f} × scan |",
        "",
    ]
    (out / f"testbed_scan_{a.cache}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
