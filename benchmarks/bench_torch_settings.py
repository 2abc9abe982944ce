#!/usr/bin/env python
"""Which torch CPU settings matter for generation on the testbed model: threads, bf16, a static KV cache,
each against the fp32 default on the same prompts (greedy, no early stop).

Each setting generates the same N AdvBench prompts (N/2 XSTest when --mixed) with ``max_new_tokens``; the
settings run in turn, twice (ABAB order, the faster run kept), so slow drifts of machine load hit all
alike. bf16 reports its verdict (keyword judge) and text agreement with fp32. The static cache goes
through HF ``generate`` (the continuous loop's cache grows by design); its baseline is ``generate`` with
the dynamic cache. torch.compile is not measured here: HF generate compiles a static-cache forward only on
accelerators, and compiling the continuous loop's dynamic shapes was not tried.

    PYTHONPATH=src python benchmarks/bench_torch_settings.py --n 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import time
from pathlib import Path


def parse_args(out_name: str) -> argparse.Namespace:
    """The options both CPU-settings benchmarks take (bench_compile.py reuses them)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "aligned"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / out_name))
    return ap.parse_args()


def advbench_prompts(n: int) -> list[str]:
    """``n`` AdvBench goals, a seeded sample (the same for every benchmark that calls this)."""
    from safeprune.io.datapaths import data_root

    rows = list(csv.DictReader(open(data_root() / "advbench" / "harmful_behaviors.csv", encoding="utf-8")))
    return [r["goal"] for r in random.Random(0).sample(rows, n)]


def save_record(out: str | Path, rec: dict, printed: dict) -> None:
    """``rec`` and the machine it ran on (CPU count, platform, torch) as JSON to ``out``; ``printed`` printed."""
    import torch

    rec = {**rec, "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(printed, indent=1))


def write_record(a: argparse.Namespace, cases: dict, **extra) -> None:
    """The benchmark's record (its options, the cases, the machine) to ``a.out``; the cases printed."""
    rec = {
        "model": "$SAFEPRUNE_TESTBED_MODELS/aligned",
        "n_prompts": a.n,
        "max_new_tokens": a.max_new_tokens,
        "cases": cases,
        **extra,
    }
    save_record(a.out, rec, cases)


def main() -> None:
    a = parse_args("torch_settings.json")

    import torch

    from safeprune.eval.backends import GenSettings, HFBackend
    from safeprune.eval.judges import KeywordJudge

    prompts = advbench_prompts(a.n)
    s = GenSettings(max_new_tokens=a.max_new_tokens, batch_size=a.n)
    judge = KeywordJudge()
    fp32 = HFBackend(a.model, threads=1)
    bf16 = HFBackend(a.model, dtype="bfloat16", threads=1)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def cont(be, threads=1):
        def f():
            torch.set_num_threads(threads)
            be.loop = "continuous"
            return be.generate(prompts, None, s)

        return f

    def gen(be, **kw):
        def f():
            torch.set_num_threads(1)
            be.loop = "generate"
            enc = be.tokenizer(
                [be.render(p, s) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.inference_mode():
                return be.model.generate(
                    **enc,
                    max_new_tokens=a.max_new_tokens,
                    do_sample=False,
                    pad_token_id=be.tokenizer.pad_token_id,
                    **kw,
                )

        return f

    cases = {
        "fp32, 1 thread (default)": cont(fp32),
        "fp32, 2 threads": cont(fp32, 2),
        "bf16, 1 thread": cont(bf16),
        "generate, dynamic cache": gen(fp32),
        "generate, static cache": gen(fp32, cache_implementation="static"),
    }
    for f in cases.values():  # warm-up (kernels, first static cache allocation)
        try:
            f()
        except Exception as e:  # noqa: BLE001 - a setting that does not run is reported, not fatal
            print("warm-up failed:", type(e).__name__, str(e)[:200])
    res: dict = {}
    outs: dict = {}
    for _ in range(2):
        for name, f in cases.items():
            try:
                dt, out = timed(f)
            except Exception as e:  # noqa: BLE001
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            if name not in res or dt < res[name]["seconds"]:
                res[name] = {"seconds": dt, "loadavg": os.getloadavg()}
                outs[name] = out
            print(f"{name}: {dt:.1f} s", flush=True)
    base = res["fp32, 1 thread (default)"]["seconds"]
    for name, r in res.items():
        if "seconds" in r:
            r["speed_vs_default"] = base / r["seconds"]
    ref = outs["fp32, 1 thread (default)"]
    b = outs["bf16, 1 thread"]
    res["bf16, 1 thread"]["same_text_as_fp32"] = sum(x.text == y.text for x, y in zip(b, ref))
    res["bf16, 1 thread"]["same_verdict_as_fp32"] = sum(
        judge.refused(x.text) == judge.refused(y.text) for x, y in zip(b, ref)
    )
    write_record(a, res)


if __name__ == "__main__":
    main()
