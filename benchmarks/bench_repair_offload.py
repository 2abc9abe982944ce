#!/usr/bin/env python
"""``safeprune repair --offload disk`` at Llama-2-7B shapes: the fit's memory against the number of layers
(issue 13: "memory independent of the layer count").

With activation checkpointing (``--checkpoint``) each decoder layer keeps only its input hidden state for the
backward pass, so what the fit holds above the loaded model grows by one hidden state (tokens × 4096 floats)
per layer. ``--offload disk`` writes those inputs to temporary files during the forward pass and reads each back
when its layer is recomputed. This benchmark builds the same synthetic bases and adapters as
``bench_repair_scale.py`` (its fit-step worker, each run in its own subprocess) and measures one fit step,
checkpointed without and with offloading: step time, the private-memory peak during the step above the
loaded model (RssAnon, sampled every 2 ms) and a digest of the gate gradients (equal digests: bit-identical).

    python benchmarks/bench_repair_offload.py --layers 1,2,4,8 --batch 4 --prompt-tokens 248
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

BENCH = HERE / "bench_repair_scale.py"  # its "fit" worker


def _peak(fit: dict) -> float:
    """The step's memory peak above the loaded model: GPU memory on a GPU, private host memory on the CPU."""
    return fit.get("gpu_step_peak_above_loaded_mb", fit["step_private_peak_above_loaded_mb"])


def fit_line(rows: list[dict], kind: str) -> tuple[float, float]:
    """Least-squares intercept and slope (MB per layer) of the step's memory peak above the loaded model."""
    xs = [r["layers"] for r in rows]
    ys = [_peak(r[kind]) for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def render(res: dict) -> str:
    rows, off = res["rows"], res.get("offload", "disk")
    tok = rows[0]["none"]["tokens_per_step"] if rows else 0
    mem = "GPU memory" if res.get("device", "cpu").startswith("cuda") else "private memory"
    hidden_mb = tok * res["hidden"] * 4 / 2**20
    out = [
        f"# `safeprune repair --offload {off}`: the fit's memory against the number of layers",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}; {res['machine']}; load average samples {res['load_average_samples']}; whole run "
        f"{res['seconds'] / 60:.1f} min. Shapes: {res['spec']} with 1..n layers, q/k/v/o adapter r = 8, "
        f"{tok} tokens per step (one layer input = {hidden_mb:.0f} MB in float32); device {res.get('device', 'cpu')}; "
        "one torch thread; each fit in its own subprocess (glibc `MALLOC_MMAP_THRESHOLD_="
        f"{res.get('malloc_mmap_threshold')}`). Both columns are checkpointed (`--checkpoint`); the second adds "
        f"`--offload {off}`.",
        "",
        f"| layers | fp32 weights MB | step wall s checkpointed | with --offload {off} | ratio | step {mem} peak "
        f"above the loaded model MB checkpointed | with --offload {off} | gate gradients identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["none"], r[off]
        same = "yes" if a["gate_grads_sha256"] == b["gate_grads_sha256"] else "**no**"
        out.append(
            f"| {r['layers']} | {a['weights_fp32_mb']:.0f} | {a['step_wall_s']:.2f} | {b['step_wall_s']:.2f} | "
            f"{b['step_wall_s'] / a['step_wall_s']:.2f} | {_peak(a):.0f} | {_peak(b):.0f} | {same} |"
        )
    if len(rows) >= 2:
        out.append("")
        for kind, label in (("none", "checkpointed"), ("disk", "checkpointed + --offload disk")):
            c, s = fit_line(rows, kind)
            out.append(
                f"Step private peak above the loaded model, {label}: ≈ {c:.0f} {s:+.1f} MB · layers (least squares)."
            )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--render":
        path = Path(sys.argv[2])
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    import synth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,4,8")
    ap.add_argument("--tiny", action="store_true", help="hidden-64 smoke run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=248)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the fit step runs (cpu, cuda)")
    ap.add_argument(
        "--offload", default=None, help="the offload to compare with none (default: disk on the CPU, cpu on a GPU)"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "repair_offload")
    a = ap.parse_args()
    # glibc raises its mmap threshold after a large free, after which freed tensors stay in the heap and the
    # process's RssAnon no longer follows what is alive (seen: ±250 MB between otherwise equal runs). A fixed
    # threshold (which also turns the adjustment off) maps every tensor of 128 KiB or more on its own, so the
    # private-memory peak measures the live tensors. Set for the workers of both columns alike.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    off = a.offload or ("disk" if a.device == "cpu" else "cpu")
    spec0 = synth.TINY if a.tiny else synth.LLAMA2_7B
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_offload_"))
    t_start, loads, rows = time.time(), [os.getloadavg()[0]], []

    def save() -> dict:
        res = {
            "command": "python benchmarks/bench_repair_offload.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
            "load_average_samples": [round(x, 2) for x in loads],
            "spec": spec0.name,
            "device": a.device,
            "offload": off,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "hidden": spec0.hidden,
            "rows": rows,
            "seconds": round(time.time() - t_start, 1),
        }
        return synth.write_results(a.out, res, render)

    for L in (int(x) for x in a.layers.split(",")):
        spec, base, adapter = synth.layered_models(work, spec0, L)
        row = {"layers": L}
        for kind in ("none", off):
            args = {"adapter": str(adapter), "base": str(base), "batch": a.batch, "prompt_tokens": a.prompt_tokens}
            args.update(steps=a.steps, checkpoint=True, offload=kind, device=a.device)
            row[kind] = synth.run_worker(BENCH, "fit", args)
            loads.append(os.getloadavg()[0])
        rows.append(row)
        print(
            f"{spec.name}: step peak above loaded {_peak(row['none']):.0f} MB checkpointed, "
            f"{_peak(row[off]):.0f} MB with --offload {off}",
            flush=True,
        )
        save()
    print(render(save()))


if __name__ == "__main__":
    main()
