#!/usr/bin/env python
"""The float32 floor under the new generation path (issue 18): how fast the work of a ``bench_generation.py
--mix`` run could possibly go on this CPU, and so the largest old/new ratio any fp32 loop could reach.

The new path's work is matrix products. Each prompt token it encodes (after the shared prefix) and each
decode step of a row passes through every linear layer of the decoder (and the adapter's LoRA factors), and
each generated token needs one row of the output layer. This script counts those multiply-adds from the
model, measures what ``torch.mm`` reaches on this core at the loop's own shapes (best of several calls on
warm caches: 256 rows for decode steps, 1,536 for prefills; the output layer at 256 rows), and divides. Attention,
normalisations, activations and everything else are counted as free, so the floor is optimistic: no fp32 loop
can run the same work faster, and the ratio it gives is an upper bound.

    PYTHONPATH=src python benchmarks/bench_generation_floor.py \\
        --mix benchmarks/results/bench_generation_mix_fused.json \\
        --adapter mix_s0=$SAFEPRUNE_SHARED/testbed/adapters/mix_s0 --adapter mix_s0_rep=REPAIRED

writes benchmarks/results/generation_floor.json (next to the mix record by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_costs import best  # noqa: E402


def best_gflops(x, w, n: int = 8) -> float:
    """``x @ w.T`` into one output buffer at its best of ``n`` calls after one (warm caches: an upper bound on
    the rate in a loop); timed by ``bench_decode_costs.best``."""
    import torch

    out = torch.empty(x.shape[0], w.shape[0])
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / best(lambda: torch.mm(x, w.t(), out=out), n) / 1e9


def linear_shapes(model) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(out, in) of every linear layer of the decoder, and of the output layer."""
    import torch

    head = model.get_output_embeddings()
    shapes = [
        tuple(m.weight.shape)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and m.weight.dim() == 2
    ]
    return shapes, tuple(head.weight.shape)


def lora_flops(adapter: str) -> int:
    """Multiply-adds × 2 per token of the adapter's LoRA factors (A: r × in, B: out × r)."""
    from safetensors import safe_open

    d = Path(adapter)
    total = 0
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if "lora_A" in k or "lora_B" in k:
                total += 2 * f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    models = os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models")
    ap.add_argument("--mix", required=True, help="a bench_generation.py --mix record (JSON)")
    ap.add_argument("--model", default=os.path.join(models, "aligned"))
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR, the record's adapters")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rec = json.loads(Path(a.mix).read_text())
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    shapes, (vocab, hidden) = linear_shapes(model)
    layer_flops = sum(2 * o * i for o, i in shapes)
    head_flops = 2 * vocab * hidden
    extra = {"base": 0, **{k: lora_flops(v) for k, v in (x.split("=", 1) for x in a.adapter)}}

    rates: dict = {"decode_256_rows": {}, "prefill_1536_rows": {}}
    for o, i in sorted(set(shapes)):
        w = torch.randn(o, i) * 0.05
        rates["decode_256_rows"][f"{i}x{o}"] = best_gflops(torch.randn(256, i), w)
        rates["prefill_1536_rows"][f"{i}x{o}"] = best_gflops(torch.randn(1536, i), w)
    rates["head_256_rows"] = best_gflops(torch.randn(256, hidden), torch.randn(vocab, hidden) * 0.05, n=4)

    def layer_seconds(rows_key: str, positions: float, extra_flops: int) -> float:
        """Seconds for ``positions`` token positions through every decoder layer at the measured rates."""
        per = sum(2 * o * i / (rates[rows_key][f"{i}x{o}"] * 1e9) for o, i in shapes)
        best = max(rates[rows_key].values()) * 1e9
        return positions * (per + extra_flops / best)

    out: dict = {"runs": {}}
    old_total = new_total = floor_total = 0.0
    for run in rec["runs"].values():
        if run["path"] != "new" or run["kind"] != "safety_over_refusal":
            continue
        v = run["variant"]
        old = rec["runs"][f"{v}|{run['sets']}|old"]["seconds"]
        n = sum(s["n"] for s in run["per_set"].values())
        own = run["prompt_tokens"] - n * run["prompt_tokens_shared_prefix"]
        decode_positions = run["new_tokens"] - n  # a row's first token comes from its prefill
        floor = (
            layer_seconds("prefill_1536_rows", own, extra[v])
            + layer_seconds("decode_256_rows", decode_positions, extra[v])
            + run["new_tokens"] * head_flops / (rates["head_256_rows"] * 1e9)
        )
        out["runs"][v] = {
            "prompts": n,
            "own_prompt_tokens": own,
            "decode_positions": decode_positions,
            "new_tokens": run["new_tokens"],
            "floor_s": floor,
            "new_s": run["seconds"],
            "old_s": old,
            "new_over_floor": run["seconds"] / floor,
            "old_over_floor": old / floor,
        }
        old_total, new_total, floor_total = old_total + old, new_total + run["seconds"], floor_total + floor
        print(v, json.dumps(out["runs"][v]), flush=True)
    out.update(
        {
            "command": "PYTHONPATH=src python benchmarks/bench_generation_floor.py --mix " + a.mix,
            "mix_record": a.mix,
            "flops_per_position": {"decoder_layers": layer_flops, "lora": extra, "output_layer": head_flops},
            "gflops": rates,
            "safety_over_refusal": {
                "old_s": old_total,
                "new_s": new_total,
                "floor_s": floor_total,
                "measured_ratio": old_total / new_total if new_total else None,
                "largest_ratio_at_the_floor": old_total / floor_total if floor_total else None,
                "new_over_floor": new_total / floor_total if floor_total else None,
            },
            "torch_threads": 1,
            "loadavg": os.getloadavg(),
            "platform": platform.platform(),
        }
    )
    print(json.dumps(out["safety_over_refusal"], indent=1))
    dest = Path(a.out) if a.out else Path(a.mix).with_name("generation_floor.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
