#!/usr/bin/env python
"""``safeprune repair`` at Llama-2-7B shapes: how its cost grows with the number of layers (issue 13).

Builds (synth.py) Llama-2-7B-shaped bases with ``--layers`` layers each (q/k/v/o 4096×4096, MLP 11008,
vocab 32000; bf16 shards) and a q/k/v/o PEFT adapter (r = 8) for each, then measures, each part in its own
subprocess (so its peak memory is its own):

  adapter side : what ``repair`` does to the adapter without the model — orthogonalise (QR + r×r SVD per
                 module), the per-component energies, the gates written into lora_B, the energy removed, and
                 a random control of the same energy. Wall/CPU time per module, peak private memory
                 (RssAnon) above its value after imports.
  fit step     : the model side — load the base in float32 with the adapter by PEFT, hook one gate vector
                 per module (``scoring.gates.ComponentGates``), and one optimiser step's forward + backward
                 (teacher-forced NLL of an 8-token target after ``--prompt-tokens`` random prompt tokens,
                 ``--batch`` items) giving ∂L/∂g for every component. Seconds per step (the fastest of
                 ``--steps``), peak RSS (loading included: transformers holds bf16 and float32 copies while
                 converting), and the private-memory peak during the steps above its value with the model
                 loaded (what the repair adds to holding the model: gates, activations, gradients).

Reported: per layer count, the time per module and the ratios between layer counts (linear in modules ⇔ the
time per module stays flat), and the memory columns. The model side cannot be independent of the layer
count: it runs the model, so it holds the weights (∝ layers) and the activations of one batch (∝ layers ×
tokens); the table shows how much of it is the repair's own.

    python benchmarks/bench_repair_scale.py --layers 1,2,4,8       # ~10 min on 2 loaded cores
    python benchmarks/bench_repair_scale.py --tiny                 # hidden-64 smoke run (seconds)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


# the memory probes of the SafeLoRA scale benchmark: /proc/self/status fields, and a 2 ms RssAnon sampler
from bench_safelora_scale import AnonSampler, _status  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_adapter(args: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from safeprune.adapter import load_adapter
    from safeprune.edit.components import gate_components, orthogonalise
    from safeprune.workflows.repair import _energies, _energy_removed, random_control_gates

    warm = load_adapter(args["adapter"])  # one untimed pass (first-call costs of the kernels)
    gate_components(orthogonalise(warm), {k: torch.ones(m.r) for k, m in warm.modules.items()})
    del warm
    rss0 = _status("VmRSS")
    peak = AnonSampler()
    try:
        t0, c0 = time.perf_counter(), _cpu()
        ad = load_adapter(args["adapter"])
        orth = orthogonalise(ad)
        gates = {k: (torch.arange(m.r, dtype=torch.float32) / m.r) for k, m in orth.modules.items()}
        energy = sum(float(_energies(m).sum()) for m in orth.modules.values())
        edited = gate_components(orth, gates)
        removed = _energy_removed(orth, gates)
        ctl = gate_components(orth, random_control_gates(orth, removed, seed=1))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        mem = peak.stop()
    n = len(ad.modules)
    assert len(edited.modules) == n == len(ctl.modules) and energy > 0
    return {
        "modules": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "s_per_module": wall / n,
        "cpu_s_per_module": cpu / n,
        "rss_after_imports_mb": rss0,
        "anon_peak_minus_imports_mb": mem["anon_above_mb"],
        "energy_removed": removed,
    }


def worker_fit(args: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from safeprune.adapter import load_adapter
    from safeprune.edit.components import orthogonalise
    from safeprune.scoring.gates import ComponentGates

    dev = args.get("device", "cpu")
    on_gpu = dev.startswith("cuda")
    rss0 = _status("VmRSS")
    ad = load_adapter(args["adapter"])
    t0 = time.perf_counter()
    gates = ComponentGates(
        args["base"],
        ad,
        orthogonalise(ad),
        checkpoint=bool(args.get("checkpoint")),
        device=dev,
        offload=args.get("offload", "none"),
    )
    load_s = time.perf_counter() - t0

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    weights_mb = sum(p.numel() * p.element_size() for p in gates.model.parameters()) / 2**20
    rss_loaded = _status("VmRSS")
    g = torch.Generator().manual_seed(0)
    vocab = gates.model.config.vocab_size
    prompts = [torch.randint(10, vocab, (args["prompt_tokens"],), generator=g).tolist() for _ in range(args["batch"])]
    targets = [torch.randint(10, vocab, (8,), generator=g).tolist() for _ in range(args["batch"])]
    # one untimed step (allocator warm-up), then the timed steps
    gates.nll(prompts, targets, batch_size=args["batch"], weight=1.0)
    gates.zero_grad()
    sync()
    if on_gpu:
        gpu_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    step_peak = AnonSampler()
    try:
        for _ in range(args["steps"]):
            t1, c1 = time.perf_counter(), _cpu()
            gates.nll(prompts, targets, batch_size=args["batch"], weight=1.0)
            grads = gates.grads()  # copied to the CPU: waits for the device
            gates.zero_grad()
            sync()
            steps.append((time.perf_counter() - t1, _cpu() - c1))
    finally:
        step_mem = step_peak.stop()
    gpu = {}
    if on_gpu:
        gpu = {
            "gpu": torch.cuda.get_device_name(),
            "gpu_allocated_loaded_mb": gpu_loaded / 2**20,
            "gpu_step_peak_above_loaded_mb": (torch.cuda.max_memory_allocated() - gpu_loaded) / 2**20,
        }
    n = len(gates.gates)
    assert all(torch.isfinite(v).all() for v in grads.values())
    digest = hashlib.sha256(b"".join(grads[k].numpy().tobytes() for k in sorted(grads))).hexdigest()
    nonzero = sum(int((v != 0).sum()) for v in grads.values())
    gates.close()
    hwm = _status("VmHWM")
    wall = min(s[0] for s in steps)
    return {
        "modules": n,
        "components": sum(v.numel() for v in grads.values()),
        "nonzero_gate_grads": nonzero,
        "gate_grads_sha256": digest,  # equal digests: bit-identical gradients (e.g. with and without offloading)
        "load_s": load_s,
        "step_wall_s": wall,
        "step_cpu_s": min(s[1] for s in steps),
        "step_s_per_module": wall / n,
        "weights_fp32_mb": weights_mb,
        "rss_after_imports_mb": rss0,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": hwm,
        "peak_minus_weights_and_imports_mb": hwm - weights_mb - rss0,
        "step_private_peak_above_loaded_mb": step_mem["anon_above_mb"],
        "tokens_per_step": args["batch"] * (args["prompt_tokens"] + 8),
        "device": dev,
        **gpu,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--render":  # re-render the Markdown from a results JSON
        path = Path(sys.argv[2])
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, args = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps({"adapter": worker_adapter, "fit": worker_fit}[kind](args)))
        return
    import synth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,4", help="layer counts to build (comma separated)")
    ap.add_argument("--tiny", action="store_true", help="hidden-64 smoke run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the fit step runs (cpu, cuda): repair --device")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic models go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "repair_scale")
    a = ap.parse_args()
    spec0 = synth.TINY if a.tiny else synth.LLAMA2_7B
    layers = [int(x) for x in a.layers.split(",")]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_repair_"))
    t_start = time.time()
    loads = [os.getloadavg()[0]]
    rows = []

    def save() -> dict:  # after every layer count, so a run stopped early keeps what it measured
        res = {
            "command": "python benchmarks/bench_repair_scale.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
            "device": a.device,
            "load_average_samples": [round(x, 2) for x in loads],
            "spec": spec0.name,
            "rows": rows,
            "seconds": round(time.time() - t_start, 1),
        }
        return synth.write_results(a.out, res, render)

    for L in layers:
        spec, base, adapter = synth.layered_models(work, spec0, L)
        side = synth.run_worker(Path(__file__), "adapter", {"adapter": str(adapter)})
        loads.append(os.getloadavg()[0])
        fits = {}
        for ckpt in (False, True):
            fits[ckpt] = synth.run_worker(
                Path(__file__),
                "fit",
                {
                    "adapter": str(adapter),
                    "base": str(base),
                    "batch": a.batch,
                    "prompt_tokens": a.prompt_tokens,
                    "steps": a.steps,
                    "checkpoint": ckpt,
                    "device": a.device,
                },
            )
            loads.append(os.getloadavg()[0])
        fit = fits[False]
        rows.append({"layers": L, "adapter_side": side, "fit_step": fit, "fit_step_checkpointed": fits[True]})
        print(
            f"{spec.name}: adapter side {side['s_per_module']:.4f} s/module, fit step {fit['step_wall_s']:.2f} s "
            f"({fits[True]['step_wall_s']:.2f} s checkpointed)",
            flush=True,
        )
        save()
    res = save()
    print(render(res))


def _line(rows: list[dict], value) -> tuple[float, float, list[float]]:
    """Least-squares value ≈ a + b · layers over ``rows``: (a, b, residuals)."""
    import numpy as np

    L = np.array([r["layers"] for r in rows], float)
    y = np.array([value(r) for r in rows], float)
    b, a0 = np.polyfit(L, y, 1)
    return float(a0), float(b), [float(x) for x in y - (a0 + b * L)]


def render(res: dict) -> str:
    rows = res["rows"]
    first = rows[0]
    out = [
        "# `safeprune repair` at Llama-2-7B shapes: cost against the number of layers",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}; {res['machine']}; load average samples {res['load_average_samples']}; "
        f"whole run {res['seconds'] / 60:.1f} min. Shapes: {res['spec']} with 1..n layers, q/k/v/o adapter r = 8; "
        "one torch thread; each part in its own subprocess.",
        "",
        "| layers | modules | adapter side s/module | CPU s/module | adapter side private peak − imports MB "
        "| fit step wall s | fit step CPU s | CPU s/module | fp32 weights MB | peak RSS MB (incl. loading) "
        "| fit step private peak above the loaded model MB | tokens/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["adapter_side"], r["fit_step"]
        out.append(
            f"| {r['layers']} | {s['modules']} | {s['s_per_module']:.4f} | {s['cpu_s_per_module']:.4f} | "
            f"{s['anon_peak_minus_imports_mb']:.1f} | {f['step_wall_s']:.2f} | {f['step_cpu_s']:.2f} | "
            f"{f['step_cpu_s'] / f['modules']:.3f} | "
            f"{f['weights_fp32_mb']:.0f} | {f['peak_rss_mb']:.0f} | {f['step_private_peak_above_loaded_mb']:.0f} | "
            f"{f['tokens_per_step']} |"
        )
    if len(rows) >= 2:  # least-squares line: fit step seconds = a + b · layers (embedding + lm_head are a)
        a0, b, resid = _line(rows, lambda r: r["fit_step"]["step_cpu_s"])
        out += [
            "",
            f"Fit step CPU seconds ≈ {a0:.2f} + {b:.2f} · layers (least squares; residuals "
            f"{', '.join(f'{x:+.2f}' for x in resid)} s). The constant is the embedding and the 32000-word lm_head, "
            "which do not grow with the layers.",
        ]
    ck = [r for r in rows if "fit_step_checkpointed" in r]
    if ck:
        out += [
            "",
            "The fit step with activation checkpointing (`repair --checkpoint`, automatic from 1B parameters): each "
            "decoder layer keeps only its input and is recomputed in the backward pass.",
            "",
            "| layers | step CPU s plain | step CPU s checkpointed | ratio | private peak above the loaded model MB "
            "plain | checkpointed |",
            "|---|---|---|---|---|---|",
        ]
        for r in ck:
            f, c = r["fit_step"], r["fit_step_checkpointed"]
            out.append(
                f"| {r['layers']} | {f['step_cpu_s']:.2f} | {c['step_cpu_s']:.2f} | "
                f"{c['step_cpu_s'] / f['step_cpu_s']:.2f} | {f['step_private_peak_above_loaded_mb']:.0f} | "
                f"{c['step_private_peak_above_loaded_mb']:.0f} |"
            )
        if len(ck) >= 2:
            for key, label in (("fit_step", "plain"), ("fit_step_checkpointed", "checkpointed")):
                a0, b, _ = _line(ck, lambda r: r[key]["step_private_peak_above_loaded_mb"])
                out.append(f"\nPrivate peak above the loaded model, {label}: ≈ {a0:.0f} + {b:.1f} MB · layers.")
    gpu = [r for r in rows if "gpu_step_peak_above_loaded_mb" in r["fit_step"]]
    if gpu:
        out += [
            "",
            f"On the GPU (`repair --device {res.get('device')}`, {gpu[0]['fit_step']['gpu']}; float32 weights; "
            "wall seconds per step with the device synchronised; GPU memory from torch's allocator):",
            "",
            "| layers | tokens/step | step s plain | step s checkpointed | GPU MB loaded | step peak above loaded MB "
            "plain | checkpointed |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in gpu:
            f, c = r["fit_step"], r.get("fit_step_checkpointed", r["fit_step"])
            out.append(
                f"| {r['layers']} | {f['tokens_per_step']} | {f['step_wall_s']:.3f} | {c['step_wall_s']:.3f} | "
                f"{f['gpu_allocated_loaded_mb']:.0f} | {f['gpu_step_peak_above_loaded_mb']:.0f} | "
                f"{c['gpu_step_peak_above_loaded_mb']:.0f} |"
            )
        if len(gpu) >= 2:
            for key, label in (("fit_step", "plain"), ("fit_step_checkpointed", "checkpointed")):
                if all(key in r for r in gpu):
                    a0, b, _ = _line(gpu, lambda r: r[key]["gpu_step_peak_above_loaded_mb"])
                    a1, b1, _ = _line(gpu, lambda r: r[key]["step_wall_s"])
                    out.append(
                        f"\nGPU, {label}: step peak above the loaded model ≈ {a0:.0f} + {b:.1f} MB · layers; "
                        f"step ≈ {a1:.3f} + {b1:.4f} s · layers."
                    )
    out += [
        "",
        f"CPU-time ratios against {first['layers']} layer(s) (linear in modules ⇔ per-module ratio ≈ 1; CPU time, "
        "because wall time on a shared machine carries other jobs' load):",
        "",
    ]
    out.append("| layers | modules ratio | adapter side CPU ratio | per module | fit step CPU ratio | per module |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        m = r["adapter_side"]["modules"] / first["adapter_side"]["modules"]
        ta = r["adapter_side"]["cpu_s"] / first["adapter_side"]["cpu_s"]
        tf = r["fit_step"]["step_cpu_s"] / first["fit_step"]["step_cpu_s"]
        out.append(f"| {r['layers']} | {m:.1f} | {ta:.2f} | {ta / m:.2f} | {tf:.2f} | {tf / m:.2f} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
