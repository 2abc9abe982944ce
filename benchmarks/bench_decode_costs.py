#!/usr/bin/env python
"""What a continuous-batching step costs on SmolLM2-135M, one CPU thread, float32 (issue 18): the measurements
behind the loop's lanes, prefill sizes, 16-row token statistics and contiguous output-layer input, in one run.

* ``gemm``: ``torch.mm`` GFLOPS at 256 rows for the decoder's and the output layer's shapes (fp32, and bf16
  for comparison) — the floor every generation runs at;
* ``rows``: a decode step's cost per row at 16 … 384 rows (the aligned model + the mix_s0 adapter, ~50 cached
  columns) — why larger batches are cheaper per row;
* ``width``: a decode step's cost per row at 100 rows with 250 / 500 / 1,050 cached columns in the loop's
  in-place cache, and at 1 row — a padded column's cost and a forward pass's fixed cost, whose ratio the lane
  limit estimates (``lane_padding_limit``);
* ``choose``: the per-token NLL/entropy over 256 × 49,152 logits at once and in 16-row chunks (same bits);
* ``head``: the output layer on a prefill's strided last-position view vs a contiguous copy, 16 rows.

    PYTHONPATH=src python benchmarks/bench_decode_costs.py
writes benchmarks/results/decode_costs.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torch_settings import save_record  # noqa: E402


def best(f, n: int = 5) -> float:
    f()
    ts = []
    for _ in range(n):
        t0 = time.process_time()
        f()
        ts.append(time.process_time() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    models = os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models")
    shared = Path(os.environ.get("SAFEPRUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--model", default=os.path.join(models, "aligned"))
    ap.add_argument("--adapter", default=str(shared / "testbed" / "adapters" / "mix_s0"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_costs.json"))
    a = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    from safeprune.eval.backends.continuous import _choose, _Layer, lane_padding_limit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict = {"gemm_gflops_256_rows": {}, "rows": {}, "width_100_rows": {}}

    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 192), (576, 49152)):
        x, w = torch.randn(256, k), torch.randn(n, k)
        flop = 2 * 256 * k * n
        res["gemm_gflops_256_rows"][f"{k}x{n}"] = {
            "fp32": flop / best(lambda: x @ w.T) / 1e9,
            "bf16": flop / best(lambda: x.bfloat16() @ w.bfloat16().T) / 1e9,
        }

    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    cfg = base.config

    def step_cost(rows: int, width: int) -> float:
        """CPU seconds of one decode step over a cache of ``width`` columns in the loop's in-place layers."""
        layers = []
        for _ in range(cfg.num_hidden_layers):
            k = torch.randn(rows, cfg.num_key_value_heads, width, cfg.hidden_size // cfg.num_attention_heads) * 0.1
            la = _Layer()
            la.fill([k], [k.clone()], width)
            layers.append(la)
        cache = DynamicCache(config=cfg)
        cache.layers = layers
        mask = torch.ones(rows, width, dtype=torch.long)
        tok = torch.randint(0, 1000, (rows, 1))
        ts = []
        with torch.inference_mode():
            for _ in range(6):
                mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
                t0 = time.process_time()
                model(
                    input_ids=tok,
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    use_cache=True,
                    past_key_values=cache,
                )
                ts.append(time.process_time() - t0)
        return sum(ts[1:]) / 5

    for r in (16, 64, 128, 256, 384):
        res["rows"][r] = {"ms_per_row": 1000 * step_cost(r, 50) / r}
    for wd in (250, 500, 1050):
        res["width_100_rows"][wd] = {"ms_per_row": 1000 * step_cost(100, wd) / 100}
    fixed = step_cost(1, 250)
    per_col = (res["width_100_rows"][1050]["ms_per_row"] - res["width_100_rows"][250]["ms_per_row"]) / 1000 / 800
    res["forward_fixed_ms"] = 1000 * fixed
    res["padded_column_us_per_row"] = 1e6 * per_col
    res["measured_lane_limit"] = fixed / per_col
    res["lane_padding_limit"] = lane_padding_limit(model)

    logits = torch.randn(256, 49152) * 4
    whole, chunked = _choose(logits, chunk=256), _choose(logits, chunk=16)
    res["choose_256_rows_ms"] = {
        "at_once": 1000 * best(lambda: _choose(logits, chunk=256)),
        "16_row_chunks": 1000 * best(lambda: _choose(logits, chunk=16)),
        "same_bits": whole == chunked,
    }

    head = base.get_output_embeddings()
    strided = torch.randn(16, 30, cfg.hidden_size)[:, -1:, :]
    with torch.inference_mode():
        res["head_16_rows_ms"] = {
            "strided_view": 1000 * best(lambda: head(strided), 3),
            "contiguous": 1000 * best(lambda: head(strided.contiguous()), 3),
            "max_abs_difference": float((head(strided) - head(strided.contiguous())).abs().max()),
        }

    rec = {
        "command": "PYTHONPATH=src python benchmarks/bench_decode_costs.py",
        "model": "$SAFEPRUNE_TESTBED_MODELS/aligned + mix_s0",
        "torch_threads": 1,
        "timing": "CPU seconds of this process (best of 5, or the mean of 5 steps after one)",
        "loadavg": os.getloadavg(),
        **res,
    }
    save_record(a.out, rec, rec)


if __name__ == "__main__":
    main()
