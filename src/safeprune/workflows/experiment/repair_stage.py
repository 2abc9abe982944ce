"""The ``repairs:`` stage of ``safeprune run``: ``safeprune repair`` on every adapter, the fit rewritten at
the other strengths asked for (no refit), and energy-matched random controls of each written strength.

Layout, beside the module-level variants::

    variants/<adapter>/<repair>@t<strength>/                    PEFT directories (+ key.json); the fit's
    variants/<adapter>/<repair>-random-s<seed>@t<strength>/     summary in <repair>@fit.json

Each output is cached by a key of everything it depends on (the adapter's content, the base, the options, the
probe data folder, the version), like the other stages; a control's key includes its repair's gates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...adapter.names import MANIFEST_NAME
from ...io.datapaths import data_root
from ...io.files import write_text_atomic
from ...version import __version__
from ..repair import random_control, repair, restrength
from ..repair_options import RepairOptions
from .config import ExperimentConfig, RepairSpec
from .stages import _save
from .variants import Log, Variant, adapter_identity, digest, fresh, path_identity, read_key, repair_name


def stage_repair(cfg: ExperimentConfig, adapters: dict[str, str], out: Path, log: Log, progress: bool) -> list[Variant]:
    variants: list[Variant] = []
    for aname, apath in adapters.items():
        for spec in cfg.repairs:
            variants += _repair_variants(cfg, aname, apath, spec, out, log, progress)
    return variants


def _repair_variants(
    cfg: ExperimentConfig, aname: str, apath: str, spec: RepairSpec, out: Path, log: Log, progress: bool
) -> list[Variant]:
    root = out / "variants" / aname
    fit_key = {
        "stage": "repair",
        "adapter": adapter_identity(apath),
        "base": path_identity(cfg.base),
        "options": spec.options,
        "data": str(data_root(spec.data)),  # the probe folder (its files are read-only inputs)
        "version": __version__,
    }
    fit_json = root / f"{spec.name}@fit.json"
    rec = read_key(fit_json) or {}
    if rec.get("key") != json.loads(json.dumps(fit_key, default=str)) or not Path(rec.get("path", "")).is_dir():
        t0 = time.perf_counter()
        log(f"repair {aname} × {spec.name}: fitting ...")
        opts = RepairOptions(**spec.options)
        res = repair(apath, cfg.base, options=opts, data=spec.data, progress=progress, log=log)
        t = float(res.summary["strength"])
        dest = root / f"{spec.name}@t{t:g}"
        _save(res.adapter, dest, {"stage": "repair", "fit": fit_key, "strength": t})
        rec = {"key": fit_key, "path": str(dest), "strength": t, "summary": res.summary}
        write_text_atomic(fit_json, json.dumps(rec, indent=1, default=str))
        log(f"repair {aname} × {spec.name}: strength {t:g} chosen, {time.perf_counter() - t0:.0f} s")
    chosen, fitted = float(rec["strength"]), Path(rec["path"])
    out_vars: list[Variant] = []
    for t in dict.fromkeys([chosen, *spec.strengths]):
        if t == chosen:
            dest = fitted
        else:
            dest = root / f"{spec.name}@t{t:g}"
            key = {"stage": "repair-strength", "fit": fit_key, "strength": t}
            if not fresh(dest, dest / "key.json", key):
                _save(restrength(apath, fitted, t), dest, key)
        name = repair_name(aname, spec.name, t)
        edit = _edit_record(dest)
        out_vars.append(
            Variant(
                name=name,
                adapter=aname,
                method=spec.name,
                path=str(dest),
                action="repair",
                strength=t,
                energy_removed=_energy(edit),
                selected=[],
            )
        )
        gates = digest(edit.get("gates"))
        for seed in spec.seeds:
            cdest = root / f"{spec.name}-random-s{seed}@t{t:g}"
            ckey = {
                "stage": "repair-control",
                "adapter": adapter_identity(apath),
                "gates": gates,
                "seed": seed,
                "version": __version__,
            }
            if not fresh(cdest, cdest / "key.json", ckey):
                _save(random_control(apath, dest, seed), cdest, ckey)
            out_vars.append(
                Variant(
                    name=repair_name(aname, spec.name, t, seed),
                    adapter=aname,
                    method=f"{spec.name}-random",
                    seed=seed,
                    path=str(cdest),
                    action="random-control",
                    strength=t,
                    energy_removed=_energy(_edit_record(cdest)),
                    control_of=name,
                    selected=[],
                )
            )
    log(
        f"repair {aname} × {spec.name}: {len(out_vars)} variants ready (strengths {', '.join(f'{v.strength:g}' for v in out_vars if v.control_of is None)})"
    )
    return out_vars


def _edit_record(dest: Path) -> dict[str, Any]:
    """The ``edit`` record of a written variant's manifest (gates, energy removed)."""
    return (read_key(dest / MANIFEST_NAME) or {}).get("edit", {})


def _energy(edit: dict[str, Any]) -> float | None:
    """The share of ΔW energy an edit removed: a control records it at the top, a repair in its summary."""
    v = edit.get("energy_removed", (edit.get("summary") or {}).get("energy_removed"))
    return float(v) if isinstance(v, (int, float)) else None


def repair_summaries(out: Path, cfg: ExperimentConfig, adapters: list[str]) -> dict[str, dict[str, Any]]:
    """{adapter: {repair name: the fit's summary}} as the stage recorded them (for the report)."""
    res: dict[str, dict[str, Any]] = {}
    for a in adapters:
        for spec in cfg.repairs:
            rec = read_key(out / "variants" / a / f"{spec.name}@fit.json")
            if rec:
                res.setdefault(a, {})[spec.name] = rec.get("summary", {})
    return res
