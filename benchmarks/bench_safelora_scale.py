#!/usr/bin/env python
"""SafeLoRA scoring at Llama-2-7B shapes: safeprune's low-rank path vs the official d×d approach.

Builds (synth.py) a small-layer aligned/unaligned pair with real Llama-2-7B shapes (q/k/v/o 4096×4096,
gate/up 11008×4096, down 4096×11008, vocab 32000; ``--layers`` layers, default 2): the aligned model is a
synthetic bf16 base, the unaligned one the same base plus a rank-16 perturbation of every targeted projection.
Two PEFT adapters (r=8): q/k/v/o only, and all linear (q/k/v/o + MLP). Then, each approach in its own
subprocess (so its peak RSS is its own), page cache warm (both pair bases read once before each worker):

  (a) ours      : ``safeprune.scoring.scan(adapter, None, "safelora", aligned=..., unaligned=...)`` — weights read per
                  module in their stored dtype, C·B = V(VᵀB)/‖V‖_F in float64 row blocks, cosine from r×r
                  Grams; run for both adapters;
  (b) official  : what IBM/SafeLoRA does (model.py): both models loaded whole in float32 (here: every tensor
                  of both safetensors bases, read and converted to float32, standing in for
                  ``AutoModelForCausalLM.from_pretrained(torch_dtype=float32)``; the PEFT model and its deepcopy
                  are left out, which favours this approach), one dense C = V Vᵀ/‖V‖_F (out×out) computed and
                  *kept* per targeted weight, then per module fW = (C·B)·A, ori = B·A and the cosine of the
                  flattened matrices; all-linear adapter;
  (b') streamed : the d×d approach at its most frugal: per module read the two weights (float32), V, C, fW,
                  ori, cosine, free everything; all-linear adapter.

Reported: wall and CPU time per module (per shape for (b)/(b')), peak RSS (VmHWM) and RSS after imports, the
peak private memory (RssAnon, sampled every 2 ms) above its post-import value, the time and memory ratios
(b)/(a) and (b')/(a), and the agreement of the cosines and rankings. Torch threads: ``--threads`` (default 1)
for (b)/(b'); (a) uses the scan's default (a reader thread + ``threads − 1`` torch threads, recorded).

    python benchmarks/bench_safelora_scale.py                # ~5-10 min on 2 loaded cores
    python benchmarks/bench_safelora_scale.py --tiny         # hidden-64 smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class AnonSampler:
    """Peak RssAnon (memory the process owns, not file-backed pages) sampled every 2 ms."""

    def __init__(self):
        self.base = _status("RssAnon")
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            self._stop.wait(0.002)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))
        return {"anon_base_mb": self.base, "anon_peak_mb": self.peak, "anon_above_mb": self.peak - self.base}


def _mem_start() -> tuple[dict, AnonSampler]:
    return {"rss_after_imports_mb": _status("VmRSS"), "hwm_after_imports_mb": _status("VmHWM")}, AnonSampler()


def _mem_end(m0: dict, s: AnonSampler) -> dict:
    hwm = _status("VmHWM")
    return {
        **m0,
        "peak_rss_mb": hwm,
        "peak_above_imports_mb": hwm - m0["rss_after_imports_mb"],
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        **s.stop(),
    }


# ------------------------------------------------------------------------------------------------
# workers (subprocesses)
# ------------------------------------------------------------------------------------------------


def worker_idle(a: dict) -> dict:
    import torch  # noqa: F401

    import safeprune  # noqa: F401

    return {"peak_rss_mb": _status("VmHWM"), "rss_mb": _status("VmRSS")}


def worker_ours(a: dict) -> dict:
    import torch  # noqa: F401

    import safeprune

    m0, s = _mem_start()
    c0, t0 = time.process_time(), time.perf_counter()
    table = safeprune.scoring.scan(a["adapter"], None, "safelora", aligned=a["aligned"], unaligned=a["unaligned"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(table.rows)
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "modules": n,
        "seconds_per_module": dt / n,
        "cpu_seconds_per_module": cpu / n,
        "threads": table.meta.get("threads"),
        "parallel_modules": table.meta.get("parallel_modules"),
        **_mem_end(m0, s),
        "cos": {r["module"]: r["cos"] for r in table.rows},
    }


def _official_cos(C, B, A) -> float:
    import torch

    fW = torch.mm(torch.mm(C, B), A)  # IBM/SafeLoRA: W = C·B; fW = W·A
    ori = torch.mm(B, A)
    return float(torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)))


def _shape_key(W) -> str:
    return f"{W.shape[0]}x{W.shape[1]}"


def worker_official(a: dict) -> dict:
    """Both models whole in float32, every C kept (as IBM/SafeLoRA model.py), then the cosines."""
    import torch
    from safetensors import safe_open

    import safeprune
    from safeprune.weights import name_candidates as _name_candidates

    torch.set_num_threads(a["threads"])
    ad = safeprune.load_adapter(a["adapter"])
    m0, s = _mem_start()
    c0, t0 = time.process_time(), time.perf_counter()
    models = []
    for base in (a["unaligned"], a["aligned"]):
        sd = {}
        for f in sorted(Path(base).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sd[k] = fh.get_tensor(k).to(torch.float32)
        models.append(sd)
    load_s = time.perf_counter() - t0
    pu, pa = models

    def key(sd, name):
        return next(c + ".weight" for c in _name_candidates(name) if c + ".weight" in sd)

    C, per = {}, {}
    with torch.no_grad():
        for m in ad:  # get_aligned_matrix: one dense C per targeted weight, all kept
            t = time.perf_counter()
            V = pa[key(pa, m.name)] - pu[key(pu, m.name)]
            C[m.name] = torch.mm(V, V.t()) / torch.norm(V)
            del V
            per[m.name] = {"shape": f"{m.out_features}x{m.in_features}", "C_seconds": time.perf_counter() - t}
        cos = {}
        for m in ad:  # projection loop: cosine of the flattened fW = C·B·A and B·A
            t = time.perf_counter()
            cos[m.name] = _official_cos(C[m.name], m.lora_B.float(), m.lora_A.float())
            per[m.name]["cos_seconds"] = time.perf_counter() - t
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    c_mb = sum(c.numel() * c.element_size() for c in C.values()) / 2**20
    n = len(ad)
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "load_seconds": load_s,
        "modules": n,
        "seconds_per_module": dt / n,
        "cpu_seconds_per_module": cpu / n,
        "threads": a["threads"],
        "C_matrices_mb": c_mb,
        "models_fp32_mb": sum(t.numel() * 4 for sd in models for t in sd.values()) / 2**20,
        **_mem_end(m0, s),
        "per_module": per,
        "cos": cos,
    }


def worker_streamed(a: dict) -> dict:
    """The d×d approach one module at a time, nothing kept (the most frugal form of it)."""
    import torch

    import safeprune
    from safeprune.weights import open_weights, read_module_weight

    torch.set_num_threads(a["threads"])
    ad = safeprune.load_adapter(a["adapter"])
    m0, s = _mem_start()
    c0, t0 = time.process_time(), time.perf_counter()
    sa, su = open_weights(a["aligned"]), open_weights(a["unaligned"])
    per, cos = {}, {}
    with torch.no_grad():
        for m in ad:
            t = time.perf_counter()
            V = read_module_weight(sa, m) - read_module_weight(su, m)  # float32
            C = torch.mm(V, V.t()) / torch.norm(V)
            del V
            cos[m.name] = _official_cos(C, m.lora_B.float(), m.lora_A.float())
            del C
            per[m.name] = {"shape": f"{m.out_features}x{m.in_features}", "seconds": time.perf_counter() - t}
    sa.close()
    su.close()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(ad)
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "modules": n,
        "seconds_per_module": dt / n,
        "cpu_seconds_per_module": cpu / n,
        "threads": a["threads"],
        **_mem_end(m0, s),
        "per_module": per,
        "cos": cos,
    }


def worker_dense64(a: dict) -> dict:
    """Exactness reference (not timed against anything): the d×d approach entirely in float64, on the modules
    with out_features ≤ ``max_out`` (a float64 C at 11008² costs ~1 TFLOP)."""
    import torch

    import safeprune
    from safeprune.weights import open_weights, read_module_weight

    torch.set_num_threads(a["threads"])
    ad = safeprune.load_adapter(a["adapter"])
    sa, su = open_weights(a["aligned"]), open_weights(a["unaligned"])
    cos = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for m in ad:
            if m.out_features > a["max_out"]:
                continue
            V = read_module_weight(sa, m).double() - read_module_weight(su, m).double()
            C = torch.mm(V, V.t()) / torch.norm(V)
            del V
            cos[m.name] = _official_cos(C, m.lora_B.double(), m.lora_A.double())
            del C
    sa.close()
    su.close()
    return {"seconds": time.perf_counter() - t0, "modules": len(cos), "cos": cos}


WORKERS = {
    "dense64": worker_dense64,
    "idle": worker_idle,
    "ours": worker_ours,
    "official": worker_official,
    "streamed": worker_streamed,
}


def run_worker(kind: str, args: dict) -> dict:
    """Run this script's ``_worker KIND`` in a fresh process (so its peak RSS is its own)."""
    import synth

    return synth.run_worker(Path(__file__), kind, args)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def warm_cache(dirs: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for d in dirs:
        for p in sorted(d.glob("*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def agreement(ours: dict, ref: dict) -> dict:
    names = sorted(ref)
    ours = {n: ours[n] for n in names}
    rel = [abs(ours[n] - ref[n]) / max(abs(ref[n]), 1e-30) for n in names]
    absd = [abs(ours[n] - ref[n]) for n in names]
    rank_o = sorted(names, key=lambda n: (ours[n], n))
    rank_r = sorted(names, key=lambda n: (ref[n], n))
    return {
        "modules": len(names),
        "max_rel_diff": max(rel),
        "max_abs_diff": max(absd),
        "same_ranking": rank_o == rank_r,
        "ranking_ours": rank_o,
        "ranking_official": rank_r,
    }


def per_shape(per: dict, field: str | tuple[str, ...]) -> dict:
    fields = (field,) if isinstance(field, str) else field
    out: dict[str, list[float]] = {}
    for v in per.values():
        out.setdefault(v["shape"], []).append(sum(v[f] for f in fields))
    return {k: {"modules": len(x), "seconds_per_module": sum(x) / len(x)} for k, x in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="layers of the Llama-2-7B-shaped pair (default 2)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the official approach")
    ap.add_argument("--no-mlp", action="store_true", help="q/k/v/o only (skip the 11008×4096 modules)")
    ap.add_argument("--no-streamed", action="store_true", help="skip (b'), the per-module d×d run")
    ap.add_argument(
        "--dense64-max-out",
        type=int,
        default=4096,
        help="float64 d×d exactness reference on modules with out_features ≤ this (0: none)",
    )
    ap.add_argument("--tiny", action="store_true", help="hidden-64 pair (smoke test of the code path)")
    ap.add_argument("--workdir", default=None, help="where to build the pair (default: a temporary directory)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="safelora_scale")
    a = ap.parse_args(argv)

    import synth
    import torch

    spec = synth.TINY.with_layers(a.layers) if a.tiny else synth.LLAMA2_7B.with_layers(a.layers)
    targets_all = synth.ATTN if a.no_mlp else synth.ATTN + synth.MLP
    t_start = time.time()
    loads = [loadavg()]
    tmp_ctx = tempfile.TemporaryDirectory(prefix="safeprune-slscale-", dir=a.workdir)
    tmp = Path(tmp_ctx.name)
    try:
        t0 = time.perf_counter()
        aligned = synth.write_base(tmp / "aligned", spec, seed=0)
        unaligned = synth.write_base(tmp / "unaligned", spec, seed=0, delta=synth.unaligned_delta(targets=targets_all))
        gen_s = time.perf_counter() - t0
        print(f"built pair {spec.name} in {gen_s:.0f} s", flush=True)
        adapters = {"qkvo": synth.write_adapter(tmp / "ad_qkvo", spec, synth.ATTN, a.r, 2 * a.r)}
        if not a.no_mlp:
            adapters["all"] = synth.write_adapter(tmp / "ad_all", spec, targets_all, a.r, 2 * a.r)
        big = "all" if "all" in adapters else "qkvo"
        pair = {"aligned": str(aligned), "unaligned": str(unaligned)}
        res: dict = {"idle": run_worker("idle", {})}
        runs = [("ours_qkvo", "ours", "qkvo")] + ([("ours_all", "ours", "all")] if big == "all" else [])
        runs += [("official", "official", big)] + ([] if a.no_streamed else [("streamed", "streamed", big)])
        for label, kind, ad in runs:
            warm_cache([aligned, unaligned])
            la = loadavg()
            r = run_worker(kind, dict(pair, adapter=str(adapters[ad]), threads=a.threads))
            r["load_before"], r["load_after"], r["adapter"] = la, loadavg(), ad
            loads += [la, r["load_after"]]
            res[label] = r
            print(
                f"  {label:10s} {r['seconds']:8.2f} s  {r['seconds_per_module']:.3f} s/module  peak RSS "
                f"{r['peak_rss_mb']:.0f} MB (above imports {r['peak_above_imports_mb']:.0f}, anon above "
                f"{r['anon_above_mb']:.0f})  load {la}",
                flush=True,
            )
        if a.dense64_max_out:
            r = run_worker(
                "dense64", dict(pair, adapter=str(adapters[big]), threads=a.threads, max_out=a.dense64_max_out)
            )
            res["dense64"] = r
            print(
                f"  dense64    {r['seconds']:8.2f} s for {r['modules']} modules (float64 exactness reference)",
                flush=True,
            )
    finally:
        tmp_ctx.cleanup()

    ours_big = res["ours_all" if big == "all" else "ours_qkvo"]
    ours_q = res["ours_qkvo"]
    off = res["official"]
    attn_shape = f"{spec.hidden}x{spec.hidden}"
    off_shape = per_shape(off["per_module"], ("C_seconds", "cos_seconds"))
    summary: dict = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "spec": spec.__dict__,
        "r": a.r,
        "pair_generation_seconds": gen_s,
        "wall_seconds": time.time() - t_start,
        "load_average_samples": loads,
        "results": res,
        "official_per_shape_compute": off_shape,
        "ratios": {},
    }
    R = summary["ratios"]

    def ratios(name: str, ref: dict, ours: dict):
        R[name] = {
            "time_per_module": ref["seconds_per_module"] / ours["seconds_per_module"],
            "cpu_per_module": ref["cpu_seconds_per_module"] / ours["cpu_seconds_per_module"],
            "peak_above_imports": ref["peak_above_imports_mb"] / max(1e-9, ours["peak_above_imports_mb"]),
            "anon_above_imports": ref["anon_above_mb"] / max(1e-9, ours["anon_above_mb"]),
            "raw_peak_rss": ref["peak_rss_mb"] / ours["peak_rss_mb"],
        }

    ratios(f"official/ours ({big})", off, ours_big)
    if "streamed" in res:
        ratios(f"streamed/ours ({big})", res["streamed"], ours_big)
        summary["streamed_per_shape"] = per_shape(res["streamed"]["per_module"], "seconds")
    # attention modules only: the official per-module compute at out×out = 4096² vs the q/k/v/o-only scan
    if attn_shape in off_shape:
        R["official compute at 4096² / ours (qkvo scan)"] = {
            "time_per_module": off_shape[attn_shape]["seconds_per_module"] / ours_q["seconds_per_module"]
        }
    summary["agreement"] = {"ours_vs_official": agreement(ours_big["cos"], off["cos"])}
    if "dense64" in res and res["dense64"]["cos"]:
        d64 = res["dense64"]["cos"]
        summary["agreement"]["ours_vs_dense64"] = agreement(ours_big["cos"], d64)
        summary["agreement"]["official_fp32_vs_dense64"] = agreement(off["cos"], d64)
    if "streamed" in res:
        summary["agreement"]["ours_vs_streamed"] = agreement(ours_big["cos"], res["streamed"]["cos"])

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary, big)
    (out / f"{a.tag}.md").write_text(md)
    print("\n" + md)
    return 0


def markdown(s: dict, big: str) -> str:
    res = s["results"]
    L = [
        "# SafeLoRA scoring at Llama-2-7B shapes: safeprune vs the official d×d approach",
        "",
        f"Command: `{s['command']}`  ",
        f"Date: {s['date']}; {s['cpu_count']} CPUs shared with other jobs (load average samples: "
        f"{', '.join(str(x) for x in s['load_average_samples'])}); torch {s['torch']}; pair: "
        f"{s['spec']['name']} (hidden {s['spec']['hidden']}, MLP {s['spec']['intermediate']}, vocab "
        f"{s['spec']['vocab']}), r = {s['r']}; pair generated in {s['pair_generation_seconds']:.0f} s; whole run "
        f"{s['wall_seconds'] / 60:.1f} min. Each approach in its own subprocess, page cache warm; import-only "
        f"peak RSS {res['idle']['peak_rss_mb']:.0f} MB.",
        "",
        "| approach | adapter | modules | wall s | s/module | CPU s/module | torch threads | peak RSS MB | RSS after "
        "imports MB | peak − imports MB | private (RssAnon) peak − imports MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "ours_qkvo": "(a) safeprune scan",
        "ours_all": "(a) safeprune scan",
        "official": "(b) official: 2 models fp32 + every C kept",
        "streamed": "(b') d×d per module, nothing kept",
    }
    for k in ("ours_qkvo", "ours_all", "official", "streamed"):
        if k not in res:
            continue
        r = res[k]
        L.append(
            f"| {names[k]} | {r['adapter']} | {r['modules']} | {r['seconds']:.2f} | {r['seconds_per_module']:.3f} "
            f"| {r['cpu_seconds_per_module']:.3f} | {r['threads']} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_after_imports_mb']:.0f} | {r['peak_above_imports_mb']:.0f} | {r['anon_above_mb']:.0f} |"
        )
    L += [
        "",
        "Ratios (reference / safeprune):",
        "",
        "| comparison | time/module | CPU/module | peak − imports | private peak − imports | raw peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in s["ratios"].items():
        f = lambda x: f"{v[x]:.1f}×" if x in v else "–"  # noqa: E731
        L.append(
            f"| {k} | **{f('time_per_module')}** | {f('cpu_per_module')} | **{f('peak_above_imports')}** "
            f"| {f('anon_above_imports')} | {f('raw_peak_rss')} |"
        )
    off = res["official"]
    L += [
        "",
        "Official approach, per-module compute by shape (C = VVᵀ/‖V‖ + fW, ori, cosine; excludes loading "
        f"the two models, {off['load_seconds']:.1f} s): "
        + "; ".join(
            f"{k}: {v['seconds_per_module']:.2f} s ({v['modules']} modules)"
            for k, v in s["official_per_shape_compute"].items()
        )
        + f". Dense C matrices held: {off['C_matrices_mb']:.0f} MiB; both models in float32: "
        f"{off['models_fp32_mb']:.0f} MiB.",
        "",
    ]
    for k, g in s["agreement"].items():
        L.append(
            f"- {k}: {g['modules']} modules, max |Δcos| {g['max_abs_diff']:.1e}, max relative "
            f"{g['max_rel_diff']:.1e}, same ranking: {g['same_ranking']}"
        )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
