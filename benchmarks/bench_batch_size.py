#!/usr/bin/env python
"""The automatic batch size vs the fixed defaults it replaced, on the continuous loop (fp32, CPU).

The testbed reproduction's prompt mix (150 AdvBench + 100 XSTest, then 100 DialogSum; ``bench_generation.mix_sets``)
on each ``--adapter`` (and the base with ``--base``), through ``safeprune.evaluate`` with no cache, twice per
group back to back: rows in flight as ``safeprune run`` set them before (50 for safety and over-refusal, 16 for
dialogues) and ``auto`` (``batch_size`` 0: as many rows as fit a quarter of the free memory, at most 256;
``safeprune.eval.backends.continuous.auto_rows``). Reports wall seconds per group and path, their ratio, the
rows the automatic size chose, and whether every output text is the same (it need not be in float32: batch
composition changes floating-point sums; differences are counted).

    PYTHONPATH=src python benchmarks/bench_batch_size.py --threads 1 --model $SAFEPRUNE_TESTBED_MODELS/aligned \
        --adapter mix_s0=$SAFEPRUNE_SHARED/testbed/adapters/mix_s0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench_generation import evaluate_variant, mix_sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--base", action="store_true", help="evaluate the base too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="use this share of each set (first rows)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_size.json"))
    a = ap.parse_args()

    from safeprune.eval import EvalConfig
    from safeprune.eval.backends import GenSettings, HFBackend
    from safeprune.eval.backends.continuous import MEMORY_SHARE, ROWS_MAX, free_memory

    shared = Path(os.environ.get("SAFEPRUNE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    sets = mix_sets(shared, a.scale)
    groups = [[ps for ps in sets if ps.kind != "utility"], [ps for ps in sets if ps.kind == "utility"]]
    adapters = dict(x.split("=", 1) for x in a.adapter)
    variants = (["base"] if a.base or not adapters else []) + list(adapters)
    be = HFBackend(a.model, adapters, threads=a.threads)
    be.generate(["warm up"], None, GenSettings(max_new_tokens=4, batch_size=1))
    paths = {
        "fixed": EvalConfig(batch_size=50, utility_batch_size=16, sort_by_length=True),
        "auto": EvalConfig(sort_by_length=True),
    }
    runs = []
    t_all = time.perf_counter()
    for v in variants:
        for group in groups:
            outs = {}
            for path, cfg in paths.items():
                t0 = time.perf_counter()
                r = evaluate_variant(be, a.model, adapters, v, group, cfg)
                dt = time.perf_counter() - t0
                outs[path] = [it["output"] for it in r.items]
                runs.append(
                    {
                        "variant": v,
                        "sets": "+".join(ps.name for ps in group),
                        "path": path,
                        "seconds": dt,
                        "rows_cap": be.loop_stats["rows_cap"],
                        "loop_stats": dict(be.loop_stats),
                        "new_tokens": sum(it["new_tokens"] for it in r.items),
                        "loadavg": os.getloadavg(),
                    }
                )
                print(
                    f"{v:>10} {runs[-1]['sets']:>20} {path:>5}: {dt:7.1f} s, rows {be.loop_stats['rows_cap']}",
                    flush=True,
                )
            same = sum(x == y for x, y in zip(outs["fixed"], outs["auto"]))
            runs[-1]["same_outputs"] = runs[-2]["same_outputs"] = same
            runs[-1]["n_outputs"] = runs[-2]["n_outputs"] = len(outs["auto"])

    def total(path, utility):
        return sum(r["seconds"] for r in runs if r["path"] == path and (r["sets"] == "dialogsum_test") == utility)

    rec = {
        "model": "$SAFEPRUNE_TESTBED_MODELS/aligned",
        "variants": variants,
        "fixed": "rows in flight 50 (safety, over-refusal) and 16 (dialogues): safeprune run's defaults before",
        "auto": f"batch_size 0: {MEMORY_SHARE} of the free memory over the longest prompt's KV, at most {ROWS_MAX}",
        "free_memory_bytes": free_memory("cpu"),
        "torch_threads": a.threads,
        "runs": runs,
        "seconds": {
            k: {
                "fixed": total("fixed", u),
                "auto": total("auto", u),
                "ratio_fixed_over_auto": total("fixed", u) / total("auto", u),
            }
            for k, u in (("safety_over_refusal", False), ("utility", True))
        },
        "wall_s": time.perf_counter() - t_all,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec["seconds"], indent=1))


if __name__ == "__main__":
    main()
