"""Repair study: the trade-off curve of ``safeprune repair`` (issue 13) — ASR, over-refusal and ROUGE-1 of
one fit written at several edit strengths (``repair --from-repair R --strength t``), beside the random
controls at each strength's ΔW energy, and the module-level methods' own curve on mix_s0 when given.

usage:
  python benchmarks/repair_study/curve.py --eval EVAL_DIR[,EVAL_DIR...] --adapter NAME \
      --point 0.5=VARIANT[,CONTROL_PREFIX] --point 0.75=... --point 1.0=... [--base base] \
      [--modules RESULTS_JSON:ADAPTER ...] [--plot OUT.png] [--json OUT.json]

Each point: the strength, the repaired variant's name, and optionally the prefix of its random controls'
names (every variant starting with it). Differences are paired over prompts against the unedited adapter
(bootstrap 95% CIs, 10,000 resamples, seed 0, as ``analyse.py``). ``--modules`` (repeatable) adds, from a
``safeprune run`` results.json, every ``ADAPTER:method@τ`` variant as relative changes against that run's own unedited
adapter (other prompt rows than this study's: compare the changes, not the levels).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from analyse import boot, load, vec

COLS = [("asr", "safety", "jailbroken"), ("over_refusal", "over_refusal", "refused"), ("rouge1", "utility", "rouge1")]


def point_metrics(data: dict, name: str, ids: dict[str, list[str]]) -> dict[str, np.ndarray]:
    return {c: vec(data[name], kind, field, ids[kind]) * 100.0 for c, kind, field in COLS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--point", action="append", default=[])
    ap.add_argument("--base", default="base")
    ap.add_argument("--modules", action="append", default=[])
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    data = load([Path(p) for p in a.eval.split(",")])
    ids = {kind: sorted({i for (k, i) in data[a.adapter] if k == kind}) for _, kind, _ in COLS}
    un = point_metrics(data, a.adapter, ids)
    base = point_metrics(data, a.base, ids) if a.base in data else None
    rows = []
    for p in a.point:
        t, rest = p.split("=", 1)
        name, _, prefix = rest.partition(",")
        m = point_metrics(data, name, ids)
        ctl = sorted(v for v in data if prefix and v.startswith(prefix))
        row = {"strength": float(t), "variant": name, "controls": ctl}
        for c, _, _ in COLS:
            row[c] = float(m[c].mean())
            row[f"d_{c}"] = boot(m[c] - un[c])
            if ctl:
                cm = np.mean([point_metrics(data, v, ids)[c] for v in ctl], axis=0)
                row[f"random_{c}"] = float(cm.mean())
                row[f"vs_random_{c}"] = boot(m[c] - cm)
        rows.append(row)
    rows.sort(key=lambda r: r["strength"])
    print(f"### {a.adapter}: the repair's trade-off curve (one fit, written at each strength)\n")
    lvl = lambda arr: f"{arr.mean():.1f}"  # noqa: E731
    if base is not None:
        print(
            f"base: ASR {lvl(base['asr'])}, over-refusal {lvl(base['over_refusal'])}, ROUGE-1 {lvl(base['rouge1'])}; ",
            end="",
        )
    print(f"unedited: ASR {lvl(un['asr'])}, over-refusal {lvl(un['over_refusal'])}, ROUGE-1 {lvl(un['rouge1'])}\n")
    print(
        "| strength | ASR % (random) | ΔASR [95% CI] | relative cut | over-refusal % (random) | Δover-refusal [95% CI] "
        "| ROUGE-1 (random) | ΔROUGE-1 [95% CI] | ASR − random [95% CI] | random seeds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda d: f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]"  # noqa: E731
    for r in rows:
        rnd = lambda c: f" ({r['random_' + c]:.1f})" if f"random_{c}" in r else ""  # noqa: E731
        cut = (un["asr"].mean() - r["asr"]) / un["asr"].mean() * 100 if un["asr"].mean() else float("nan")
        print(
            f"| {r['strength']} | {r['asr']:.1f}{rnd('asr')} | {f(r['d_asr'])} | {cut:.0f}% | "
            f"{r['over_refusal']:.1f}{rnd('over_refusal')} | {f(r['d_over_refusal'])} | {r['rouge1']:.1f}{rnd('rouge1')} | "
            f"{f(r['d_rouge1'])} | {f(r['vs_random_asr']) if 'vs_random_asr' in r else '—'} | {len(r['controls'])} |"
        )
    mod = []
    for spec in a.modules:
        path, ad = spec.rsplit(":", 1)
        res = json.loads(Path(path).read_text())
        met = res["metrics"]

        def trio(v):
            s = {x["name"]: x["kind"] for x in res["sets"]}
            out = {}
            for set_name, vals in met[v].items():
                k = s.get(set_name)
                if k == "safety":
                    out["asr"] = vals["asr"]
                elif k == "over_refusal":
                    out["over_refusal"] = vals["over_refusal"]
                elif k == "utility":
                    out["rouge1"] = vals["rouge1"]
            return out

        u = trio(ad)
        for v in met:
            mm = re.fullmatch(rf"{re.escape(ad)}:([a-z-]+)@(\d+)", v)
            if not mm or mm.group(1).startswith("random"):
                continue
            t = trio(v)
            mod.append(
                {
                    "run": Path(path).parent.parent.name,
                    "method": mm.group(1),
                    "tau": int(mm.group(2)),
                    "relative_cut": (u["asr"] - t["asr"]) / u["asr"] * 100,
                    "d_over_refusal": t["over_refusal"] - u["over_refusal"],
                    "d_rouge1": t["rouge1"] - u["rouge1"],
                }
            )
    if mod:
        mod.sort(key=lambda r: (r["method"], r["tau"], r["run"]))
        print("\nModule-level methods (each run's own rows and unedited adapter: compare changes, not levels):\n")
        print("| run | method | τ | relative ASR cut | Δover-refusal | ΔROUGE-1 |")
        print("|---|---|---|---|---|---|")
        for r in mod:
            print(
                f"| {r['run']} | {r['method']} | {r['tau']} | {r['relative_cut']:.0f}% | {r['d_over_refusal']:+.1f} | "
                f"{r['d_rouge1']:+.1f} |"
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"adapter": a.adapter, "points": rows, "modules": mod}, indent=1) + "\n")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        seen: set[str] = set()  # methods already in the legend (drawn on the first panel)
        for ax, c, lab in (
            (axes[0], "d_rouge1", "ΔROUGE-1 (points)"),
            (axes[1], "d_over_refusal", "Δover-refusal (points)"),
        ):
            xs = [r[c][0] for r in rows]
            ys = [(un["asr"].mean() - r["asr"]) / un["asr"].mean() * 100 for r in rows]
            ax.plot(xs, ys, "o-", color="C0", label="repair (strength t)")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"t={r['strength']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            rr = [r for r in rows if "random_asr" in r]
            if rr:
                cr = "rouge1" if c == "d_rouge1" else "over_refusal"
                ax.plot(
                    [r["random_" + cr] - un[cr].mean() for r in rr],
                    [(un["asr"].mean() - r["random_asr"]) / un["asr"].mean() * 100 for r in rr],
                    "s--",
                    color="C3",
                    label="random, same ΔW energy",
                )
            colours: dict[str, str] = {}
            for run, meth in sorted({(m["run"], m["method"]) for m in mod}):
                pts = sorted((m for m in mod if m["method"] == meth and m["run"] == run), key=lambda m: m["tau"])
                col = colours.setdefault(meth, f"C{len(colours) + 4}")  # C0 repair, C3 random
                leg = f"{meth} (modules)" if meth not in seen else None  # one legend entry per method
                seen.add(meth)
                ax.plot([m[c] for m in pts], [m["relative_cut"] for m in pts], "^:", color=col, label=leg)
            ax.axhline(60, color="grey", lw=0.8, ls=":")
            ax.axvline(-1 if c == "d_rouge1" else 5, color="grey", lw=0.8, ls=":")
            ax.set_xlabel(lab)
            ax.set_ylabel("relative ASR cut (%)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{a.adapter}: repair trade-off (dotted: the issue's bars)")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
