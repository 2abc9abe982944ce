"""Choosing which modules to edit from a score table.

Rules (DDI paper Eq. 8 and its threshold alternative):

* ``top=τ``: the τ modules a method ranks first (default τ = 10);
* ``threshold=θ``: every module whose score is at or beyond θ (``≥`` when high means "prune first", as
  for DDI and SPLoRA; ``≤`` for scores where low means "act", as SafeLoRA's cosine);
* ``threshold_norm=θ``: the same on the method's bounded column (``ddi_norm``);
* ``auto="knee"|"mad"``: τ chosen from the candidates' scores (:mod:`safeprune.selection.autotau`), then top τ.
  The rule, τ and its details are recorded in :class:`SelectionRule` (and so in ``safeprune.json``).
  SPLoRA's official "complement" top rule is not applied to an automatic τ: τ counts modules in the
  method's prune-first order.

Ties are broken deterministically: by score, then layer index, then module path. Module-type and layer
filters restrict which modules are candidates at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..adapter import parse_module_types
from ..errors import UsageError
from ..io.text import fmt_number
from ..scoring.table import DEFAULT_TOP, ScoreTable, sort_key
from .autotau import RULES, auto_tau


@dataclass
class SelectionRule:
    method: str
    column: str
    descending: bool
    top: int | None = None
    threshold: float | None = None
    module_types: list[str] | None = None
    layers: list[int] | None = None
    # "complement": the official SPLoRA HEAD rule, top K means "all but the K-1 best" (see scorers/splora.py)
    top_rule: str | None = None
    requested_top: int | None = None
    auto: str | None = None  # "knee" | "mad": τ computed from the scores
    auto_tau: int | None = None
    auto_details: dict[str, Any] | None = None

    def describe(self) -> str:
        where = []
        if self.module_types:
            where.append("type in " + ",".join(self.module_types))
        if self.layers is not None:
            where.append("layer in " + ",".join(map(str, self.layers)))
        scope = f" among modules with {' and '.join(where)}" if where else ""
        if self.top is not None:
            order = "highest" if self.descending else "lowest"
            if self.top_rule == "complement":
                return (
                    f"{self.top} {order} by {self.column} = all but the {max(0, self.requested_top - 1)} "
                    f"highest, K={self.requested_top} (official SPLoRA rule: prune <= the K-th largest){scope}"
                )
            how = f" (τ chosen by the {self.auto} rule)" if self.auto else ""
            return f"top {self.top} by {self.column} ({order} first){how}{scope}"
        op = ">=" if self.descending else "<="
        return f"{self.column} {op} {self.threshold}{scope}"


@dataclass
class Selection:
    rule: SelectionRule
    selected: list[str]  # in the order the method ranks them
    reasons: dict[str, str] = field(default_factory=dict)
    candidates: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.reasons

    def __len__(self) -> int:
        return len(self.selected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": asdict(self.rule),
            "description": self.rule.describe(),
            "candidates": self.candidates,
            "selected": [{"module": m, "reason": self.reasons[m]} for m in self.selected],
        }


def select(
    table: ScoreTable,
    method: str = "ddi",
    *,
    top: int | None = None,
    threshold: float | None = None,
    threshold_norm: float | None = None,
    column: str | None = None,
    module_types: Iterable[str] | str | None = None,
    layers: Iterable[int] | None = None,
    auto: str | None = None,
    mad_k: float = 3.0,
) -> Selection:
    if method not in table.methods:
        raise UsageError(f"the score table has no {method!r} scores (it has: {', '.join(table.methods) or 'none'})")
    given = sum(x is not None for x in (top, threshold, threshold_norm, auto))
    if given > 1:
        raise UsageError("give only one of --top, --threshold, --threshold-norm and --auto-tau")
    if auto is not None:
        if auto not in RULES:
            raise UsageError(f"unknown --auto-tau rule {auto!r}; known: {', '.join(RULES)}")
    info = table.methods[method]
    col = column or info.primary
    if threshold_norm is not None:
        col = f"{info.primary}_norm"
        threshold = threshold_norm
    if col not in table.score_columns:
        raise UsageError(f"method {method!r} has no column {col!r}")
    if given == 0:
        top = DEFAULT_TOP
    if top is not None and top < 0:
        raise UsageError(f"--top must be >= 0, got {top}")
    types = parse_module_types(module_types)
    layer_list = None if layers is None else sorted(set(int(x) for x in layers))
    rule = SelectionRule(
        method=method,
        column=col,
        descending=info.descending,
        top=top,
        threshold=threshold,
        module_types=types,
        layers=layer_list,
    )

    cands = [
        r
        for r in table.rows
        if (types is None or r["type"] in types) and (layer_list is None or r["layer"] in layer_list)
    ]
    if auto is not None:
        at = auto_tau([r.get(col) for r in cands], info.descending, auto, mad_k)
        top = rule.top = rule.auto_tau = at.tau
        rule.auto, rule.auto_details = auto, at.details
    elif top is not None and info.options.get("top_rule") == "complement":
        # official SPLoRA (HEAD): threshold = K-th largest score, prune every module at or below it
        rule.top_rule, rule.requested_top = "complement", top
        top = rule.top = (len(cands) - min(top, len(cands)) + 1) if top > 0 else 0
    if types is not None:
        unknown = set(types) - {r["type"] for r in table.rows}
        if unknown:
            raise UsageError(
                f"no module of type {', '.join(sorted(unknown))} in the adapter "
                f"(types: {', '.join(sorted({r['type'] for r in table.rows}))})"
            )
    ordered = sorted(cands, key=lambda r: sort_key(r, col, info.descending))
    if top is not None:  # a module whose score is undefined (NaN/None, documented per scorer) is never chosen
        chosen = [r for r in ordered if r.get(col) is not None and r.get(col) == r.get(col)][:top]
    else:

        def hit(v: Any) -> bool:
            return v is not None and v == v and (v >= threshold if info.descending else v <= threshold)

        chosen = [r for r in ordered if hit(r.get(col))]
    op = ">=" if info.descending else "<="
    reasons = {}
    for i, r in enumerate(chosen, start=1):
        if top is not None:
            reasons[r["module"]] = f"rank {i} of {len(cands)} by {col} ({col}={fmt_number(r.get(col))})"
        else:
            reasons[r["module"]] = f"{col}={fmt_number(r.get(col))} {op} {threshold}"
    return Selection(rule=rule, selected=[r["module"] for r in chosen], reasons=reasons, candidates=len(cands))
