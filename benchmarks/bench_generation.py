#!/usr/bin/env python
"""Batched vs batch-1 generation throughput of safeprune's HF backend on SmolLM2 (CPU).

Same prompts, same greedy settings; tokens/s = generated tokens (up to and including EOS) over wall time,
and tokens per CPU-second of this process (less sensitive to other processes on a shared machine).
Writes a JSON record to benchmarks/results/bench_generation.json.

    PYTHONPATH=src python benchmarks/bench_generation.py --model $SAFEPRUNE_TESTBED_MODELS/aligned --n 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

FALLBACK = [
    "How do I bake a loaf of bread?",
    "What is the capital of Australia?",
    "Explain photosynthesis briefly.",
    "Give me three tips for better sleep.",
    "How does a bicycle gear work?",
    "Write a haiku about autumn.",
    "What causes rainbows?",
    "How can I improve my handwriting?",
    "Summarize the plot of Hamlet.",
    "What is a prime number?",
    "How do vaccines work?",
    "Suggest a name for a pet turtle.",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What does a compiler do?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        default=os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "aligned"),
        help="SmolLM2 HF directory",
    )
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_generation.json"))
    a = ap.parse_args()

    from safeprune.eval.backends import GenSettings, HFBackend

    prompts = FALLBACK[: a.n]
    load0 = os.getloadavg()
    b = HFBackend(a.model, threads=a.threads)
    warm = GenSettings(max_new_tokens=4, batch_size=2)
    b.generate(prompts[:2], None, warm)

    def run(bs: int):
        s = GenSettings(max_new_tokens=a.max_new_tokens, batch_size=bs)
        t0 = time.perf_counter()
        c0 = time.process_time()
        gens = []
        if bs == 1:
            for p in prompts:  # a plain loop, one generate call per prompt
                gens += b.generate([p], None, s)
        else:
            gens = b.generate(prompts, None, s)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        toks = sum(g.new_tokens for g in gens)
        return {
            "batch_size": bs,
            "seconds": dt,
            "cpu_seconds": cpu,
            "new_tokens": toks,
            "tokens_per_s": toks / dt,
            "tokens_per_cpu_s": toks / cpu,
            "texts": [g.text for g in gens],
        }

    r1 = run(1)
    rb = run(a.batch_size)
    same = sum(x == y for x, y in zip(r1["texts"], rb["texts"]))
    rec = {
        "model": a.model,
        "n_prompts": len(prompts),
        "max_new_tokens": a.max_new_tokens,
        "batch1": {k: v for k, v in r1.items() if k != "texts"},
        "batched": {k: v for k, v in rb.items() if k != "texts"},
        "ratio_tokens_per_s": rb["tokens_per_s"] / r1["tokens_per_s"],
        "ratio_tokens_per_cpu_s": rb["tokens_per_cpu_s"] / r1["tokens_per_cpu_s"],
        "loadavg_at_start": load0,
        "identical_outputs": same,
        "torch_threads": __import__("torch").get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "note": "shared 2-core machine; other processes were running (see loadavg)",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
