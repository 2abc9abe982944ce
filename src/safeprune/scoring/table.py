"""The score table: one record per LoRA module, one column per score, plus per-method ranks."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..adapter import adapter_fingerprint
from ..errors import InputError
from ..io.files import json_default
from ..io.jsonio import loads_bounded, read_text_bounded
from ..io.text import fmt_number
from .base import REGISTRY

DEFAULT_TOP = 10  # modules acted on when no rule is given (the DDI paper's τ)
ID_COLUMNS = ["module", "layer", "type", "r", "in", "out", "scaling"]


@dataclass
class MethodInfo:
    name: str
    primary: str
    descending: bool
    columns: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def module_row(m: Any) -> dict[str, Any]:
    """The identity columns of a score-table row for one LoRA module (:data:`ID_COLUMNS`)."""
    return {
        "module": m.name,
        "layer": m.layer,
        "type": m.module_type,
        "r": m.r,
        "in": m.in_features,
        "out": m.out_features,
        "scaling": m.scaling,
    }


def sort_key(row: dict[str, Any], column: str, descending: bool) -> tuple:
    """Deterministic order: by score (NaN last), then layer, then module path."""
    v = row.get(column)
    bad = v is None or (isinstance(v, float) and math.isnan(v))
    score = 0.0 if bad else float(v)
    layer = row.get("layer")
    return (bad, -score if descending else score, -1 if layer is None else layer, row["module"])


@dataclass
class ScoreTable:
    rows: list[dict[str, Any]]
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def row(self, module: str) -> dict[str, Any]:
        for r in self.rows:
            if r["module"] == module:
                return r
        raise KeyError(module)

    def column(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]

    @property
    def score_columns(self) -> list[str]:
        cols: list[str] = []
        for info in self.methods.values():
            cols += [c for c in info.columns if c not in cols]
        return cols

    @property
    def columns(self) -> list[str]:
        return ID_COLUMNS + self.score_columns + [f"rank_{m}" for m in self.methods]

    def ordered(self, column: str, descending: bool = True) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: sort_key(r, column, descending))

    def add_ranks(self) -> None:
        """rank_<method>: 1 = the module this method would prune first."""
        for name, info in self.methods.items():
            for i, r in enumerate(self.ordered(info.primary, info.descending), start=1):
                r[f"rank_{name}"] = i

    # -- export ---------------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        return [{c: r.get(c) for c in self.columns} for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (a score a method leaves undefined) becomes null."""
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in self.to_records()]
        return {
            "methods": {k: vars(v) for k, v in self.methods.items()},
            "meta": self.meta,
            "columns": self.columns,
            "rows": rows,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=json_default)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        for r in self.to_records():
            w.writerow({k: _fmt_csv(v) for k, v in r.items()})
        return buf.getvalue()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreTable:
        methods = {k: MethodInfo(**v) for k, v in d.get("methods", {}).items()}
        return cls(rows=[dict(r) for r in d["rows"]], methods=methods, meta=d.get("meta", {}))

    def to_markdown(
        self, columns: Iterable[str] | None = None, sort_by: str | None = None, limit: int | None = None
    ) -> str:
        cols = list(columns) if columns else self.columns
        rows = self.ordered(sort_by) if sort_by else self.rows
        rows = rows[:limit] if limit else rows
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(fmt_number(r.get(c)) for c in cols) + " |")
        return "\n".join(out)


def _fmt_csv(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v


def read_score_table(path: Path, adapter=None) -> ScoreTable:
    """A score table written by ``scan --json`` / ``scan-act -o``, validated as untrusted input: one row per
    module, each named once, every score a finite number (or null where the method documents an undefined
    score). With ``adapter``: exactly that adapter's modules, and the table's adapter fingerprint (when it
    carries one) must be this adapter's. The one reader of score tables."""
    try:
        data = loads_bounded(read_text_bounded(Path(path), "a score table"), path, "the score table")
    except FileNotFoundError:
        raise InputError("score table not found", path) from None
    except OSError as e:
        raise InputError(f"cannot read the score table ({e.strerror or e})", path) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(
            f"not valid JSON ({getattr(e, 'msg', e)}); write one with `safeprune scan --json`", path
        ) from None
    if not isinstance(data, dict) or "rows" not in data:
        raise InputError("not a score table (no 'rows'); write one with `safeprune scan --json`", path)
    _check_table_shape(data, path)
    try:
        table = ScoreTable.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"not a safeprune score table ({type(e).__name__}: {e})", path) from None
    _check_scores(table, path)
    if adapter is not None:
        _check_table_matches(table, adapter, path)
    return table


def _check_table_shape(data: dict[str, Any], path: Path) -> None:
    rows, methods = data.get("rows"), data.get("methods", {})
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError("not a score table: 'rows' must be a list of objects", path)
    if not isinstance(methods, dict) or not methods or not all(isinstance(v, dict) for v in methods.values()):
        raise InputError("not a score table: 'methods' must name at least one scoring method", path)
    if not isinstance(data.get("meta", {}), dict):
        raise InputError("not a score table: 'meta' must be an object", path)
    for m, info in methods.items():
        ok = (
            isinstance(info.get("primary"), str)
            and isinstance(info.get("descending"), bool)
            and isinstance(info.get("columns"), list)
            and all(isinstance(c, str) for c in info["columns"])
            and info["primary"] in info["columns"]
            and isinstance(info.get("options", {}), dict)
            and all(isinstance(info.get(k, ""), str) for k in ("name", "description"))
        )
        if not ok:
            raise InputError(
                f"not a score table: method {m!r} needs a primary column among its columns, "
                "descending true/false and options as an object",
                path,
            )
    kinds = {
        "layer": (int, type(None)),
        "type": (str,),
        "r": (int,),
        "in": (int,),
        "out": (int,),
        "scaling": (int, float),
    }
    seen: set[str] = set()
    for i, r in enumerate(rows, start=1):
        name = r.get("module")
        if not isinstance(name, str) or not name:
            raise InputError(f"row {i} has no module name", path)
        if name in seen:
            raise InputError(f"module {name!r} has two rows", path)
        seen.add(name)
        bad = next(
            (k for k, t in kinds.items() if k in r and (isinstance(r[k], bool) or not isinstance(r[k], t))), None
        )
        if bad is not None:
            raise InputError(f"module {name!r}: {bad!r} is {r[bad]!r}, not what a score table holds there", path)


def _check_scores(table: ScoreTable, path: Path) -> None:
    """Every score is a number or null. The column a method ranks by must be finite, except where the method
    documents an undefined score (``Scorer.nan_allowed``: such modules are never selected); diagnostic
    columns may be undefined (null)."""
    for m, info in table.methods.items():
        allowed = REGISTRY[m].nan_allowed if m in REGISTRY else frozenset()
        ranked = {info.primary, f"{info.primary}_norm"}
        for c in info.columns:
            for r in table.rows:
                v = r.get(c)
                if isinstance(v, bool) or not (v is None or isinstance(v, (int, float))):
                    raise InputError(f"score {c!r} of module {r['module']!r} is {v!r}, not a number", path)
                undefined = v is None or math.isnan(v)
                if c in ranked and c in r and (undefined and c not in allowed or not undefined and math.isinf(v)):
                    raise InputError(f"score {c!r} of module {r['module']!r} is {v}, not a finite number", path)
                if c in ranked and c not in r:
                    raise InputError(f"score {c!r} of module {r['module']!r} is missing", path)
                if v is None and c in r:
                    r[c] = float("nan")  # JSON null = an undefined score
                elif v is not None and math.isinf(v):
                    raise InputError(f"score {c!r} of module {r['module']!r} is {v}, not a finite number", path)


def _check_table_matches(table: ScoreTable, adapter, path: Path) -> None:
    have, want = {r["module"] for r in table.rows}, set(adapter.modules)
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise InputError(
            "the score table does not match the adapter's modules ("
            + "; ".join(
                x
                for x in (
                    f"not in the adapter: {', '.join(extra[:3])}" if extra else "",
                    f"not scored: {', '.join(missing[:3])}" if missing else "",
                )
                if x
            )
            + ")",
            path,
        )
    recorded = table.meta.get("adapter_sha256")
    if recorded is not None and adapter.path is not None and recorded != adapter_fingerprint(adapter.path):
        raise InputError(
            "the score table was computed for another adapter (its adapter_sha256 differs from this "
            "adapter's config and weights)",
            path,
        )
