"""The stages of ``safeprune run``: finetune? → score → select/edit (methods + random control) → evaluate →
latency. Each stage writes its outputs with a ``key.json`` describing everything they depend on; a rerun
reuses an output whose key is unchanged and redoes only what changed. Generations are cached per
(model, adapter content, prompt, settings), so re-evaluating an unchanged variant generates nothing.

Layout of the output directory::

    adapters/<name>/                 finetuned adapters (finetune stage)
    scores/<adapter>/<method>.json   score tables (+ .key.json)
    variants/<adapter>/<method>@<τ>/ edited adapters (PEFT directories, + key.json)
    eval/                            results.json + items.jsonl of every variant (eval stage)
    cache/generations.jsonl          the generation cache
    latency.json                     batch-1 latency of some variants
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ...adapter import load_adapter, parse_module_types
from ...edit import build_manifest, project, prune, prune_modules
from ...errors import UsageError
from ...io.files import write_text_atomic
from ...report.plots import score_curve
from ...scoring import scan
from ...scoring.methods.actdir import score_actdir
from ...scoring.table import ScoreTable
from ...selection import RANDOM_RULE, auto_tau, random_order, select
from ...training import finetune
from ...version import __version__
from .config import ExperimentConfig, MethodSpec, needs_pair
from .variants import Log, Variant, adapter_identity, digest, fresh, path_identity, random_name, read_key, variant_name


def stage_finetune(cfg: ExperimentConfig, out: Path, log: Log, progress: bool) -> dict[str, str]:
    paths: dict[str, str] = {}
    for spec in cfg.finetune:
        dest = out / "adapters" / spec.name
        key = {
            "stage": "finetune",
            "base": path_identity(cfg.base),
            "data": path_identity(spec.data),
            "options": spec.options,
            "version": __version__,
        }
        kp = out / "adapters" / f"{spec.name}.key.json"
        if fresh(dest, kp, key):
            log(f"finetune {spec.name}: up to date")
        else:
            log(f"finetune {spec.name}: training on {spec.data}")
            t0 = time.perf_counter()
            finetune(cfg.base, spec.data, out=dest, force=True, progress=progress, **spec.options)
            write_text_atomic(kp, json.dumps(key, indent=1, default=str))
            log(f"finetune {spec.name}: done in {time.perf_counter() - t0:.0f} s")
        paths[spec.name] = str(dest)
    return paths


# -- score -----------------------------------------------------------------------------------------


def stage_score(
    cfg: ExperimentConfig, adapters: dict[str, str], out: Path, log: Log, progress: bool
) -> dict[tuple[str, str], ScoreTable]:
    tables: dict[tuple[str, str], ScoreTable] = {}
    for aname, apath in adapters.items():
        for m in cfg.methods:
            dest = out / "scores" / aname / f"{m.name}.json"
            kp = dest.with_suffix(".key.json")
            key = {
                "stage": "score",
                "adapter": adapter_identity(apath),
                "method": m.method,
                "options": m.options,
                "module_types": m.module_types,
                "version": __version__,
                "models": {r: path_identity(p) for r, p in _roles(cfg, m).items()},
            }
            if fresh(dest, kp, key):
                tables[aname, m.name] = ScoreTable.from_dict(json.loads(dest.read_text(encoding="utf-8")))
                log(f"score {aname} × {m.name}: up to date")
                continue
            t0 = time.perf_counter()
            log(f"score {aname} × {m.name} ...")
            if m.method == "actdir":
                opts = dict(m.options)
                table = score_actdir(cfg.base, apath, progress=progress, **opts)
            else:
                roles = _roles(cfg, m)
                table = scan(
                    apath,
                    roles.get("base"),
                    m.method,
                    aligned=roles.get("aligned"),
                    unaligned=roles.get("unaligned"),
                    module_types=m.module_types,
                    options={m.method: dict(m.options)} if m.options else None,
                    progress=progress,
                    threads=cfg.threads,
                )
            table.meta = dict(getattr(table, "meta", {}) or {})
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(dest, table.to_json())
            write_text_atomic(kp, json.dumps(key, indent=1, default=str))
            tables[aname, m.name] = table
            log(f"score {aname} × {m.name}: {len(table)} modules in {time.perf_counter() - t0:.1f} s")
    return tables


def _roles(cfg: ExperimentConfig, m: MethodSpec) -> dict[str, str | None]:
    if needs_pair(m.method):
        return {"aligned": cfg.aligned, "unaligned": cfg.unaligned}
    return {"base": cfg.base}


# -- select + edit ---------------------------------------------------------------------------------


def resolve_taus(table: ScoreTable, m: MethodSpec) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """Integer τs of a method (auto rules computed on its scores); returns (taus, {rule: details})."""
    taus: list[int] = []
    autos: dict[str, dict[str, Any]] = {}
    for t in m.taus:
        if isinstance(t, int):
            taus.append(t)
            continue

        sel = select(table, _method_key(table, m), auto=t, module_types=m.module_types, mad_k=m.mad_k)
        autos[t] = {"tau": int(sel.rule.auto_tau), "details": dict(sel.rule.auto_details or {})}
        taus.append(int(sel.rule.auto_tau))
    return list(dict.fromkeys(taus)), autos


def auto_plot(table: ScoreTable, m: MethodSpec, autos: dict[str, Any], path: Path) -> Path | None:
    """The sorted score curve with every automatic τ of this method marked."""
    if not autos:
        return None

    key = _method_key(table, m)
    info = table.methods[key]
    types = parse_module_types(m.module_types)
    scores = [r.get(info.primary) for r in table.rows if types is None or r["type"] in types]
    res = [auto_tau(scores, info.descending, rule, m.mad_k) for rule in autos]
    return score_curve(
        scores,
        info.descending,
        res,
        path,
        title=f"{m.name}: sorted {info.primary} with automatic τ",
        ylabel=info.primary,
    )


def _method_key(table: ScoreTable, m: MethodSpec) -> str:
    return m.method if m.method in table.methods else m.name


def stage_edit(
    cfg: ExperimentConfig, adapters: dict[str, str], tables: dict[tuple[str, str], ScoreTable], out: Path, log: Log
) -> tuple[list[Variant], dict[str, Any]]:
    """Every method's variant at each of its τ, and the random controls, per adapter (cached by key)."""
    variants: list[Variant] = []
    auto_info: dict[str, Any] = {}
    for aname, apath in adapters.items():
        orig = load_adapter(apath)
        variants.append(Variant(name=aname, adapter=aname, path=apath, modules_kept=len(orig.modules), selected=[]))
        used_taus: list[int] = []
        for m in cfg.methods:
            mv, autos = _method_variants(cfg, aname, apath, orig, tables[aname, m.name], m, out, log)
            auto_info.setdefault(aname, {})[m.name] = autos
            used_taus += [v.tau for v in mv]
            variants += mv
        r_taus = cfg.random.taus if cfg.random.taus is not None else sorted(set(used_taus))
        variants += _random_variants(cfg, aname, apath, orig, r_taus, out)
        log(f"edit {aname}: {sum(v.adapter == aname for v in variants) - 1} edited variants ready")
    return variants, auto_info


def _kept(dest: Path, total: int) -> dict[str, Any]:
    kept = load_adapter(dest)
    return {"params_kept": kept.num_params / total if total else 1.0, "modules_kept": len(kept.modules)}


def _method_variants(
    cfg: ExperimentConfig, aname: str, apath: str, orig, table: ScoreTable, m: MethodSpec, out: Path, log: Log
) -> tuple[list[Variant], dict[str, Any]]:
    taus, autos = resolve_taus(table, m)
    if autos:
        p = auto_plot(table, m, autos, out / "plots" / f"{aname}_{m.name}_auto_tau.png")
        for d in autos.values():
            d["plot"] = str(p)
    variants = []
    for tau in taus:
        if tau == 0:  # an automatic τ of 0: nothing to edit (the adapter itself is evaluated anyway)
            log(f"edit {aname}:{m.name}: τ = 0 ({', '.join(r for r, d in autos.items() if d['tau'] == 0)}); no variant")
            continue
        name = variant_name(aname, m.name, tau)
        dest = out / "variants" / aname / f"{m.name}@{tau}"
        key = {
            "stage": "edit",
            "adapter": adapter_identity(apath),
            "table": digest(table.to_dict()["rows"]),
            "method": m.method,
            "action": m.action,
            "tau": tau,
            "types": m.module_types,
            "version": __version__,
            "pair": [path_identity(cfg.aligned), path_identity(cfg.unaligned)] if m.action == "project" else None,
        }
        if not fresh(dest, dest / "key.json", key):
            if m.action == "project":
                edited = project(orig, cfg.aligned, cfg.unaligned, table=table, top=tau, module_types=m.module_types)
            else:
                edited = prune(orig, table=table, method=_method_key(table, m), top=tau, module_types=m.module_types)
            _save(edited, dest, key)
            log(f"edit {name}: {m.action} {len(edited.selection.selected)} modules")
        variants.append(
            Variant(
                name=name,
                adapter=aname,
                method=m.name,
                tau=tau,
                path=str(dest),
                action=m.action,
                selected=_selected(dest),
                auto=[r for r, d in autos.items() if int(d["tau"]) == tau],
                **_kept(dest, orig.num_params),
            )
        )
    return variants, autos


def _random_variants(
    cfg: ExperimentConfig, aname: str, apath: str, orig, r_taus: list[int], out: Path
) -> list[Variant]:
    """The random control (:mod:`safeprune.selection.random_control`) at each τ, for each seed."""
    variants = []
    for seed in cfg.random.seeds:
        order = random_order(orig.modules, seed)
        for tau in r_taus:
            if tau > len(order):
                raise UsageError(f"random control: tau {tau} > the {len(order)} modules of adapter {aname!r}")
            dest = out / "variants" / aname / f"random-s{seed}@{tau}"
            key = {
                "stage": "edit",
                "adapter": adapter_identity(apath),
                "method": "random",
                "seed": seed,
                "tau": tau,
                "version": __version__,
            }
            if not fresh(dest, dest / "key.json", key):
                edited = prune_modules(orig, order[:tau], mode="remove")
                edited.manifest = build_manifest(
                    action="prune",
                    original=orig,
                    edited=edited,
                    table=None,
                    selection=None,
                    edit={
                        "mode": "remove",
                        "modules": order[:tau],
                        "control": "random",
                        "seed": seed,
                        "rule": RANDOM_RULE,
                    },
                    sources={},
                )
                _save(edited, dest, key)
            variants.append(
                Variant(
                    name=random_name(aname, seed, tau),
                    adapter=aname,
                    method="random",
                    tau=tau,
                    seed=seed,
                    path=str(dest),
                    action="prune",
                    selected=order[:tau],
                    **_kept(dest, orig.num_params),
                )
            )
    return variants


def _save(edited, dest: Path, key: dict[str, Any]) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    edited.save(dest, force=True)
    write_text_atomic(dest / "key.json", json.dumps(key, indent=1, default=str))


def _selected(dest: Path) -> list[str]:
    man = read_key(dest / "safeprune.json") or {}
    edit = man.get("edit") or {}
    return list(edit.get("modules") or [])
