#!/usr/bin/env python
"""`safeprune scan --device cuda` against the CPU at Llama-2-7B shapes (a GPU check): a synthetic base with
``--layers`` layers, its "unaligned" twin and a q/k/v/o adapter (synth.py), scanned with DDI, SafeLoRA and SPLoRA on
the CPU and on CUDA; prints the seconds of each and how far the scores differ (largest relative difference per
score column, and whether the rankings — what the selection reads — are the same).

    python benchmarks/gpu_scan_check.py --layers 4 [--out results/gpu/scan_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    import synth
    import torch

    from safeprune.scoring.scanner import scan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", default="ddi,safelora,splora")
    ap.add_argument("--tiny", action="store_true", help="hidden-64 shapes (a smoke run of the code path)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    spec = (synth.TINY if a.tiny else synth.LLAMA2_7B).with_layers(a.layers)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gpu_scan_"))
    base = synth.write_base(work / "base", spec, seed=0)
    unaligned = synth.write_base(work / "unaligned", spec, seed=0, delta=synth.unaligned_delta())
    adapter = synth.write_adapter(work / "ad", spec, synth.ATTN, r=8, alpha=16)
    methods = a.methods.split(",")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tables, seconds = {}, {}
    for dev in devices:
        t0 = time.perf_counter()
        tables[dev] = scan(adapter, base, methods, aligned=base, unaligned=unaligned, device=dev, progress=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        seconds[dev] = time.perf_counter() - t0
        print(f"{dev}: {len(tables[dev])} modules in {seconds[dev]:.1f} s", flush=True)
    res = {"spec": spec.name, "modules": len(tables["cpu"]), "seconds": seconds, "columns": {}}
    if "cuda" in tables:
        cpu = {r["module"]: r for r in tables["cpu"].rows}
        gpu = {r["module"]: r for r in tables["cuda"].rows}
        cols = [k for k, v in next(iter(cpu.values())).items() if isinstance(v, float)]
        for k in cols:
            pairs = [(cpu[m][k], gpu[m][k]) for m in cpu if isinstance(gpu[m].get(k), float)]
            pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in pairs), default=0.0)
            rank_c = sorted(cpu, key=lambda m: (cpu[m][k], m))
            rank_g = sorted(gpu, key=lambda m: (gpu[m][k], m))
            res["columns"][k] = {"max_rel_diff": rel, "same_ranking": rank_c == rank_g}
            print(f"  {k}: max relative difference {rel:.2e}, same ranking: {rank_c == rank_g}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
