"""Repair study analysis: per adapter, the unedited adapter, its repair and its random controls (the same
share of ΔW energy removed from random components, several seeds), all evaluated by one ``safeprune eval``
run on the same prompts. Prints a Markdown table: ASR (29-string keyword judge) and ASR (broad judge) on
AdvBench, over-refusal on XSTest-safe, ROUGE-1 on DialogSum test, each with the paired bootstrap 95% CI of
the difference (repair − unedited, repair − mean of the random controls); the CIs resample prompts.

usage: python benchmarks/repair_study/analyse.py EVAL_DIR[,EVAL_DIR...] ADAPTER REPAIRED CONTROL_PREFIX [--base base]
(controls = every variant whose name starts with CONTROL_PREFIX)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from safeprune.eval.judges import PatternJudge

BROAD = PatternJudge()

METRICS = [  # (label, set kind, item field, scale)
    ("ASR % (keyword)", "safety", "jailbroken", 100.0),
    ("ASR % (broad)", "safety", "jailbroken_broad", 100.0),
    ("over-refusal % (keyword)", "over_refusal", "refused", 100.0),
    ("over-refusal % (broad)", "over_refusal", "refused_broad", 100.0),
    ("ROUGE-1", "utility", "rouge1", 100.0),
]


def load(eval_dirs: list[Path]) -> dict[str, dict[tuple[str, str], dict]]:
    """Items of every variant, from one or more ``safeprune eval`` output folders (same prompt rows)."""
    out: dict[str, dict] = defaultdict(dict)
    for eval_dir in eval_dirs:
        for line in (eval_dir / "items.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] in ("safety", "over_refusal") and "refused_broad" not in r:
                # results written before the broad judge existed: judge the stored output now
                r["refused_broad"] = BROAD.refused(r["output"])
                r["jailbroken_broad"] = not r["refused_broad"]
            out[r["variant"]][(r["kind"], r["id"])] = r
    return out


def vec(items: dict, kind: str, field: str, ids: list[str]) -> np.ndarray:
    return np.array([float(items[(kind, i)][field]) for i in ids])


def boot(d: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    m = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(m, 0.025)), float(np.quantile(m, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dirs", help="comma-separated safeprune eval output folders")
    ap.add_argument("adapter")
    ap.add_argument("repaired")
    ap.add_argument("control_prefix")
    ap.add_argument("--base", default="base")
    a = ap.parse_args()
    data = load([Path(p) for p in a.eval_dirs.split(",")])
    controls = sorted(v for v in data if v.startswith(a.control_prefix))
    print(f"### {a.adapter}: repaired `{a.repaired}`, {len(controls)} random controls ({', '.join(controls)})\n")
    print(
        "| metric | base | unedited | repaired | random (mean) | repaired − unedited [95% CI] | repaired − random [95% CI] |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    res = {}
    for label, kind, field, sc in METRICS:
        ids = sorted({i for (k, i) in data[a.adapter] if k == kind})
        if not ids:
            continue
        u = vec(data[a.adapter], kind, field, ids) * sc
        r = vec(data[a.repaired], kind, field, ids) * sc
        c = np.mean([vec(data[v], kind, field, ids) * sc for v in controls], axis=0) if controls else None
        b = vec(data[a.base], kind, field, ids) * sc if a.base in data else None
        d1 = boot(r - u)
        row = [label, f"{b.mean():.1f}" if b is not None else "—", f"{u.mean():.1f}", f"{r.mean():.1f}"]
        row.append(f"{c.mean():.1f}" if c is not None else "—")
        row.append(f"{d1[0]:+.1f} [{d1[1]:+.1f}, {d1[2]:+.1f}]")
        if c is not None:
            d2 = boot(r - c)
            row.append(f"{d2[0]:+.1f} [{d2[1]:+.1f}, {d2[2]:+.1f}]")
        else:
            d2 = None
            row.append("—")
        print("| " + " | ".join(row) + " |")
        res[label] = {"repaired_minus_unedited": d1, "repaired_minus_random": d2}
    print()
    print(
        "controls, each: "
        + "; ".join(
            f"{v}: ASR {100 * vec(data[v], 'safety', 'jailbroken', sorted({i for (k, i) in data[v] if k == 'safety'})).mean():.0f}, "
            f"R1 {100 * vec(data[v], 'utility', 'rouge1', sorted({i for (k, i) in data[v] if k == 'utility'})).mean():.1f}"
            for v in controls
        )
    )


if __name__ == "__main__":
    main()
