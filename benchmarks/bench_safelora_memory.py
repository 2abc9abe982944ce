"""Peak memory and time of SafeLoRA scoring: safeprune's low-rank path vs the official d×d approach.

    PYTHONPATH=src python benchmarks/bench_safelora_memory.py \
        --adapter ../shared/testbed/adapters/mix_s0 --aligned $SAFEPRUNE_TESTBED_MODELS/aligned --unaligned $SAFEPRUNE_TESTBED_MODELS/unaligned

Each approach runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own:

* ``ours``: ``safeprune.scoring.scan(adapter, method="safelora", aligned=..., unaligned=...)`` — weights read lazily
  per module, C·B = V(VᵀB)/‖V‖_F in row blocks, cosine from r×r Grams.
* ``official``: what IBM/SafeLoRA ``model.py`` does: both models loaded whole with
  ``AutoModelForCausalLM.from_pretrained`` (float32, CPU), one dense C = VVᵀ/‖V‖_F (out×out) kept per
  targeted weight, then per module fW = (C·B)·A, ori = B·A and the cosine of the flattened matrices (rounded
  to 5 decimals, as the original). The original also holds the PEFT model and a deepcopy of it; those are
  left out here, which favours the official approach.

Reported: wall time of the work (imports excluded), peak RSS, the RSS right after imports (baseline), peak
minus baseline, and the agreement of the two cosine lists and top-10 lists. Results go to
benchmarks/results/safelora_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class AnonSampler:
    """Peak RssAnon (private, non-file-backed memory) sampled every 2 ms in a background thread.

    ru_maxrss also counts the clean, reclaimable pages of mmap'd safetensors files that were touched;
    RssAnon is the memory the process really owns (tensors it allocated)."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def anon_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.anon_mb())
            self._stop.wait(0.002)

    def __enter__(self):
        self.base = self.anon_mb()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.anon_mb())


def run_ours(args) -> dict:
    import torch

    import safeprune

    torch.set_num_threads(args.threads)

    ad = safeprune.load_adapter(args.adapter)
    base_rss = _rss_mb()
    with AnonSampler() as anon:
        t0 = time.perf_counter()
        table = safeprune.scoring.scan(ad, None, "safelora", aligned=args.aligned, unaligned=args.unaligned)
        dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "baseline_rss_mb": base_rss,
        "peak_rss_mb": _peak_mb(),
        "baseline_anon_mb": anon.base,
        "peak_anon_mb": anon.peak,
        "cos": {r["module"]: r["cos"] for r in table.rows},
    }


def run_official(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import safeprune

    torch.set_num_threads(args.threads)

    ad = safeprune.load_adapter(args.adapter)
    base_rss = _rss_mb()
    anon = AnonSampler().__enter__()
    t0 = time.perf_counter()
    unaligned = AutoModelForCausalLM.from_pretrained(args.unaligned, dtype=torch.float32, device_map="cpu")
    aligned = AutoModelForCausalLM.from_pretrained(args.aligned, dtype=torch.float32, device_map="cpu")
    pa = dict(aligned.named_parameters())
    pu = dict(unaligned.named_parameters())
    C = {}
    with torch.no_grad():
        for m in ad:  # exact module match (the original matches substrings of target_modules)
            key = m.name + ".weight"
            V = pa[key] - pu[key]
            C[m.name] = torch.mm(V, V.t()) / torch.norm(V)  # out×out, kept for every module as the original
        cos = {}
        for m in ad:
            B, A = m.lora_B.float(), m.lora_A.float()
            fW = torch.mm(torch.mm(C[m.name], B), A)
            ori = torch.mm(B, A)
            c = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item()
            cos[m.name] = round(c, 5)
    dt = time.perf_counter() - t0
    anon.__exit__(None, None, None)
    c_bytes = sum(c.numel() * c.element_size() for c in C.values())
    return {
        "seconds": dt,
        "baseline_rss_mb": base_rss,
        "peak_rss_mb": _peak_mb(),
        "cos": cos,
        "baseline_anon_mb": anon.base,
        "peak_anon_mb": anon.peak,
        "C_matrices_mb": c_bytes / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="../shared/testbed/adapters/mix_s0")
    ap.add_argument(
        "--aligned", default=os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "aligned")
    )
    ap.add_argument(
        "--unaligned", default=os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "unaligned")
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both approaches (default 1: on a shared, loaded machine "
        "multi-threaded small matmuls are dominated by thread contention)",
    )
    ap.add_argument("--run", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        res = run_ours(args) if args.run == "ours" else run_official(args)
        print("RESULT " + json.dumps(res))
        return

    results = {}
    for which in ("ours", "official"):
        cmd = [
            sys.executable,
            __file__,
            "--run",
            which,
            "--adapter",
            args.adapter,
            "--aligned",
            args.aligned,
            "--unaligned",
            args.unaligned,
            "--threads",
            str(args.threads),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if p.returncode != 0:
            sys.exit(f"{which} failed:\n{p.stderr[-3000:]}")
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results[which] = json.loads(line[len("RESULT ") :])
    o, f = results["ours"], results["official"]
    diffs = [abs(o["cos"][k] - f["cos"][k]) for k in o["cos"]]
    top_o = [k for k, _ in sorted(o["cos"].items(), key=lambda kv: kv[1])[:10]]
    top_f = [k for k, _ in sorted(f["cos"].items(), key=lambda kv: kv[1])[:10]]
    summary = {
        "command": "PYTHONPATH=src python benchmarks/bench_safelora_memory.py --adapter "
        + args.adapter
        + f" --aligned {args.aligned} --unaligned {args.unaligned} --threads {args.threads}",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "modules": len(o["cos"]),
        "ours": {k: v for k, v in o.items() if k != "cos"},
        "official": {k: v for k, v in f.items() if k != "cos"},
        "peak_rss_ratio_official_over_ours": f["peak_rss_mb"] / o["peak_rss_mb"],
        "peak_above_baseline_ratio": (f["peak_rss_mb"] - f["baseline_rss_mb"])
        / max(1e-9, o["peak_rss_mb"] - o["baseline_rss_mb"]),
        "peak_anon_above_baseline_ratio": (f["peak_anon_mb"] - f["baseline_anon_mb"])
        / max(1e-9, o["peak_anon_mb"] - o["baseline_anon_mb"]),
        "time_ratio_official_over_ours": f["seconds"] / o["seconds"],
        "max_abs_cos_diff": max(diffs),
        "top10_overlap": len(set(top_o) & set(top_f)),
        "top10_ours": top_o,
        "top10_official": top_f,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "safelora_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [
        "# SafeLoRA scoring: peak memory and time, safeprune vs the official d×d approach",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']['cpus']} CPUs (shared with other jobs), Python {summary['machine']['python']}, "
        f"torch threads = {args.threads}; one run each, separate subprocesses.",
        "",
        "| approach | time (s) | peak RSS (MiB) | RSS after imports (MiB) | peak − baseline (MiB) "
        "| peak private (RssAnon) − baseline (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("safeprune (low-rank, lazy)", o), ("official (2 full models + dense C)", f)):
        md.append(
            f"| {name} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['peak_anon_mb'] - r['baseline_anon_mb']:.0f} |"
        )
    md += [
        "",
        f"- peak RSS ratio official/ours: **{summary['peak_rss_ratio_official_over_ours']:.2f}×** "
        f"(above the post-import baseline: **{summary['peak_above_baseline_ratio']:.1f}×**)",
        f"- private-memory (RssAnon) peak above baseline, official/ours: "
        f"**{summary['peak_anon_above_baseline_ratio']:.1f}×** (RSS also counts touched, reclaimable pages of "
        "the mmap'd safetensors files, which both approaches read)",
        f"- time ratio official/ours: **{summary['time_ratio_official_over_ours']:.2f}×**",
        f"- dense C matrices held by the official approach: {f['C_matrices_mb']:.0f} MiB",
        f"- max |cos_ours − cos_official| over {summary['modules']} modules: {summary['max_abs_cos_diff']:.2e} "
        "(official rounds to 5 decimals)",
        f"- top-10 (lowest cos) overlap: {summary['top10_overlap']}/10",
    ]
    (out / "safelora_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
