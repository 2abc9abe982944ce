#!/usr/bin/env python
"""torch.compile on the continuous generation loop (issue 18, item 3): does it make fp32 CPU generation faster?

Two ways, each against the eager loop on the same prompts (the testbed's aligned model, N AdvBench prompts,
greedy, ``max_new_tokens``, one thread, no early stop):

* the whole causal-LM ``forward`` compiled with ``dynamic=True`` (batch and cache length change every step);
* only the decoder layers' MLP and RMSNorm modules compiled (pure functions of their input: no KV cache inside,
  so the fusible elementwise work — SiLU·up, the norms — is what inductor gets).

The eager loop runs twice and each compiled variant three times (the first includes compiling); the fastest
steady-state run is kept. Texts are compared with eager's.

    PYTHONPATH=src python benchmarks/bench_compile.py --n 16 --max-new-tokens 32
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torch_settings import advbench_prompts, parse_args, write_record  # noqa: E402


def main() -> None:
    a = parse_args("compile.json")

    import torch

    from safeprune.eval.backends import GenSettings, HFBackend

    torch.set_num_threads(1)
    prompts = advbench_prompts(a.n)
    s = GenSettings(max_new_tokens=a.max_new_tokens, batch_size=a.n)

    def runs(be, k: int) -> tuple[list[float], list]:
        times, out = [], None
        for _ in range(k):
            t0 = time.perf_counter()
            out = be.generate(prompts, None, s)
            times.append(time.perf_counter() - t0)
        return times, out

    res: dict = {}
    eager = HFBackend(a.model, threads=1)
    eager.loop = "continuous"
    t_eager, ref = runs(eager, 2)
    res["eager"] = {"seconds": t_eager, "best_s": min(t_eager)}

    whole = HFBackend(a.model, threads=1)
    whole.loop = "continuous"
    whole.model.forward = torch.compile(whole.model.forward, dynamic=True)
    try:
        t, out = runs(whole, 3)
        res["whole forward, dynamic"] = {
            "seconds": t,
            "best_s": min(t[1:]),
            "same_text": sum(x.text == y.text for x, y in zip(out, ref)),
        }
    except Exception as e:  # noqa: BLE001 - a setting that does not run is reported
        lines = str(e).strip().splitlines() or [""]
        cause = next((x for x in lines if "Error:" in x), lines[0])  # inductor wraps the real error
        res["whole forward, dynamic"] = {"error": f"{type(e).__name__}: {cause.strip()[:300]}"}

    part = HFBackend(a.model, threads=1)
    part.loop = "continuous"
    n = 0
    for _, mod in part.model.named_modules():
        if type(mod).__name__.endswith(("MLP", "RMSNorm")):
            mod.forward = torch.compile(mod.forward, dynamic=True)
            n += 1
    t, out = runs(part, 3)
    res["MLP + RMSNorm modules"] = {
        "modules": n,
        "seconds": t,
        "best_s": min(t[1:]),
        "same_text": sum(x.text == y.text for x, y in zip(out, ref)),
    }
    for r in res.values():
        if "best_s" in r:
            r["speed_vs_eager"] = res["eager"]["best_s"] / r["best_s"]
    write_record(a, res, loadavg=os.getloadavg())


if __name__ == "__main__":
    main()
