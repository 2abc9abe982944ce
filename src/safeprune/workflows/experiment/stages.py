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

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...adapter import load_adapter
from ...adapter import parse_module_types as _parse_types
from ...edit import build_manifest, project, prune, prune_modules
from ...errors import InputError, UsageError
from ...eval.backends import GenSettings, adapter_fingerprint, make_backend
from ...eval.evaluate import EvalConfig, EvalResult, evaluate
from ...eval.judges import HFClassifierJudge, KeywordJudge, OpenAIJudge
from ...eval.results import write_results
from ...io.files import write_text_atomic
from ...prompts import ids_from_subsets, load_prompts, subset
from ...report.plots import score_curve
from ...scoring import scan
from ...scoring.methods.actdir import score_actdir
from ...scoring.table import ScoreTable
from ...selection import auto_tau, select
from ...training import finetune
from ...version import __version__
from .config import ExperimentConfig, MethodSpec

Log = Callable[[str], None]


@dataclass
class Variant:
    name: str  # "base", "lora", "lora:ddi@10", "lora:random-s0@10"
    adapter: str | None  # the adapter it derives from (None: the base model)
    method: str | None = None  # method label, "random", or None (the adapter itself / the base)
    tau: int | None = None
    seed: int | None = None
    path: str | None = None  # PEFT directory
    action: str | None = None
    selected: list[str] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)  # auto-τ rules that resolved to this τ
    params_kept: float = 1.0  # share of the adapter's LoRA parameters kept
    modules_kept: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def variant_name(adapter: str, method: str, tau: int) -> str:
    return f"{adapter}:{method}@{tau}"


def random_name(adapter: str, seed: int, tau: int) -> str:
    return f"{adapter}:random-s{seed}@{tau}"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_identity(p: str | None) -> Any:
    """A cheap identity of a model path for cache keys: every file's name, size and mtime (not content)."""
    if p is None:
        return None
    q = Path(p)
    if not q.exists():
        return p  # hub id
    files = [q] if q.is_file() else sorted(f for f in q.rglob("*") if f.is_file())
    return [str(q.resolve())] + [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]


def adapter_identity(p: str) -> str:
    return adapter_fingerprint(p)


def _read_key(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fresh(dir_or_file: Path, key_path: Path, key: dict[str, Any]) -> bool:
    return dir_or_file.exists() and _read_key(key_path) == json.loads(json.dumps(key, default=str))


# -- finetune --------------------------------------------------------------------------------------


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
        if _fresh(dest, kp, key):
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
            if _fresh(dest, kp, key):
                tables[aname, m.name] = ScoreTable.from_dict(json.loads(dest.read_text(encoding="utf-8")))
                log(f"score {aname} × {m.name}: up to date")
                continue
            t0 = time.perf_counter()
            log(f"score {aname} × {m.name} ...")
            if m.method == "actdir":
                opts = dict(m.options)
                table = score_actdir(cfg.base, apath, **opts)
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
    if m.method in ("safelora", "splora"):
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
    types = _parse_types(m.module_types)
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
    variants: list[Variant] = []
    auto_info: dict[str, Any] = {}
    for aname, apath in adapters.items():
        orig = load_adapter(apath)
        total = orig.num_params
        variants.append(Variant(name=aname, adapter=aname, path=apath, modules_kept=len(orig.modules), selected=[]))
        used_taus: list[int] = []
        for m in cfg.methods:
            table = tables[aname, m.name]
            taus, autos = resolve_taus(table, m)
            if autos:
                p = auto_plot(table, m, autos, out / "plots" / f"{aname}_{m.name}_auto_tau.png")
                for d in autos.values():
                    d["plot"] = str(p)
            auto_info.setdefault(aname, {})[m.name] = autos
            for tau in taus:
                if tau == 0:  # an automatic τ of 0: nothing to edit (the adapter itself is evaluated anyway)
                    log(
                        f"edit {aname}:{m.name}: τ = 0 ({', '.join(r for r, d in autos.items() if d['tau'] == 0)}); "
                        "no variant"
                    )
                    continue
                used_taus.append(tau)
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
                    "pair": [path_identity(cfg.aligned), path_identity(cfg.unaligned)]
                    if m.action == "project"
                    else None,
                }
                kp = dest / "key.json"
                mk = _method_key(table, m)
                if not _fresh(dest, kp, key):
                    if m.action == "project":
                        edited = project(
                            orig, cfg.aligned, cfg.unaligned, table=table, top=tau, module_types=m.module_types
                        )
                    else:
                        edited = prune(orig, table=table, method=mk, top=tau, module_types=m.module_types)
                    _save(edited, dest, key)
                    log(f"edit {name}: {m.action} {len(edited.selection.selected)} modules")
                sel = _selected(dest)
                kept = load_adapter(dest)
                variants.append(
                    Variant(
                        name=name,
                        adapter=aname,
                        method=m.name,
                        tau=tau,
                        path=str(dest),
                        action=m.action,
                        selected=sel,
                        auto=[r for r, d in autos.items() if int(d["tau"]) == tau],
                        params_kept=kept.num_params / total if total else 1.0,
                        modules_kept=len(kept.modules),
                    )
                )
        # the random control: seed s prunes the first τ modules of a seeded permutation (nested across τ)
        r_taus = cfg.random.taus if cfg.random.taus is not None else sorted(set(used_taus))
        candidates = sorted(orig.modules)
        for seed in cfg.random.seeds:
            order = candidates[:]
            random.Random(f"safeprune-random:{seed}").shuffle(order)
            for tau in r_taus:
                if tau > len(order):
                    raise UsageError(f"random control: tau {tau} > the {len(order)} modules of adapter {aname!r}")
                name = random_name(aname, seed, tau)
                dest = out / "variants" / aname / f"random-s{seed}@{tau}"
                key = {
                    "stage": "edit",
                    "adapter": adapter_identity(apath),
                    "method": "random",
                    "seed": seed,
                    "tau": tau,
                    "version": __version__,
                }
                if not _fresh(dest, dest / "key.json", key):
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
                            "rule": "first tau of random.Random(f'safeprune-random:{seed}')"
                            ".shuffle(sorted(module names))",
                        },
                        sources={},
                    )
                    _save(edited, dest, key)
                kept = load_adapter(dest)
                variants.append(
                    Variant(
                        name=name,
                        adapter=aname,
                        method="random",
                        tau=tau,
                        seed=seed,
                        path=str(dest),
                        action="prune",
                        selected=order[:tau],
                        params_kept=kept.num_params / total if total else 1.0,
                        modules_kept=len(kept.modules),
                    )
                )
        log(f"edit {aname}: {sum(v.adapter == aname for v in variants) - 1} edited variants ready")
    return variants, auto_info


def _save(edited, dest: Path, key: dict[str, Any]) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    edited.save(dest, force=True)
    write_text_atomic(dest / "key.json", json.dumps(key, indent=1, default=str))


def _selected(dest: Path) -> list[str]:
    man = _read_key(dest / "safeprune.json") or {}
    edit = man.get("edit") or {}
    return list(edit.get("modules") or [])


# -- evaluate --------------------------------------------------------------------------------------


def load_sets(cfg: ExperimentConfig):
    sets = []
    for kind, group in (
        ("safety", cfg.evaluation.safety),
        ("over_refusal", cfg.evaluation.over_refusal),
        ("utility", cfg.evaluation.utility),
    ):
        for s in group:
            ps = load_prompts(
                s.path,
                kind,
                column=s.column,
                reference_column=s.reference_column,
                include_overlap=s.include_overlap,
                name=s.name,
            )
            ids = None
            if s.rows_from:
                found = ids_from_subsets(s.rows_from, s.path)
                if found is None:
                    raise InputError(f"no entry for {s.path} in the rows_from file", s.rows_from)
                ids = found[1]
            ps = subset(ps, ids=ids, sample=s.sample, seed=s.seed, limit=s.limit)
            if not len(ps):
                raise InputError("the prompt set is empty after selection", s.path)
            sets.append(ps)
    return sets


def stage_evaluate(cfg: ExperimentConfig, variants: list[Variant], out: Path, log: Log, progress: bool, backend=None):
    e = cfg.evaluation
    sets = load_sets(cfg)
    judge = KeywordJudge.from_file(e.refusal_keywords) if e.refusal_keywords else KeywordJudge()
    harm = [_make_judge(j) for j in e.judges]
    adapters = {v.name: v.path for v in variants if v.path}
    kinds = cfg.random.kinds
    controls = {v.name: v.path for v in variants if v.method == "random"} if kinds else {}
    main = {k: p for k, p in adapters.items() if k not in controls}
    ecfg = EvalConfig(
        safety_max_new_tokens=e.safety_max_new_tokens,
        utility_max_new_tokens=e.utility_max_new_tokens,
        batch_size=e.batch_size,
        system_prompt=e.system_prompt,
        seed=cfg.seed,
        sort_by_length=e.sort_by_length,
        utility_batch_size=e.utility_batch_size,
    )
    opts: dict[str, Any] = {}
    if e.backend == "hf" and backend is None:
        opts = {"device": e.device, "dtype": e.dtype, "threads": e.threads}
    elif e.backend == "vllm" and backend is None:
        opts = {"dtype": e.dtype}
    cb = _progress_cb(log) if progress else None
    t0 = time.perf_counter()
    be = backend(cfg.base, adapters) if callable(backend) else (backend or e.backend)
    if isinstance(be, str):
        be = make_backend(be, cfg.base, adapters, **opts)
    cache = Path(e.cache) if e.cache else out / "cache" / "generations.jsonl"
    common = dict(
        backend=be, refusal_judge=judge, harm_judges=harm, config=ecfg, cache=cache, meteor=e.meteor, progress=cb
    )
    res = evaluate(
        cfg.base,
        main,
        prompt_sets=sets,
        include_base=e.include_base,
        out_dir=None if controls else out / "eval",
        **common,
    )
    if controls:  # the random controls on the configured kinds of sets only, merged into one result
        rsets = [s for s in sets if s.kind in kinds]
        r2 = evaluate(cfg.base, controls, prompt_sets=rsets, include_base=False, out_dir=None, **common)
        merged = dict(res.results)
        merged["metrics"] = {**res.results["metrics"], **r2.results["metrics"]}
        merged["variants"] = {**res.results["variants"], **r2.results["variants"]}
        merged["controls_sets"] = {"kinds": list(kinds), "sets": [s.name for s in rsets]}
        merged["timing"] = {"seconds": res.results["timing"]["seconds"] + r2.results["timing"]["seconds"]}
        res = EvalResult(merged, res.items + r2.items, out / "eval")
        write_results(res, out / "eval")
    gen = sum(m.get("generated_now", 0) for v in res.metrics.values() for m in v.values())
    log(
        f"evaluate: {len(adapters) + int(e.include_base)} variants × {len(sets)} sets, {gen} generations "
        f"made now, {time.perf_counter() - t0:.0f} s"
    )
    return res, sets, be


def _make_judge(j):
    if j.kind == "hf_classifier":
        return HFClassifierJudge(**j.options)
    return OpenAIJudge(**j.options)


def _progress_cb(log: Log):
    last: dict[str, float] = {}

    def cb(label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last.get(label, 0.0) > 30:
            last[label] = now
            log(f"  {label}: {done}/{total}")

    return cb


# -- latency ---------------------------------------------------------------------------------------


def stage_latency(
    cfg: ExperimentConfig, variants: list[Variant], sets, out: Path, log: Log, backend
) -> dict[str, Any] | None:
    """Batch-1 greedy generation time per new token, variants interleaved prompt by prompt (so machine
    load drifts affect all alike). Adapters stay unmerged (what a LoRA server runs)."""
    lat = cfg.latency
    if not lat.enabled:
        return None
    names = lat.variants
    if names is None:
        first = cfg.methods[0].name
        names = (["base"] if cfg.evaluation.include_base else []) + [
            v.name for v in variants if v.method is None or (v.method == first)
        ]
    byname = {v.name: v for v in variants}
    unknown = [n for n in names if n != "base" and n not in byname]
    if unknown:
        raise UsageError(f"latency.variants: unknown variant(s) {unknown}")
    pool = [it.prompt for ps in sets if ps.kind != "utility" for it in ps.items] or [
        it.prompt for ps in sets for it in ps.items
    ]
    prompts = pool[: lat.n_prompts]
    dest = out / "latency.json"
    key = {
        "variants": names,
        "prompts": digest(prompts),
        "max_new_tokens": lat.max_new_tokens,
        "adapters": {n: adapter_identity(byname[n].path) for n in names if n != "base"},
        "base": path_identity(cfg.base),
        "version": __version__,
    }
    old = _read_key(dest)
    if old and old.get("key") == json.loads(json.dumps(key, default=str)):
        log("latency: up to date")
        return old

    e = cfg.evaluation
    be = backend  # the evaluation stage's backend: the base and every variant are loaded once
    s = GenSettings(max_new_tokens=lat.max_new_tokens, batch_size=1, system_prompt=e.system_prompt)
    be.generate(prompts[:1], None, s)  # warm-up
    acc = {n: {"seconds": 0.0, "tokens": 0} for n in names}
    t0 = time.perf_counter()
    for p in prompts:
        for n in names:
            g = be.generate([p], None if n == "base" else n, s)[0]
            acc[n]["seconds"] += g.batch_seconds
            acc[n]["tokens"] += g.new_tokens
    rows = {}
    for n, a in acc.items():
        rows[n] = {
            "ms_per_token": 1000 * a["seconds"] / max(1, a["tokens"]),
            "tokens": a["tokens"],
            "seconds": a["seconds"],
            "tokens_per_s": a["tokens"] / a["seconds"] if a["seconds"] else None,
        }
    res = {
        "key": key,
        "settings": {
            "batch_size": 1,
            "max_new_tokens": lat.max_new_tokens,
            "n_prompts": len(prompts),
            "greedy": True,
            "adapters_merged": False,
            "order": "interleaved per prompt",
        },
        "variants": rows,
        "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(dest, json.dumps(res, indent=1, default=str))
    log(f"latency: {len(names)} variants × {len(prompts)} prompts in {res['seconds']:.0f} s")
    return res
