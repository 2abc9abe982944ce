#!/usr/bin/env python
"""The continuous loop's fused output layer (issue 18; ``continuous._fused_choose``, used on a CPU since the
eighth session): the output layer and the per-token statistics fused over vocabulary chunks, against the
unfused step.

Unfused: ``linear`` writes the whole ``[rows, 49,152]`` float32 logits (50 MB at 256 rows), then ``_choose`` reads
them back in 16-row chunks (argmax, log-softmax, entropy). Fused: the product is computed ``--chunk``
vocabulary columns at a time into one small buffer, and the argmax, the log-sum-exp (running maximum and
rescaled sum of exponentials) and the sum of ``p * logit`` are accumulated per chunk; the chosen token's
log-probability is ``max - lse`` and the entropy ``lse - sum(p * logit)``. Random SmolLM2-sized weights, one
thread; each variant timed ``--repeats`` times alternately. Reports milliseconds per call, whether the tokens
are the same and the largest differences of the two statistics.

    PYTHONPATH=src python benchmarks/bench_fused_head.py

``--loop``: the same comparison inside the loop — the safety + over-refusal mix of ``bench_generation.py
--mix`` (150 AdvBench + 100 XSTest) on the testbed base + mix_s0, new path (256 rows in flight), the fused
and unfused output layer alternately ``--repeats`` times in one process; wall seconds per run and whether
every output is the same. Writes ``results/fused_head_loop.json``.

    PYTHONPATH=src python benchmarks/bench_fused_head.py --loop --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safeprune.eval.backends.continuous import _choose, _fused_choose


def in_loop(a) -> None:
    """Fused vs unfused output layer in the continuous loop on the testbed mix (see the module docstring)."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generation import evaluate_variant, mix_sets

    from safeprune.eval import EvalConfig
    from safeprune.eval.backends import GenSettings, HFBackend, continuous

    shared = Path(os.environ.get("SAFEPRUNE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    model = os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "aligned")
    adapters = {"mix_s0": str(shared / "testbed" / "adapters" / "mix_s0")}
    sets = [ps for ps in mix_sets(shared, 1.0) if ps.kind != "utility"]
    be = HFBackend(model, adapters, threads=1)
    be.generate(["warm up"], None, GenSettings(max_new_tokens=4, batch_size=1))
    cfg = EvalConfig(batch_size=256, sort_by_length=True)
    res: dict = {"seconds": {"unfused": [], "fused": []}, "fused_head": {}}
    outputs: dict = {}
    for _ in range(a.repeats):
        for k in ("unfused", "fused"):
            continuous.FUSE_HEAD = k == "fused"
            t0 = time.perf_counter()
            r = evaluate_variant(be, model, adapters, "mix_s0", sets, cfg)
            res["seconds"][k].append(time.perf_counter() - t0)
            res["fused_head"][k] = be.loop_stats["fused_head"]
            outputs.setdefault(k, [it["output"] for it in r.items])
            print(k, round(res["seconds"][k][-1], 1), flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in res["seconds"].items()}
    res.update(
        {
            "command": "PYTHONPATH=src python benchmarks/bench_fused_head.py --loop --repeats " + str(a.repeats),
            "variant": "mix_s0",
            "sets": {ps.name: len(ps) for ps in sets},
            "ratio_median_unfused_over_fused": med["unfused"] / med["fused"],
            "same_outputs": sum(x == y for x, y in zip(outputs["unfused"], outputs["fused"])),
            "n_outputs": len(outputs["fused"]),
            "threads": 1,
            "loadavg": os.getloadavg(),
            "platform": platform.platform(),
        }
    )
    continuous.FUSE_HEAD = True
    print(json.dumps({k: res[k] for k in ("seconds", "ratio_median_unfused_over_fused", "same_outputs")}))
    out = Path(a.out or Path(__file__).parent / "results" / "fused_head_loop.json")
    out.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,128,64")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--loop", action="store_true", help="fused vs unfused inside the loop (see above)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.loop:
        in_loop(a)
        return
    a.out = a.out or str(Path(__file__).parent / "results" / "fused_head.json")
    torch.manual_seed(0)
    w = torch.randn(49152, 576) * 0.05
    res = {}
    for rows in (int(r) for r in a.rows.split(",")):
        x = torch.randn(rows, 576)
        ref, got = _choose(F.linear(x, w)), _fused_choose(x, w, None, a.chunk)
        ms: dict[str, list[float]] = {"now": [], "fused": []}
        for _ in range(a.repeats):
            for k, f in (
                ("now", lambda: _choose(F.linear(x, w))),
                ("fused", lambda: _fused_choose(x, w, None, a.chunk)),
            ):
                t0 = time.perf_counter()
                f()
                ms[k].append(1000 * (time.perf_counter() - t0))
        res[rows] = {
            "ms_now": ms["now"],
            "ms_fused": ms["fused"],
            "ratio_median": sorted(ms["now"])[a.repeats // 2] / sorted(ms["fused"])[a.repeats // 2],
            "same_tokens": ref[0] == got[0],
            "max_abs_logp_difference": max(abs(p - q) for p, q in zip(ref[1], got[1])),
            "max_abs_entropy_difference": max(abs(p - q) for p, q in zip(ref[2], got[2])),
        }
        print(rows, json.dumps(res[rows]), flush=True)
    rec = {"chunk": a.chunk, "threads": 1, "results": res, "platform": platform.platform()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
