"""Choosing τ (how many modules to edit) from the scores themselves.

Two rules, both on the scores in the method's prune-first order (``descending=True``: high scores are
pruned first, as DDI, SPLoRA and actdir; ``descending=False``: low scores first, as SafeLoRA's cosine):

* ``knee`` (Kneedle, Satopää et al. 2011, without smoothing): sort the scores prune-first, put the rank
  x = 1..n and the score y on [0, 1], and take the point farthest from the chord joining the first and the
  last point. τ = the number of modules up to and including that point. (For an abrupt step, a few
  high scores then a flat tail, the farthest point is the corner, i.e. the first module of the tail, so
  τ counts that one too; the rule is meant for curves that bend, and ``mad`` for clear outliers.)
* ``mad`` (robust outliers): τ = the number of modules whose score lies beyond median + k·MAD
  (median − k·MAD for ascending scores), MAD scaled by 1.4826 so that it estimates σ for normal data.

NaN / None scores (undefined for a module) are ignored. Degenerate inputs (fewer than 3 scores for the
knee, constant scores, MAD = 0) give τ = 0 with the reason in ``details["reason"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import UsageError

RULES = ("knee", "mad")
MAD_SCALE = 1.4826


@dataclass
class AutoTau:
    tau: int
    rule: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "rule": self.rule, **self.details}


def _clean(scores: Sequence[Any]) -> list[float]:
    out = []
    for v in scores:
        if v is None:
            continue
        f = float(v)
        if math.isnan(f):
            continue
        if math.isinf(f):
            raise UsageError("auto τ: a score is infinite")
        out.append(f)
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def knee(scores: Sequence[Any], descending: bool = True) -> AutoTau:
    ys = sorted(_clean(scores), reverse=descending)
    n = len(ys)
    details: dict[str, Any] = {"n": n, "ignored_nan": len(scores) - n}
    if n < 3:
        return AutoTau(0, "knee", {**details, "reason": f"fewer than 3 scores ({n})"})
    lo, hi = min(ys), max(ys)
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return AutoTau(0, "knee", {**details, "reason": "all scores are equal"})
    # normalise: x on [0, 1]; y on [0, 1] with the first (prune-first) point at 1 when descending
    xs = [i / (n - 1) for i in range(n)]
    yn = [(y - lo) / (hi - lo) for y in ys]
    x0, y0, x1, y1 = xs[0], yn[0], xs[-1], yn[-1]
    dx, dy = x1 - x0, y1 - y0
    norm = math.hypot(dx, dy)
    dist = [abs(dy * (x - x0) - dx * (y - y0)) / norm for x, y in zip(xs, yn)]
    i = max(range(n), key=lambda k: (dist[k], -k))  # ties: the earlier point
    if dist[i] <= 1e-12:
        return AutoTau(0, "knee", {**details, "reason": "the sorted scores are a straight line (no knee)"})
    return AutoTau(
        i + 1, "knee", {**details, "knee_rank": i + 1, "knee_score": ys[i], "knee_distance": round(dist[i], 6)}
    )


def mad(scores: Sequence[Any], descending: bool = True, k: float = 3.0) -> AutoTau:
    if not (k > 0 and math.isfinite(k)):
        raise UsageError(f"--mad-k must be a positive number, got {k}")
    xs = _clean(scores)
    n = len(xs)
    details: dict[str, Any] = {"n": n, "ignored_nan": len(scores) - n, "k": k}
    if n == 0:
        return AutoTau(0, "mad", {**details, "reason": "no scores"})
    med = _median(xs)
    m = MAD_SCALE * _median([abs(x - med) for x in xs])
    details.update(median=med, mad=m)
    if m <= 0:
        return AutoTau(0, "mad", {**details, "reason": "MAD is 0 (at least half the scores are equal)"})
    cut = med + k * m if descending else med - k * m
    tau = sum(1 for x in xs if (x > cut if descending else x < cut))
    return AutoTau(tau, "mad", {**details, "cutoff": cut, "direction": ">" if descending else "<"})


def auto_tau(scores: Sequence[Any], descending: bool = True, rule: str = "knee", k: float = 3.0) -> AutoTau:
    """τ from the scores alone; see the module docstring for the rules."""
    if rule == "knee":
        return knee(scores, descending)
    if rule == "mad":
        return mad(scores, descending, k)
    raise UsageError(f"unknown auto-τ rule {rule!r}; known: {', '.join(RULES)}")
