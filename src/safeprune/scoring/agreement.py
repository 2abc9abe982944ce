"""Agreement between the module rankings of several scoring methods (``safeprune scan --method all``).

For every pair of methods in a :class:`~safeprune.scoring.table.ScoreTable`: Spearman's ρ and Kendall's τ-b
(scipy.stats) between their ``rank_<method>`` columns (rank 1 = the module the method would act on first,
so each method's own direction is already taken into account), with two-sided p-values, and the overlap
of their top-K lists (K = 10 by default, the selection default).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

from scipy.stats import kendalltau, spearmanr

from .table import DEFAULT_TOP, ScoreTable


def _clean(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def top_list(table: ScoreTable, method: str, k: int = DEFAULT_TOP) -> list[str]:
    info = table.methods[method]
    return [r["module"] for r in table.ordered(info.primary, info.descending)[:k]]


def rank_agreement(table: ScoreTable, k: int = DEFAULT_TOP) -> list[dict[str, Any]]:
    names = list(table.methods)
    out: list[dict[str, Any]] = []
    for a, b in combinations(names, 2):
        ra = [r[f"rank_{a}"] for r in table.rows]
        rb = [r[f"rank_{b}"] for r in table.rows]
        if len(ra) < 2:
            rho = p_rho = tau = p_tau = float("nan")
        else:
            rho, p_rho = spearmanr(ra, rb)
            tau, p_tau = kendalltau(ra, rb)
        ta, tb = top_list(table, a, k), top_list(table, b, k)
        common = [m for m in ta if m in set(tb)]
        out.append(
            {
                "a": a,
                "b": b,
                "spearman": _clean(rho),
                "spearman_p": _clean(p_rho),
                "kendall": _clean(tau),
                "kendall_p": _clean(p_tau),
                "top_k": k,
                "top_overlap": len(common),
                "top_common": common,
            }
        )
    return out
