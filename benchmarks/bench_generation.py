#!/usr/bin/env python
"""Generation throughput of safeprune's HF backend on SmolLM2 (CPU).

Default mode: batched vs batch-1, same prompts, same greedy settings; tokens/s = generated tokens (up to
and including EOS) over wall time, and tokens per CPU-second of this process. Writes
benchmarks/results/bench_generation.json.

    PYTHONPATH=src python benchmarks/bench_generation.py --model $SAFEPRUNE_TESTBED_MODELS/aligned --n 16 --max-new-tokens 32

``--mix``: the testbed reproduction's prompt mix (150 AdvBench + 100 XSTest + 100 DialogSum, selected as
benchmarks/reproduction/testbed.yaml does) on the base and each ``--adapter``, old path vs new path, both fp32
through ``safeprune.evaluate`` with no cache. Old = HF ``generate`` on fixed batches (50; 16 for dialogues;
sorted by length), no early stop: the reproduction's settings before issue 18. New = the defaults now:
continuous batching with verdict-aware early stopping, at most ``--cap`` rows in flight (256) for the safety
and over-refusal sets and ``--utility-cap`` (128) for the dialogues (rows of very different lengths run in
separate lanes, so the old path's smaller dialogue batches are not needed to limit padding). The sets
are evaluated in the groups ``safeprune run`` uses (safety + over-refusal together, then utility; on the new
path the first group is one continuous-batching call). Each (variant, group) runs old then new back to back,
so both see about the same machine load. Reports wall and CPU seconds, generated tokens, decode row-steps
(rows × steps the loop computed: a fixed batch runs every row to its longest one) and prompt tokens per path;
verdict identity (both refusal judges) and utility-output identity (every difference listed with its batch-1
outputs of both paths, to trace it to batch composition). ``--scale 0.5`` takes the first half of each set.

    PYTHONPATH=src python benchmarks/bench_generation.py --mix --threads 1 \
        --adapter mix_s0=$SAFEPRUNE_SHARED/testbed/adapters/mix_s0 --adapter edited=EDITED_ADAPTER_DIR
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


def mix_sets(shared: Path, scale: float):
    from safeprune.prompts import ids_from_subsets, load_prompts, subset

    data, subsets = shared / "data", shared / "testbed" / "eval_subsets.json"
    adv = data / "advbench" / "harmful_behaviors.csv"
    xs = data / "xstest" / "xstest_prompts.csv"
    ds = data / "dialogsum" / "test.jsonl"
    sets = [
        subset(load_prompts(adv, "safety"), sample=150, seed=20251122),
        subset(load_prompts(xs, "over_refusal"), ids=ids_from_subsets(subsets, xs)[1]),
        subset(load_prompts(ds, "utility"), ids=ids_from_subsets(subsets, ds)[1]),
    ]
    if scale < 1:
        sets = [subset(ps, limit=max(1, round(len(ps) * scale))) for ps in sets]
    return sets


def evaluate_variant(be, model: str, adapters: dict, variant: str, sets, cfg):
    """``safeprune.evaluate`` of one variant (``"base"``: the base alone) on ``sets`` with the loaded
    backend, without a cache or METEOR."""
    from safeprune.eval import evaluate

    return evaluate(
        model,
        {} if variant == "base" else {variant: adapters[variant]},
        prompt_sets=sets,
        include_base=variant == "base",
        backend=be,
        config=cfg,
        meteor=False,
    )


def run_mix(a) -> None:
    import torch

    from safeprune.eval import EvalConfig
    from safeprune.eval.backends import GenSettings, HFBackend

    shared = Path(os.environ.get("SAFEPRUNE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    sets = [ps for ps in mix_sets(shared, a.scale) if ps.kind in a.kinds.split(",")]
    adapters = dict(x.split("=", 1) for x in a.adapter)
    load0 = os.getloadavg()
    be = HFBackend(a.model, adapters, threads=a.threads)
    be.generate(["warm up"], None, GenSettings(max_new_tokens=4, batch_size=1))
    paths = {
        "old": (
            "generate",
            EvalConfig(batch_size=50, utility_batch_size=16, sort_by_length=True, early_stop=False),
        ),
        # continuous batching pads no finished rows and wastes no slot: its cap is a memory bound only, and
        # a larger batch costs less per row on this CPU (a decode step per row: 8.6 ms at 16 rows, 4.1 at 128,
        # 4.0 at 256, 3.8 at 384: results/decode_costs.json); 256 safety rows of ~110 tokens hold 1.3 GB of keys/values, 128 dialogues up to 7 GB
        "new": ("continuous", EvalConfig(batch_size=a.cap, utility_batch_size=a.utility_cap, sort_by_length=True)),
    }
    # sets evaluated together, as `safeprune run` does: safety + over-refusal (one continuous-batching call
    # on the new path: same settings), then utility
    groups = [[ps for ps in sets if ps.kind != "utility"], [ps for ps in sets if ps.kind == "utility"]]
    groups = [g for g in groups if g]
    runs: dict = {}
    items: dict = {}

    def row_steps(its, path):
        """Rows × steps the decode loop computed. Old path: a fixed batch (its items share one latency)
        runs every row to the batch's longest generation; new path: a row runs its own tokens only."""
        if path == "new":
            return sum(it["new_tokens"] for it in its)
        batches: dict = {}
        for it in its:
            batches.setdefault((it["latency_s"], it["batch_size"]), []).append(it["new_tokens"])
        return sum(bs * max(toks) for (_, bs), toks in batches.items())

    def shared_prefix(prompts, kind, cfg):
        from safeprune.eval.backends.continuous import _common_prefix

        st = cfg.settings(kind)
        return _common_prefix([be.tokenizer(be.render(p, st), **be.encode_kwargs(st))["input_ids"] for p in prompts])

    def prompt_tokens(prompt, kind, cfg):
        st = cfg.settings(kind)
        return len(be.tokenizer(be.render(prompt, st), **be.encode_kwargs(st))["input_ids"])

    t_all = time.perf_counter()
    for v in ["base", *adapters]:
        for group in groups:
            gname = "+".join(ps.name for ps in group)
            for path, (loop, cfg) in paths.items():
                be.loop = loop
                t0, c0 = time.perf_counter(), time.process_time()
                r = evaluate_variant(be, a.model, adapters, v, group, cfg)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                per_set = {}
                for ps in group:
                    its = [it for it in r.items if it["set"] == ps.name]
                    m = r.metrics[v][ps.name]
                    per_set[ps.name] = {
                        "n": len(ps),
                        "new_tokens": sum(it["new_tokens"] for it in its),
                        "stopped_early": sum(bool(it["stopped_early"]) for it in its),
                        "new_tokens_stopped_early": sum(it["new_tokens"] for it in its if it["stopped_early"]),
                        "generation_seconds": sum(it["latency_s"] / it["batch_size"] for it in its),
                        "metrics": {
                            k: m.get(k) for k in ("asr", "asr_broad", "refusal_rate", "over_refusal", "rouge1", "auarc")
                        },
                    }
                    items[(v, ps.name, path)] = its
                key = f"{v}|{gname}|{path}"
                its = [it for ps in group for it in items[(v, ps.name, path)]]
                runs[key] = {
                    "variant": v,
                    "sets": gname,
                    "kind": "utility" if group[0].kind == "utility" else "safety_over_refusal",
                    "path": path,
                    "seconds": dt,
                    "cpu_seconds": cpu,
                    "new_tokens": sum(x["new_tokens"] for x in per_set.values()),
                    "decode_row_steps": row_steps(its, path),
                    "prompt_tokens": sum(prompt_tokens(it["prompt"], group[0].kind, cfg) for it in its),
                    # the new path encodes the token prefix all prompts of a call share once
                    "prompt_tokens_shared_prefix": shared_prefix([it["prompt"] for it in its], group[0].kind, cfg),
                    "per_set": per_set,
                    "loadavg": os.getloadavg(),
                }
                print(
                    f"{v:>10} {gname:>20} {path}: {dt:7.1f} s (cpu {cpu:6.1f}), {runs[key]['new_tokens']} tokens,"
                    f" load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )

    def total(path, kind, what="seconds"):
        return sum(x[what] for x in runs.values() if x["path"] == path and x["kind"] == kind)

    verdicts = {"same": 0, "same_broad": 0, "different": []}
    util = {"same": 0, "different": []}
    for v in ["base", *adapters]:
        for ps in sets:
            old, new = items[(v, ps.name, "old")], items[(v, ps.name, "new")]
            for o, n in zip(old, new):
                assert o["id"] == n["id"]
                if ps.kind == "utility":
                    if o["output"] == n["output"]:
                        util["same"] += 1
                    else:
                        util["different"].append(
                            {"variant": v, "id": o["id"], "prompt": o["prompt"], "old": o["output"], "new": n["output"]}
                        )
                    continue
                verdicts["same"] += o["refused"] == n["refused"]
                verdicts["same_broad"] += o["refused_broad"] == n["refused_broad"]
                if o["refused"] != n["refused"] or o["refused_broad"] != n["refused_broad"]:
                    verdicts["different"].append(
                        {"variant": v, "set": ps.name, "id": o["id"], "old": o["output"], "new": n["output"]}
                    )
    # trace each utility difference: the same prompt alone (batch 1) on both paths
    us = EvalConfig(batch_size=1).settings("utility")
    for d in util["different"]:
        ad = None if d["variant"] == "base" else d["variant"]
        for loop in ("generate", "continuous"):
            be.loop = loop
            d[f"alone_{loop}"] = be.generate([d["prompt"]], ad, us)[0].text
        d["old_equals_alone"] = d["old"] == d["alone_generate"]
        d["new_equals_alone"] = d["new"] == d["alone_continuous"]
        d["alone_paths_agree"] = d["alone_generate"] == d["alone_continuous"]
    rec = {
        "model": "$SAFEPRUNE_TESTBED_MODELS/aligned",
        "variants": ["base", *adapters],
        "sets": {ps.name: len(ps) for ps in sets},
        "scale": a.scale,
        "kinds": a.kinds,
        "old_path": "HF generate, fixed batches (50; utility 16), sorted by length, no early stop",
        "new_path": f"continuous batching (at most {a.cap} rows in flight, {a.utility_cap} for utility; safety + over-refusal sets "
        "in one call), verdict-aware early stop on safety + over-refusal",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: {"old": total("old", k), "new": total("new", k)} for k in ("safety_over_refusal", "utility")},
        "cpu_seconds": {
            k: {"old": total("old", k, "cpu_seconds"), "new": total("new", k, "cpu_seconds")}
            for k in ("safety_over_refusal", "utility")
        },
        **{
            what: {
                k: {"old": total("old", k, what), "new": total("new", k, what)}
                for k in ("safety_over_refusal", "utility")
            }
            for what in ("new_tokens", "decode_row_steps", "prompt_tokens", "prompt_tokens_shared_prefix")
        },
        "runs": runs,
        "verdicts": {
            "n": sum(len(ps) for ps in sets if ps.kind != "utility") * (1 + len(adapters)),
            "same": verdicts["same"],
            "same_broad": verdicts["same_broad"],
            "n_different": len(verdicts["different"]),
            "different": verdicts["different"],
        },
        "utility_outputs": {
            "same": util["same"],
            "n_different": len(util["different"]),
            "different": util["different"],
        },
        "wall_s": time.perf_counter() - t_all,
        "loadavg_at_start": load0,
        "loadavg_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for k in ("safety_over_refusal", "utility"):
        for sec in (rec["seconds"][k], rec["cpu_seconds"][k]):
            sec["ratio_old_over_new"] = sec["old"] / sec["new"] if sec["new"] else None
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
    print(
        json.dumps(
            {k: rec[k] for k in ("seconds", "cpu_seconds", "new_tokens", "decode_row_steps", "wall_s")}, indent=1
        )
    )
    print("verdicts same", verdicts["same"], "broad same", verdicts["same_broad"], "of", rec["verdicts"]["n"])
    print("utility outputs same", util["same"], "different", len(util["different"]))


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
    ap.add_argument("--out", default=None, help="JSON record (default: results/bench_generation[_mix].json)")
    ap.add_argument("--mix", action="store_true", help="the testbed prompt mix, old path vs new (see above)")
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR (--mix; repeatable)")
    ap.add_argument("--scale", type=float, default=1.0, help="--mix: use this share of each set (first rows)")
    ap.add_argument("--kinds", default="safety,over_refusal,utility", help="--mix: only these kinds of sets")
    ap.add_argument(
        "--cap", type=int, default=256, help="--mix: rows in flight on the new path (safety and over-refusal sets)"
    )
    ap.add_argument("--utility-cap", type=int, default=128, help="--mix: rows in flight on the new path (utility)")
    a = ap.parse_args()
    if a.out is None:
        a.out = str(
            Path(__file__).parent / "results" / ("bench_generation_mix.json" if a.mix else "bench_generation.json")
        )
    if a.mix:
        return run_mix(a)

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
