#!/usr/bin/env python
"""Unmerged inference speed of a pruned adapter: base vs base+adapter vs base+pruned adapter (PEFT, CPU).

Greedy generation of a fixed number of new tokens (EOS disabled) at batch 1 and batch 16 on a local HF model
directory; tokens/s = batch·new_tokens / wall seconds, median of ``--repeats`` rounds after one warm-up, the
variants timed round-robin within each round so load drift on a shared machine hits them alike. Each
adapter is loaded unmerged with ``PeftModel.from_pretrained`` (the serving setting where LoRA costs extra
matmuls per module), so removing modules removes work. Also prints what vLLM would load for each adapter:
LoRA modules, their rank and the bytes of adapter_model.safetensors.

    python benchmarks/bench_inference.py --base $SAFEPRUNE_TESTBED_MODELS/aligned \\
        --adapter full=../shared/testbed/adapters/mix_s0 \\
        --adapter ddi10=/tmp/mix_s0_ddi10 --adapter ddi60=/tmp/mix_s0_ddi60

Not run in CI (needs a real model directory).
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

HERE = Path(__file__).resolve().parent

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines train the immune system.",
    "List three tips for learning a new language.",
    "What is the capital of Australia and why was it chosen?",
    "Summarise the plot of a detective novel in two sentences.",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
]


def vllm_summary(adapter: Path) -> dict:
    """What vLLM would load: the LoRA tensors present in adapter_model.safetensors (vLLM treats the file's
    keys as the truth; absent modules get no delta) and their bytes."""
    from safetensors import safe_open

    f = adapter / "adapter_model.safetensors"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    mods, params = set(), 0
    with safe_open(str(f), framework="pt") as h:
        for k in h.keys():
            if ".lora_A." in k or ".lora_B." in k:
                mods.add(k.split(".lora_")[0])
                params += h.get_slice(k).get_shape()[0] * h.get_slice(k).get_shape()[1]
    return {
        "lora_modules": len(mods),
        "lora_params": params,
        "file_bytes": f.stat().st_size,
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "target_modules_entries": len(cfg.get("target_modules") or []),
    }


def bench_round_robin(models: dict, tok, batch: int, new_tokens: int, repeats: int) -> dict:
    """Time every variant once per round, ``repeats`` rounds, so that load drift on a shared machine hits
    all variants alike. Returns {variant: stats}."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    times: dict[str, list[float]] = {k: [] for k in models}
    loads: list[float] = []
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        for _ in range(repeats):
            loads.append(round(os.getloadavg()[0], 2))
            for name, model in models.items():
                t0 = time.perf_counter()
                out = model.generate(**enc, **kw)
                times[name].append(time.perf_counter() - t0)
                assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"seconds": ts, "median_s": med, "tokens_per_s": batch * new_tokens / med, "loads": loads}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="inference")
    a = ap.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.base)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches = [int(b) for b in a.batches.split(",")]
    variants = [("base", None)] + [tuple(s.split("=", 1)) for s in a.adapter]
    models, results = {}, []
    for name, adir in variants:
        model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()
        info: dict = {"variant": name, "adapter": adir}
        if adir:
            model = PeftModel.from_pretrained(model, adir).eval()  # unmerged
            info["vllm"] = vllm_summary(Path(adir))
            info["peft_lora_layers"] = sum(
                1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0
            )
        models[name] = model
        results.append(info)
    for b in batches:
        rr = bench_round_robin(models, tok, b, a.new_tokens, a.repeats)
        for info in results:
            r = info[f"batch{b}"] = rr[info["variant"]]
            print(
                f"{info['variant']:10s} batch {b:2d}: {r['tokens_per_s']:8.1f} tok/s  (median {r['median_s']:.2f} s, "
                f"loads {r['loads']})",
                flush=True,
            )
    base_tps = {b: results[0][f"batch{b}"]["tokens_per_s"] for b in batches}
    full = next((r for r in results if r["variant"] != "base"), None)
    L = [
        "# Unmerged inference speed (PEFT, CPU)",
        "",
        f"Command: `python {os.path.relpath(__file__)} {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, {a.threads} "
        f"thread(s); greedy, {a.new_tokens} new tokens, median of {a.repeats} rounds (variants timed "
        f"round-robin)",
        "",
        "| variant | LoRA modules | adapter bytes | "
        + " | ".join(f"tok/s b={b} | vs base | vs full adapter" for b in batches)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(batches),
    ]
    for r in results:
        v = r.get("vllm", {})
        cells = []
        for b in batches:
            tps = r[f"batch{b}"]["tokens_per_s"]
            ff = full[f"batch{b}"]["tokens_per_s"] if full else None
            cells.append(
                f"{tps:.1f} | {tps / base_tps[b]:.3f} | " + (f"{tps / ff:.3f}" if ff and r["adapter"] else "-")
            )
        L.append(
            f"| {r['variant']} | {v.get('lora_modules', 0)} | {v.get('file_bytes', 0):,} | " + " | ".join(cells) + " |"
        )
    L += [
        "",
        "LoRA modules / bytes = what vLLM would load from adapter_model.safetensors (it takes the file's "
        "keys as the truth; absent modules get no delta). Load averages per measurement are in the JSON.",
    ]
    md = "\n".join(L) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.tag}.json").write_text(json.dumps({"command": L[2], "results": results}, indent=2))
    (out / f"{a.tag}.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
