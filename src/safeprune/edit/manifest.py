"""The ``safeprune.json`` manifest written next to every edited adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import LoraAdapter
from ..io.hashing import sha256_file
from ..io.provenance import command_line, describe_dir, now_iso, versions
from ..scoring.table import ScoreTable
from ..selection import Selection
from ..weights import WeightSource


def describe_source(src: WeightSource | str | Path) -> dict[str, Any]:
    if isinstance(src, WeightSource):
        files = src.files()
        desc = src.description
    else:
        p = Path(src)
        files = [p] if p.is_file() else sorted(x for x in p.glob("*") if x.is_file()) if p.is_dir() else []
        desc = str(src)
    extra = []
    if files and files[0].parent.is_dir():
        d = files[0].parent
        extra = [d / n for n in ("config.json", "model.safetensors.index.json") if (d / n).is_file()]
    return {"spec": desc, "files": [sha256_file(f) for f in list(dict.fromkeys(extra + files))]}


def build_manifest(
    *,
    action: str,
    original: LoraAdapter,
    edited: LoraAdapter,
    table: ScoreTable | None,
    selection: Selection | None,
    edit: dict[str, Any],
    sources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    selected = set(selection.selected) if selection is not None else set()
    reasons = selection.reasons if selection is not None else {}
    modules = []
    rows = {r["module"]: r for r in table.to_records()} if table is not None else {}
    for name in original.modules:
        rec = dict(rows.get(name, {"module": name}))
        if name in selected:
            rec["action"] = action if action != "prune" else ("pruned" if edit.get("mode") == "remove" else "zeroed")
            rec["reason"] = reasons.get(name, "")
        else:
            rec["action"] = "kept"
        modules.append(rec)
    before, after = original.num_params, edited.num_params
    return {
        "tool": "safeprune",
        "action": action,
        "created": now_iso(),
        "command_line": command_line(),
        "versions": versions(),
        "inputs": {
            "adapter": {
                "path": str(original.path) if original.path else None,
                "files": describe_dir(original.path) if original.path else [],
            },
            **{role: describe_source(src) for role, src in (sources or {}).items() if src is not None},
        },
        "scoring": {
            k: {"primary": v.primary, "descending": v.descending, "options": v.options}
            for k, v in (table.methods.items() if table is not None else [])
        },
        "selection": selection.to_dict() if selection is not None else None,
        "edit": {
            **edit,
            "lora_params_before": before,
            "lora_params_after": after,
            "lora_params_kept_pct": round(100.0 * after / before, 4) if before else None,
            "modules_before": len(original.modules),
            "modules_after": len(edited.modules),
        },
        "modules": modules,
    }
