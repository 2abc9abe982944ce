"""Plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402

from ..io.files import atomic_path  # noqa: E402
from ..scoring.table import ScoreTable  # noqa: E402

MARK_OUTLINE = [patheffects.withStroke(linewidth=2.5, foreground="white")]
_TYPE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def heatmap(
    table: ScoreTable,
    path: str | Path,
    column: str = "ddi",
    marked: Iterable[str] = (),
    title: str | None = None,
) -> Path:
    """Layer × module-type heatmap of one score column; ``marked`` modules get an ✕."""
    types = sorted({r["type"] for r in table.rows}, key=lambda t: (_TYPE_ORDER.index(t) if t in _TYPE_ORDER else 99, t))
    layers = sorted({r["layer"] for r in table.rows if r["layer"] is not None})
    no_layer = [r for r in table.rows if r["layer"] is None]
    row_labels = [str(x) for x in layers] + (["-"] if no_layer else [])
    grid = np.full((len(row_labels), len(types)), np.nan)
    marks = set(marked)
    pos: dict[str, tuple[int, int]] = {}
    for r in table.rows:
        i = layers.index(r["layer"]) if r["layer"] is not None else len(layers)
        j = types.index(r["type"])
        v = r.get(column)
        grid[i, j] = np.nan if v is None else float(v)
        pos[r["module"]] = (i, j)
    h = max(3.0, 0.22 * len(row_labels) + 1.5)
    w = max(6.0, 0.9 * len(types) + 3.0)
    fig, ax = plt.subplots(figsize=(w, h), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    step = max(1, len(row_labels) // 32)
    ax.set_yticks(range(0, len(row_labels), step), row_labels[::step])
    ax.set_ylabel("layer")
    for name in marks:
        if name in pos:
            i, j = pos[name]
            # red with a white outline: visible on the dark cells of viridis as on the bright ones
            ax.text(
                j,
                i,
                "✕",
                ha="center",
                va="center",
                color="red",
                fontsize=9,
                fontweight="bold",
                path_effects=MARK_OUTLINE,
            )
    fig.colorbar(im, ax=ax, label=column)
    ax.set_title(title or f"{column} per module" + (" (✕ = selected)" if marks else ""), fontsize=9, wrap=True)
    fig.tight_layout()
    return save_figure(fig, path)


def score_curve(
    scores: Sequence[Any],
    descending: bool,
    auto_results: Iterable[Any] = (),
    path: str | Path = "score_curve.png",
    title: str | None = None,
    ylabel: str = "score",
) -> Path:
    """The scores sorted in the method's prune-first order (rank 1 = pruned first), with the τ of each
    :class:`safeprune.selection.AutoTau` in ``auto_results`` marked: the knee as a point + vertical line, the
    MAD rule as its cutoff (horizontal) and τ (vertical). NaN scores are left out."""
    ys = sorted((float(v) for v in scores if v is not None and not math.isnan(float(v))), reverse=descending)
    xs = list(range(1, len(ys) + 1))
    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=110)
    ax.plot(xs, ys, marker=".", ms=3, lw=1, color="tab:blue", label="sorted scores")
    colors = {"knee": "tab:red", "mad": "tab:green"}
    for res in auto_results:
        c = colors.get(res.rule, "tab:gray")
        d = res.details
        if res.tau > 0:
            ax.axvline(res.tau + 0.5, color=c, ls="--", lw=1, label=f"{res.rule}: τ = {res.tau}")
        else:
            ax.plot([], [], color=c, ls="--", label=f"{res.rule}: τ = 0 ({d.get('reason', '')})")
        if res.rule == "knee" and res.tau > 0:
            ax.plot([res.tau], [ys[res.tau - 1]], "o", color=c, ms=6)
        if res.rule == "mad" and "cutoff" in d:
            ax.axhline(
                d["cutoff"],
                color=c,
                ls=":",
                lw=1,
                label=f"median {'+' if descending else '−'} {d['k']:g}·MAD = {d['cutoff']:.3g}",
            )
    ax.set_xlabel("rank (1 = pruned first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"sorted {ylabel}", fontsize=9, wrap=True)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""
    try:
        with atomic_path(path, "plot") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
