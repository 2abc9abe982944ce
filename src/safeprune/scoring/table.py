"""The score table: one record per LoRA module, one column per score, plus per-method ranks."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ID_COLUMNS = ["module", "layer", "type", "r", "in", "out", "scaling"]


@dataclass
class MethodInfo:
    name: str
    primary: str
    descending: bool
    columns: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


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
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        for r in self.to_records():
            w.writerow({k: _fmt_csv(v) for k, v in r.items()})
        return buf.getvalue()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreTable":
        methods = {k: MethodInfo(**v) for k, v in d.get("methods", {}).items()}
        return cls(rows=[dict(r) for r in d["rows"]], methods=methods, meta=d.get("meta", {}))

    def to_markdown(self, columns: Iterable[str] | None = None, sort_by: str | None = None, limit: int | None = None) -> str:
        cols = list(columns) if columns else self.columns
        rows = self.ordered(sort_by) if sort_by else self.rows
        rows = rows[:limit] if limit else rows
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4f}"
        return f"{v:.3e}"
    return str(v)


def _fmt_csv(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (temp file in the same directory + rename)."""
    import os
    import tempfile

    from .errors import OutputError

    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise OutputError(f"cannot write ({e.strerror or e}); nothing was written", p) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write ({e.strerror or e}); nothing was written", p) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
