#!/usr/bin/env python
"""Issue 18: the attention implementation of the continuous generation loop, sdpa (default) against eager,
A/B twice in one process on the same prompts (the first 160 of the testbed mix's AdvBench + XSTest sets, on
mix_s0, early stopping on, 128 rows in flight, fp32, 1 thread); CPU seconds of the process and whether the
texts are identical.

    python benchmarks/bench_attention.py [--model $SAFEPRUNE_TESTBED_MODELS/aligned] [--adapter DIR] [--n 160]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    import torch
    from bench_generation import mix_sets

    from safeprune.eval import EvalConfig, KeywordJudge
    from safeprune.eval.backends import GenSettings, HFBackend
    from safeprune.eval.evaluate import early_stop_plan, gen_settings
    from safeprune.eval.judges import PatternJudge

    models = Path(os.environ.get("SAFEPRUNE_TESTBED_MODELS", HERE.parents[1] / "models"))
    shared = Path(os.environ.get("SAFEPRUNE_SHARED", HERE.parents[1] / "shared"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(models / "aligned"))
    ap.add_argument("--adapter", default=str(shared / "testbed" / "adapters" / "mix_s0"))
    ap.add_argument("--n", type=int, default=160)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sets = [s for s in mix_sets(shared, 1.0) if s.kind != "utility"]
    be = HFBackend(a.model, {"ad": a.adapter}, threads=1)
    be.generate(["warm up"], None, GenSettings(max_new_tokens=4, batch_size=1))
    cfg = EvalConfig(batch_size=128, sort_by_length=True)
    judge, broad = KeywordJudge(), PatternJudge()
    st = gen_settings(cfg, "safety", judge, early_stop_plan(cfg, judge, [], broad)["enabled"], broad)
    prompts = [it.prompt for s in sets for it in s.items][: a.n]
    texts: dict[str, list[str]] = {}
    model = be.model.get_base_model() if hasattr(be.model, "get_base_model") else be.model
    for rep in range(2):
        for impl in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
            t0 = time.process_time()
            gens = be.generate(prompts, "ad", st)
            texts[impl] = [g.text for g in gens]
            print(
                f"round {rep + 1} {impl:>5}: {time.process_time() - t0:6.1f} CPU s, "
                f"{sum(g.new_tokens for g in gens)} tokens, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    same = sum(x == y for x, y in zip(texts["sdpa"], texts["eager"]))
    print(f"texts identical: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
