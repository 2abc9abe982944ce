#!/usr/bin/env python
"""A candidate for the continuous loop, not used by it yet (issue 18): the output layer and the per-token
statistics fused over vocabulary chunks, against what a decode step does now.

Now: ``linear`` writes the whole ``[rows, 49,152]`` float32 logits (50 MB at 256 rows), then ``_choose`` reads
them back in 16-row chunks (argmax, log-softmax, entropy). Fused: the product is computed ``--chunk``
vocabulary columns at a time into one small buffer, and the argmax, the log-sum-exp (running maximum and
rescaled sum of exponentials) and the sum of ``p * logit`` are accumulated per chunk; the chosen token's
log-probability is ``max - lse`` and the entropy ``lse - sum(p * logit)``. Random SmolLM2-sized weights, one
thread; each variant timed ``--repeats`` times alternately. Reports milliseconds per call, whether the tokens
are the same and the largest differences of the two statistics.

    PYTHONPATH=src python benchmarks/bench_fused_head.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safeprune.eval.backends.continuous import _choose


def fused(x: torch.Tensor, w: torch.Tensor, chunk: int) -> tuple[list[int], list[float], list[float]]:
    rows, vocab = x.shape[0], w.shape[0]
    m = torch.full((rows,), float("-inf"))
    arg = torch.zeros(rows, dtype=torch.long)
    s, t = torch.zeros(rows), torch.zeros(rows)
    buf = torch.empty(rows, chunk)
    for a in range(0, vocab, chunk):
        y = torch.mm(x, w[a : a + chunk].t(), out=buf[:, : min(chunk, vocab - a)])
        cm, ca = y.max(-1)
        new = torch.maximum(m, cm)
        scale = torch.exp(m - new)
        e = torch.exp(y - new[:, None])
        s, t = s * scale + e.sum(-1), t * scale + (e * y).sum(-1)
        arg = torch.where(cm > m, ca + a, arg)  # strictly greater: the first maximum wins, as in argmax
        m = new
    lse = m + torch.log(s)
    return arg.tolist(), (m - lse).tolist(), (lse - t / s).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,128,64")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fused_head.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(49152, 576) * 0.05
    res = {}
    for rows in (int(r) for r in a.rows.split(",")):
        x = torch.randn(rows, 576)
        ref, got = _choose(F.linear(x, w)), fused(x, w, a.chunk)
        ms: dict[str, list[float]] = {"now": [], "fused": []}
        for _ in range(a.repeats):
            for k, f in (("now", lambda: _choose(F.linear(x, w))), ("fused", lambda: fused(x, w, a.chunk))):
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
