"""Seed stability of the DDI ranking: scan one adapter with several range-finder seeds and compare.

The only randomness in DDI is the Gaussian test matrix Ω of the randomized range finder (O term). This
script scans the adapter once per seed and reports, for every pair of seeds: the top-k set intersection and
Jaccard index, Kendall τ (scipy.stats.kendalltau, τ-b) of the full ranking by DDI, and the largest relative
change of any module's DDI and O. It also re-runs seed 0 to confirm that the same seed gives a bit-identical
score table.

    python benchmarks/seed_stability.py \
        --adapter ../shared/testbed/adapters/mix_s0 --base $SAFEPRUNE_TESTBED_MODELS/aligned \
        --seeds 0 1 2 3 4 --top 10 --out benchmarks/results/seed_stability
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def table_fingerprint(table) -> str:
    """sha256 of the score rows (every float by its exact repr) and the method options: not the timings."""
    import hashlib

    payload = json.dumps(
        {"rows": table.to_records(), "methods": {k: vars(v) for k, v in table.methods.items()}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def compare(tables: dict[int, object], top: int) -> dict:
    from scipy.stats import kendalltau

    seeds = sorted(tables)
    modules = [r["module"] for r in tables[seeds[0]].rows]
    ddi = {s: [tables[s].row(m)["ddi"] for m in modules] for s in seeds}
    O = {s: [tables[s].row(m)["O"] for m in modules] for s in seeds}
    topk = {s: [r["module"] for r in tables[s].ordered("ddi", True)[:top]] for s in seeds}
    pairs = []
    for a, b in itertools.combinations(seeds, 2):
        tau = kendalltau(ddi[a], ddi[b]).statistic
        inter = len(set(topk[a]) & set(topk[b]))
        union = len(set(topk[a]) | set(topk[b]))
        rel_ddi = max(abs(x - y) / max(abs(x), 1e-300) for x, y in zip(ddi[a], ddi[b]))
        rel_O = max(abs(x - y) / max(abs(x), 1e-300) for x, y in zip(O[a], O[b]))
        pairs.append(
            {
                "seeds": [a, b],
                "kendall_tau": float(tau),
                f"top{top}_intersection": inter,
                f"top{top}_jaccard": inter / union,
                "max_rel_change_ddi": rel_ddi,
                "max_rel_change_O": rel_O,
            }
        )
    union_all = set().union(*map(set, topk.values()))
    inter_all = set.intersection(*map(set, topk.values()))
    return {
        "modules": len(modules),
        "pairs": pairs,
        "kendall_tau_min": min(p["kendall_tau"] for p in pairs),
        "kendall_tau_mean": sum(p["kendall_tau"] for p in pairs) / len(pairs),
        f"top{top}_intersection_min": min(p[f"top{top}_intersection"] for p in pairs),
        f"top{top}_jaccard_min": min(p[f"top{top}_jaccard"] for p in pairs),
        f"top{top}_common_to_all_seeds": len(inter_all),
        f"top{top}_union_over_seeds": len(union_all),
        f"top{top}_identical_for_all_seeds": all(set(t) == set(topk[seeds[0]]) for t in topk.values()),
        f"top{top}_by_seed": {str(s): topk[s] for s in seeds},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=str(Path(__file__).resolve().parents[2] / "shared/testbed/adapters/mix_s0"))
    ap.add_argument("--base", default=os.path.join(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "../models"), "aligned"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--power-iters", type=int, default=2, help="DDI range-finder power iterations")
    ap.add_argument("--oversample", type=int, default=8, help="DDI range-finder oversampling")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "seed_stability"))
    args = ap.parse_args(argv)

    import safeprune

    adapter = safeprune.load_adapter(args.adapter)
    tables, secs = {}, {}
    for s in args.seeds:
        t0 = time.perf_counter()
        tables[s] = safeprune.scoring.scan(
            adapter, args.base, "ddi", seed=s, power_iters=args.power_iters, oversample=args.oversample
        )
        secs[s] = round(time.perf_counter() - t0, 2)
        print(f"seed {s}: {secs[s]}s", file=sys.stderr)
    again = safeprune.scoring.scan(
        adapter, args.base, "ddi", seed=args.seeds[0], power_iters=args.power_iters, oversample=args.oversample
    )
    res = compare(tables, args.top)
    res.update(
        {
            "adapter": args.adapter,
            "base": args.base,
            "seeds": args.seeds,
            "top": args.top,
            "ddi_options": tables[args.seeds[0]].methods["ddi"].options,
            "same_seed_bit_identical": table_fingerprint(again) == table_fingerprint(tables[args.seeds[0]]),
            "scan_seconds": secs,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "command": "python benchmarks/seed_stability.py " + " ".join(sys.argv[1:]),
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    k = args.top
    md = [
        f"# DDI seed stability: {Path(args.adapter).name} on {args.base}",
        "",
        f"{res['modules']} modules, seeds {args.seeds}, DDI options {res['ddi_options']}.",
        f"Same seed twice gives a bit-identical table: **{res['same_seed_bit_identical']}**.",
        "",
        f"* Kendall τ (full ranking by DDI) between seeds: min **{res['kendall_tau_min']:.4f}**, "
        f"mean {res['kendall_tau_mean']:.4f}",
        f"* top-{k} sets: identical for all seeds: **{res[f'top{k}_identical_for_all_seeds']}**; min pairwise "
        f"intersection {res[f'top{k}_intersection_min']}/{k} (Jaccard {res[f'top{k}_jaccard_min']:.3f}); "
        f"{res[f'top{k}_common_to_all_seeds']} modules common to all seeds, {res[f'top{k}_union_over_seeds']} "
        "in their union",
        "",
        f"| seeds | Kendall τ | top-{k} ∩ | Jaccard | max rel. Δ DDI | max rel. Δ O |",
        "|---|---|---|---|---|---|",
    ]
    for p in res["pairs"]:
        md.append(
            f"| {p['seeds'][0]}–{p['seeds'][1]} | {p['kendall_tau']:.4f} | {p[f'top{k}_intersection']} | "
            f"{p[f'top{k}_jaccard']:.3f} | {p['max_rel_change_ddi']:.2e} | {p['max_rel_change_O']:.2e} |"
        )
    md += [
        "",
        f"Command: `{res['command']}` (torch {res['torch']}, {res['threads']} threads; scan seconds per seed "
        f"{list(secs.values())}).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
