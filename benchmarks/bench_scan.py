#!/usr/bin/env python
"""Scan speed and memory at 7B/8B scale: safeprune scan vs the read floor vs a dense reference.

For each case (a synthetic base with a real Llama layout + a matching PEFT adapter, see synth.py) it measures,
back to back and under the same page-cache state:

  (a) floor : reading exactly the W0 tensors the scan needs, once (positional reads into one reused buffer,
              in adapter module order: no compute, no allocation);
  (b) scan  : ``safeprune.api.scan`` (what ``safeprune scan`` runs), adapter loading included;
  (c) dense : the dense reference (full SVD of W0, dense ΔW = s·B·A and its svdvals, explicit projection) on a
              sample of modules, one per distinct shape, extrapolated to every module of the adapter; its
              scores are compared with the scan's;
  (d) RSS   : peak resident memory (VmHWM) of the process running (b), and of a process that only imports.

(a) and (b) each run in a fresh subprocess. ``--cache cold`` drops the page cache before each (root:
/proc/sys/vm/drop_caches; otherwise posix_fadvise(DONTNEED) on the shards); ``--cache warm`` reads the shards
once, untimed, first. Timings on a shared machine are noisy: each pair is repeated (``--repeats``) and the load
average is recorded with every measurement.

    python benchmarks/bench_scan.py                 # full run (~15-20 min on 2 cores), writes results/
    python benchmarks/bench_scan.py --quick         # 2- and 4-layer 7B-shaped bases, a few minutes

Pair methods (SafeLoRA/SPLoRA, needing --aligned/--unaligned) are included with ``--methods ddi,safelora``
when registered; the aligned/unaligned pair is then generated (synth.unaligned_delta). Unregistered methods
are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import synth  # noqa: E402
import torch  # noqa: E402

# ------------------------------------------------------------------------------------------------
# page cache, load, memory
# ------------------------------------------------------------------------------------------------


def shard_files(base: Path) -> list[Path]:
    return sorted(base.glob("*.safetensors"))


def drop_cache(files: list[Path]) -> str:
    """Evict the files from the page cache. Returns how ('drop_caches' or 'fadvise')."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def warm_cache(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------
# workers (run in subprocesses: python bench_scan.py _worker KIND JSON)
# ------------------------------------------------------------------------------------------------


def needed_spans(adapter: Path, base: Path, methods: list[str]) -> list[tuple[Path, int, int]]:
    """(file, absolute offset, nbytes) of every base tensor the scan reads, in module order."""
    from safeprune.adapter import load_adapter
    from safeprune.weights import base_key_for, open_weights

    ad = load_adapter(adapter)
    src = open_weights(base)
    spans = []
    for m in ad:
        key = base_key_for(src, m.name)
        dtype, off, nb = src._spans[key]
        spans.append((Path(src.file_of(key)), off, nb))
    src.close()
    return spans


def worker_floor(args: dict) -> dict:
    spans = needed_spans(Path(args["adapter"]), Path(args["base"]), args["methods"])
    nroles = len(args.get("roles", ["base"]))
    bufsize = max(nb for _, _, nb in spans)
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    fds: dict[Path, int] = {}
    total = 0
    t0 = time.perf_counter()
    for role_base in args.get("role_bases", [args["base"]]):
        for f, off, nb in spans:
            f = Path(role_base) / f.name
            fd = fds.get(f)
            if fd is None:
                fd = fds[f] = os.open(f, os.O_RDONLY)
            done = 0
            while done < nb:
                k = os.preadv(fd, [mv[done:nb]], off + done)
                if k <= 0:
                    raise OSError("short read")
                done += k
            total += nb
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return {
        "seconds": dt,
        "bytes": total,
        "tensors": len(spans) * nroles,
        "GBps": total / dt / 1e9,
        "hwm_mb": vm_hwm_mb(),
    }


def worker_scan(args: dict) -> dict:
    from safeprune.scoring.scanner import scan as scan_fn  # import cost outside the timing

    kw = {k: args[k] for k in ("aligned", "unaligned") if args.get(k)}
    hwm0 = vm_hwm_mb()
    c0 = time.process_time()
    t0 = time.perf_counter()
    table = scan_fn(
        args["adapter"],
        args["base"],
        args["methods"],
        device=args.get("device", "cpu"),
        threads=args.get("threads"),
        **kw,
    )
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process
    out = Path(args["table_out"])
    rows = [
        {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()} for r in table.rows
    ]
    out.write_text(json.dumps(rows))
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "read_seconds_in_reader": table.meta.get("read_seconds"),
        "modules": len(table.rows),
        "hwm_mb": vm_hwm_mb(),
        "hwm_before_scan_mb": hwm0,
        "torch_threads": table.meta.get("threads"),
    }


def worker_idle(args: dict) -> dict:
    import safeprune.scoring.scan  # noqa: F401

    return {"hwm_mb": vm_hwm_mb()}


def run_worker(kind: str, args: dict) -> dict:
    """Run this script's ``_worker KIND`` in a fresh process (so its peak RSS is its own)."""
    return synth.run_worker(Path(__file__), kind, args)


# ------------------------------------------------------------------------------------------------
# dense reference
# ------------------------------------------------------------------------------------------------


def dense_ddi(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float, t: int) -> dict:
    """DDI the way a dense tool computes it: full SVD of W0, dense ΔW and its svdvals, explicit projection."""
    U, _, _ = torch.linalg.svd(W, full_matrices=False)  # full SVD of W0 (float32, like WeightWatcher)
    dW = s * (B @ A)  # dense ΔW
    sv = torch.linalg.svdvals(dW).double()
    tr = float((sv * sv).sum())
    Ut = U[:, :t]
    proj = float((Ut.T @ dW).double().pow(2).sum())
    w_fro = float(W.double().norm())
    S = float(sv[0] ** 2) / tr
    O = 1 - proj / tr
    d = math.sqrt(tr)
    Mn = d / (w_fro + d)
    return {"S": S, "O": O, "M_norm": Mn, "ddi": S * O * Mn}


def dense_reference(adapter: Path, base: Path, scan_rows: list[dict], max_shapes: int | None) -> dict:
    from safeprune.adapter import load_adapter
    from safeprune.weights import open_weights, read_module_weight

    ad = load_adapter(adapter)
    src = open_weights(base)
    by_shape: dict[tuple[int, int], list] = {}
    for m in ad:
        by_shape.setdefault((m.out_features, m.in_features), []).append(m)
    rows = {r["module"]: r for r in scan_rows}
    shapes = sorted(by_shape, key=lambda s: s[0] * s[1])
    if max_shapes is not None:
        shapes = shapes[:max_shapes]
    per_shape, diffs = {}, []
    for shp in shapes:
        m = by_shape[shp][0]
        W = read_module_weight(src, m)  # float32
        B, A = m.lora_B.float(), m.lora_A.float()
        la = loadavg()
        t0 = time.perf_counter()
        ref = dense_ddi(W, B, A, m.scaling, int(rows[m.name]["t"]))
        dt = time.perf_counter() - t0
        per_shape[f"{shp[0]}x{shp[1]}"] = {
            "seconds_per_module": dt,
            "modules": len(by_shape[shp]),
            "sample": m.name,
            "load": la,
        }
        r = rows[m.name]
        diffs.append(
            {
                "module": m.name,
                **{f"abs_diff_{k}": abs(ref[k] - r[k]) for k in ref},
                "dense": ref,
                "scan": {k: r[k] for k in ref},
            }
        )
        del W
    src.close()
    covered = sum(v["modules"] for v in per_shape.values())
    total = sum(v["seconds_per_module"] * v["modules"] for v in per_shape.values())
    return {
        "per_shape": per_shape,
        "extrapolated_seconds": total,
        "modules_covered": covered,
        "modules_total": len(ad),
        "agreement": diffs,
    }


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


def run_case(
    name: str,
    base: Path,
    adapter: Path,
    methods: list[str],
    cache: str,
    repeats: int,
    tmp: Path,
    dense_shapes: int | None,
    threads: int | None,
    pair: tuple[Path, Path] | None,
) -> dict:
    from safeprune.adapter import load_adapter

    ad = load_adapter(adapter)
    print(f"\n== {name}: {len(ad)} modules, methods {','.join(methods)}, cache {cache}", flush=True)
    files = shard_files(base) + ([f for p in pair for f in shard_files(p)] if pair else [])
    common = {"adapter": str(adapter), "base": str(base), "methods": methods}
    scan_args = dict(common, table_out=str(tmp / f"{name}.rows.json"), threads=threads)
    role_bases = [str(base)]
    if pair:
        scan_args.update(aligned=str(pair[0]), unaligned=str(pair[1]))
        role_bases += [str(pair[0]), str(pair[1])]
    reps = []
    for i in range(repeats):
        rec: dict = {}
        for kind in ("floor", "scan"):
            if cache == "cold":
                rec["cache_method"] = drop_cache(files)
            else:
                warm_cache(files)
            la = loadavg()
            res = run_worker(kind, scan_args if kind == "scan" else dict(common, role_bases=role_bases))
            res["load"] = la
            rec[kind] = res
            print(f"  rep {i}: {kind:5s} {res['seconds']:8.2f} s  hwm {res['hwm_mb']:7.0f} MB  load {la}", flush=True)
        rec["ratio_b_over_a"] = rec["scan"]["seconds"] / rec["floor"]["seconds"]
        reps.append(rec)
    ratios = [r["ratio_b_over_a"] for r in reps]
    rows = json.loads((tmp / f"{name}.rows.json").read_text())
    scan_s = statistics.median(r["scan"]["seconds"] for r in reps)
    out = {
        "case": name,
        "modules": len(ad),
        "methods": methods,
        "cache": cache,
        "floor_bytes": reps[0]["floor"]["bytes"],
        "floor_seconds_median": statistics.median(r["floor"]["seconds"] for r in reps),
        "scan_seconds_median": scan_s,
        "ratio_b_over_a_median": statistics.median(ratios),
        "ratio_b_over_a_all": ratios,
        "scan_peak_rss_mb_max": max(r["scan"]["hwm_mb"] for r in reps),
        "repeats": reps,
    }
    if dense_shapes != 0 and "ddi" in methods:
        print("  dense reference ...", flush=True)
        dref = dense_reference(adapter, base, rows, dense_shapes)
        per_mod_scan = scan_s / len(ad)
        out["dense"] = dref
        ext = dref["extrapolated_seconds"]
        covered = dref["modules_covered"]
        # c/b over the modules the dense sample covers (per module, like for like)
        out["ratio_c_over_b"] = (ext / covered) / per_mod_scan if covered else None
        out["dense_max_abs_diff"] = {
            k: max(d[f"abs_diff_{k}"] for d in dref["agreement"]) for k in ("S", "O", "M_norm", "ddi")
        }
        print(
            f"  dense: {ext:.1f} s extrapolated for {covered}/{len(ad)} modules; c/b = "
            f"{out['ratio_c_over_b']:.0f}; max |Δ| {out['dense_max_abs_diff']}",
            flush=True,
        )
    print(
        f"  b/a median {out['ratio_b_over_a_median']:.2f} (all {[round(x, 2) for x in ratios]}), "
        f"scan peak RSS {out['scan_peak_rss_mb_max']:.0f} MB",
        flush=True,
    )
    return out


def markdown(res: dict) -> str:
    L = [
        f"# scan benchmark ({res['mode']})",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}; host: {res['host']}; "
        f"torch {res['torch']}; scan threads {res['torch_threads']} (modules scored concurrently, 1 torch thread "
        f"each); page cache: {res['cache']} "
        f"({res['cache_method']}); import-only RSS {res['idle_rss_mb']:.0f} MB",
        "",
        "| case | modules | W0 read (GB) | (a) floor s | (b) scan s | scan CPU s | b/a (median; all) | load avg "
        "| peak RSS of (b) MB | (c) dense s/module | c/b | max abs diff vs dense (O, ddi) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        dense = c.get("dense")
        dpm = "; ".join(f"{k}: {v['seconds_per_module']:.1f}" for k, v in dense["per_shape"].items()) if dense else "-"
        cb = f"{c['ratio_c_over_b']:.0f}" if c.get("ratio_c_over_b") else "-"
        dd = (
            f"{c['dense_max_abs_diff']['O']:.1e}, {c['dense_max_abs_diff']['ddi']:.1e}"
            if c.get("dense_max_abs_diff")
            else "-"
        )
        L.append(
            f"| {c['case']} | {c['modules']} | {c['floor_bytes'] / 1e9:.2f} | {c['floor_seconds_median']:.2f} "
            f"| {c['scan_seconds_median']:.2f} | {statistics.median(r['scan']['cpu_seconds'] for r in c['repeats']):.2f} "
            f"| {c['ratio_b_over_a_median']:.2f}; "
            f"{', '.join(f'{x:.2f}' for x in c['ratio_b_over_a_all'])} "
            f"| {', '.join(str(r['scan']['load']) for r in c['repeats'])} | {c['scan_peak_rss_mb_max']:.0f} "
            f"| {dpm} | {cb} | {dd} |"
        )
    if res.get("skipped_methods"):
        L += ["", f"Skipped (not registered in this checkout): {', '.join(res['skipped_methods'])}"]
    L += [
        "",
        "(a) positional reads of exactly the tensors the scan needs into one reused buffer; (b) "
        "`safeprune.api.scan` in a fresh process, adapter loading included; (c) full SVD of W0 + dense ΔW "
        "svdvals + explicit projection, timed on one module per shape and extrapolated per module; c/b compares "
        "per-module times over the shapes sampled. Load averages per measurement are in the JSON.",
    ]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2- and 4-layer 7B-shaped bases only")
    ap.add_argument("--tiny", action="store_true", help="hidden-64 bases (smoke test of the code path)")
    ap.add_argument("--methods", default="ddi")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the scan process")
    ap.add_argument("--cases", default=None, help="comma list of case names to run (default: all of the mode)")
    ap.add_argument(
        "--dense-shapes",
        type=int,
        default=None,
        help="how many distinct module shapes (smallest first) the dense reference times in every "
        "case (0: none; default: per case, see the case list)",
    )
    ap.add_argument("--workdir", default=None, help="where to build bases (default: a temporary directory)")
    ap.add_argument(
        "--bases", default=None, help="keep generated bases in this directory and reuse them on later runs (same seed)"
    )
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON + Markdown results")
    ap.add_argument("--tag", default=None, help="results file stem (default scan_<mode>)")
    a = ap.parse_args(argv)

    from safeprune.scoring import REGISTRY

    wanted = [m.strip() for m in a.methods.split(",") if m.strip()]
    methods = [m for m in wanted if m in REGISTRY]
    skipped = [m for m in wanted if m not in REGISTRY]
    if skipped:
        print(f"skipping methods not registered here: {', '.join(skipped)}")
    if not methods:
        print("no registered method to benchmark", file=sys.stderr)
        return 2
    needs_pair = any({"aligned", "unaligned"} & set(REGISTRY[m].requires) for m in methods)

    qkvo, all_lin = synth.ATTN, synth.ATTN + synth.MLP
    if a.tiny:
        mode = "tiny"
        cases = [
            ("tiny-2L-qkvo-r8", synth.TINY, qkvo, 8, None),
            ("tiny-4L-qkvo-r8", synth.TINY.with_layers(4), qkvo, 8, None),
            ("tiny-2L-all-r16", synth.TINY, all_lin, 16, None),
        ]
    elif a.quick:
        mode = "quick"
        cases = [
            ("llama2-7b-2L-qkvo-r8", synth.LLAMA2_7B.with_layers(2), qkvo, 8, 0),
            ("llama2-7b-4L-qkvo-r8", synth.LLAMA2_7B.with_layers(4), qkvo, 8, None),
        ]
    else:
        mode = "full"
        # dense reference: one module per shape costs ~100 s at 4096x4096 and ~5 min at 4096x11008 on
        # 2 cores, so it is timed where it is new (4096^2 once; GQA k/v 1024x4096 once) and skipped for the
        # 8-layer case, which is there to show that peak RSS does not depend on the number of layers
        cases = [
            ("llama2-7b-qkvo-r8", synth.LLAMA2_7B, qkvo, 8, None),
            ("llama2-7b-all-r16", synth.LLAMA2_7B, all_lin, 16, 0),
            ("llama2-7b-8L-qkvo-r8", synth.LLAMA2_7B.with_layers(8), qkvo, 8, 0),
            ("llama3-8b-qkvo-r8", synth.LLAMA3_8B, qkvo, 8, 1),
        ]
    if a.cases:
        keep = set(a.cases.split(","))
        cases = [c for c in cases if c[0] in keep]

    from safeprune.scoring.scanner import scan_threads

    torch.set_num_threads(scan_threads(a.threads))  # the dense reference runs with the scan's thread count
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="safeprune-bench-", dir=a.workdir)
    tmp = Path(tmp_ctx.name)
    t_start = time.time()
    results = []
    idle = run_worker("idle", {})
    built: dict[str, Path] = {}
    try:
        for name, spec, targets, r, case_dense in cases:
            base = built.get(spec.name)
            cached = Path(a.bases) / spec.name if a.bases else None
            if base is None and cached is not None and (cached / "model.safetensors.index.json").is_file():
                base = built[spec.name] = cached
                print(f"reusing {cached}", flush=True)
            if base is None:
                if not a.bases:
                    for old in list(built.values()):  # keep one base on disk at a time
                        shutil.rmtree(old, ignore_errors=True)
                    built.clear()
                t0 = time.perf_counter()
                base = synth.write_base((Path(a.bases) if a.bases else tmp) / spec.name, spec, seed=0)
                built[spec.name] = base
                print(
                    f"built {spec.name} in {time.perf_counter() - t0:.0f} s "
                    f"({sum(f.stat().st_size for f in shard_files(base)) / 1e9:.1f} GB)",
                    flush=True,
                )
            pair = None
            if needs_pair:
                pair = (
                    base,
                    synth.write_base(tmp / (spec.name + "-unaligned"), spec, seed=0, delta=synth.unaligned_delta()),
                )
            adapter = synth.write_adapter(tmp / name, spec, targets, r, 2 * r)
            dshapes = a.dense_shapes if a.dense_shapes is not None else case_dense
            res = run_case(name, base, adapter, methods, a.cache, a.repeats, tmp, dshapes, a.threads, pair)
            res["spec"] = spec.__dict__
            res["r"] = r
            res["targets"] = list(targets)
            results.append(res)
            if pair:
                shutil.rmtree(pair[1], ignore_errors=True)
    finally:
        tmp_ctx.cleanup()

    cache_method = next((r["repeats"][0].get("cache_method") for r in results if r["repeats"]), "warm read")
    res = {
        "mode": mode,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": next((r["repeats"][0]["scan"]["torch_threads"] for r in results if r["repeats"]), None),
        "cache": a.cache,
        "cache_method": cache_method if a.cache == "cold" else "warm read",
        "idle_rss_mb": idle["hwm_mb"],
        "skipped_methods": skipped,
        "wall_seconds": round(time.time() - t_start, 1),
        "cases": results,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.tag or f"scan_{mode}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, args = sys.argv[2], json.loads(sys.argv[3])
        fn = {"floor": worker_floor, "scan": worker_scan, "idle": worker_idle}[kind]
        print(json.dumps(fn(args)))
        sys.exit(0)
    sys.exit(main())
