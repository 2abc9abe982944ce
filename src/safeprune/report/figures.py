"""The experiment report's figures (matplotlib, Agg): τ ablation, safety–utility trade-off, risk–coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import plt, save_figure

# where a τ label may sit relative to its point (pixels, y up), tried in this order
_LABEL_SPOTS = [(4, 3), (4, -12), (-4, 3), (-4, -12), (4, 13), (4, -22), (-4, 13), (-4, -22), (10, -5), (-10, -5)]


def place_labels(
    points: list[tuple[float, float, str]], char_w: float = 5.5, height: float = 9.0
) -> list[tuple[float, float] | None]:
    """Offsets (pixels, lower-left corner of the text) that keep every label's box clear of the others and of
    every point; None where no spot is free (the value is in the tables anyway)."""

    def hit(a, b) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    taken = [(x - 3, y - 3, x + 3, y + 3) for x, y, _ in points]
    out: list[tuple[float, float] | None] = []
    for x, y, text in points:
        w = char_w * len(text)
        for dx, dy in _LABEL_SPOTS:
            x0 = x + dx if dx >= 0 else x + dx - w
            box = (x0, y + dy, x0 + w, y + dy + height)
            if not any(hit(box, b) for b in taken):
                taken.append(box)
                out.append((x0 - x, dy))
                break
        else:
            out.append(None)
    return out


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def tau_ablation(ad: dict[str, Any], asr_key: str, util_key: str | None, path: Path, title: str) -> Path:
    """ASR (and ROUGE-1) against τ for every method, with the random control's mean and seed range."""
    panels = [("ASR %", asr_key)] + ([("ROUGE-1", util_key)] if util_key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=110)
    axes = [axes] if len(panels) == 1 else list(axes)
    by_method: dict[str, list[tuple[int, dict]]] = {}
    for row in ad["rows"]:
        v = row["variant"]
        if v["method"] not in (None, "random"):
            by_method.setdefault(v["method"], []).append((v["tau"], row["metrics"]))
    ref = next(r for r in ad["rows"] if r["variant"]["method"] is None)["metrics"]
    for ax, (label, key) in zip(axes, panels):
        for i, (m, pts) in enumerate(by_method.items()):
            pts = sorted((t, mm[key]) for t, mm in pts if key in mm)
            if not pts:
                continue
            xs = [0] + [t for t, _ in pts]
            ys = [ref[key]["value"]] + [s["value"] for _, s in pts]
            lo = [ref[key]["lo"]] + [s["lo"] for _, s in pts]
            hi = [ref[key]["hi"]] + [s["hi"] for _, s in pts]
            c = COLORS[i % len(COLORS)]
            ax.plot(xs, ys, "o-", color=c, label=m, lw=1.6, ms=4)
            ax.fill_between(xs, lo, hi, color=c, alpha=0.08)
        rs = sorted((int(t), r["metrics"][key]) for t, r in ad["random"].items() if key in r["metrics"])
        if rs:
            xs = [0] + [t for t, _ in rs]
            ys = [ref[key]["value"]] + [s["value"] for _, s in rs]
            ax.plot(xs, ys, "s--", color="gray", label="random (mean of seeds)", lw=1.4, ms=4)
            for t, s in rs:
                seeds = s.get("seeds") or []
                if seeds:
                    ax.vlines(t, min(seeds), max(seeds), color="gray", lw=4, alpha=0.35)
        ax.set_xlabel("τ (modules edited)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def tradeoff(
    ad: dict[str, Any], asr_key: str, util_key: str, path: Path, title: str, base: dict[str, Any] | None = None
) -> Path:
    """ASR against ROUGE-1 for every variant (lower-right is better)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    methods: list[str] = []
    labels: dict[tuple[str, float, float], list[str]] = {}  # τ values sharing one point get one label "2,4"
    for row in ad["rows"]:
        v, m = row["variant"], row["metrics"]
        if asr_key not in m or util_key not in m:
            continue
        meth = v["method"] or "adapter"
        if meth not in methods:
            methods.append(meth)
        c = (
            "gray"
            if meth == "random"
            else ("black" if meth == "adapter" else COLORS[methods.index(meth) % len(COLORS)])
        )
        ax.scatter(
            m[util_key]["value"],
            m[asr_key]["value"],
            color=c,
            s=22 if meth == "random" else 34,
            marker="x" if meth == "random" else "o",
            label=meth,
            alpha=0.8,
        )
        if v["tau"] is not None and meth != "random":
            key = (meth, round(m[util_key]["value"], 6), round(m[asr_key]["value"], 6))
            labels.setdefault(key, []).append(str(v["tau"]))
    # controls evaluated without the utility set: their mean ASR per τ as a horizontal line
    for k, (t, r) in enumerate(sorted((int(t), r) for t, r in ad.get("random", {}).items())):
        m = r["metrics"]
        if asr_key in m and util_key not in m:
            ax.axhline(
                m[asr_key]["value"],
                color="gray",
                ls=(0, (2, 2 + k)),
                lw=1.0,
                label=f"random τ={t} (mean ASR; no utility run)",
            )
    if base and asr_key in base and util_key in base:
        ax.scatter(
            base[util_key]["value"],
            base[asr_key]["value"],
            marker="*",
            s=120,
            color="goldenrod",
            label="base (no adapter)",
        )
    _label_points(ax, [(x, y, ",".join(ts)) for (_, x, y), ts in labels.items()])
    h, lab = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for hh, ll in zip(h, lab):
        seen.setdefault(ll, hh)
    ax.legend(seen.values(), seen.keys(), fontsize=7)
    ax.set_xlabel("ROUGE-1 (higher is better)")
    ax.set_ylabel("ASR % (lower is better)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def risk_coverage(curves: dict[str, dict[str, Any]], path: Path, title: str, which: str = "rouge1") -> Path:
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=110)
    for i, (label, c) in enumerate(curves.items()):
        cv = c[which]
        style = "--" if label.startswith("base") else "-"
        ax.plot(
            [100 * x for x in cv["refer"]], cv["accuracy"], style, label=label, color=COLORS[i % len(COLORS)], lw=1.5
        )
    ax.set_xlabel("refer to experts: most uncertain share removed (%)")
    ax.set_ylabel("ROUGE-1 on the rest" if which == "rouge1" else "accuracy (ROUGE-1 > 0.15) on the rest, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def repair_tradeoff(
    reps: list[dict[str, Any]], asr_key: str, util_key: str | None, orr_key: str | None, path: Path, title: str
) -> Path:
    """The repair's trade-off curve: the relative ASR cut against ΔROUGE-1 and against Δover-refusal (both vs
    the unedited adapter), one point per strength, and each strength's energy-matched random controls (their
    mean, and each seed as a small cross)."""
    panels = [(k, lab) for k, lab in ((util_key, "ΔROUGE-1 (points)"), (orr_key, "Δover-refusal (points)")) if k]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts, labels = [], []
        for r in sorted(reps, key=lambda r: r["variant"]["strength"]):
            d, dx = r["vs_ref"].get(asr_key), r["vs_ref"].get(key)
            ref = r["metrics"][asr_key]["value"] - d["delta"] if d else None
            if not d or not dx or not ref:
                continue
            pts.append((dx["delta"], -100 * d["delta"] / ref))
            labels.append((dx["delta"], -100 * d["delta"] / ref, f"t={r['variant']['strength']:g}"))
            ctl = [c for c in r.get("controls") or [] if c["vs_ref"].get(asr_key) and c["vs_ref"].get(key)]
            if ctl:
                cx = [c["vs_ref"][key]["delta"] for c in ctl]
                cy = [-100 * c["vs_ref"][asr_key]["delta"] / ref for c in ctl]
                ax.scatter(cx, cy, marker="x", s=14, color="gray", alpha=0.6)
                ax.scatter([sum(cx) / len(cx)], [sum(cy) / len(cy)], marker="s", s=30, color="gray")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[0], label="repair", lw=1.6)
        ax.scatter([], [], marker="s", color="gray", label="random controls, same ΔW energy (mean; × = seeds)")
        ax.axhline(60, color="green", ls=":", lw=1)
        ax.axvline(-1 if key == util_key else 5, color="green", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("ASR cut relative to the adapter (%)")
        ax.grid(alpha=0.3)
        _label_points(ax, labels)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title + " (dotted: issue 13's bar)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """τ labels beside their points, none on top of another (see :func:`place_labels`)."""
    if not points:
        return
    ax.autoscale_view()
    px = [(*ax.transData.transform((x, y)), t) for x, y, t in points]
    for (x, y, t), off in zip(points, place_labels(px)):
        if off is not None:
            ax.annotate(t, (x, y), xytext=off, textcoords="offset pixels", fontsize=7, ha="left", va="bottom")
