"""The evaluation stages of ``safeprune run``: evaluate every variant (generations cached and shared), then
measure latency."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ...errors import InputError, UsageError
from ...eval.backends import GenSettings, make_backend
from ...eval.evaluate import EvalConfig, EvalResult, batch_rows, evaluate, sampled_uncertainty_cost
from ...eval.judges import HFClassifierJudge, KeywordJudge, OpenAIJudge
from ...eval.results import write_results
from ...io.files import write_text_atomic
from ...io.progress import make_progress, task_callback
from ...prompts import ids_from_subsets, load_prompts, subset
from ...version import __version__
from .config import ExperimentConfig
from .variants import Log, Variant, adapter_identity, digest, path_identity, read_key

# -- evaluate --------------------------------------------------------------------------------------


def load_sets(cfg: ExperimentConfig):
    sets = []
    for kind, group in (
        ("safety", cfg.evaluation.safety),
        ("over_refusal", cfg.evaluation.over_refusal),
        ("utility", cfg.evaluation.utility),
        ("qa", cfg.evaluation.qa),
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
        batch_size=batch_rows(e.batch_size),
        system_prompt=e.system_prompt,
        seed=cfg.seed,
        sort_by_length=e.sort_by_length,
        utility_batch_size=batch_rows(e.utility_batch_size),
        qa_max_new_tokens=e.qa_max_new_tokens,
        uncertainty=e.uncertainty,
        uq_samples=e.uq_samples,
        uq_temperature=e.uq_temperature,
        uq_equivalence=e.uq_equivalence,
        early_stop=e.early_stop,
    )
    n_variants = len(main) + int(e.include_base)
    for line in (
        sampled_uncertainty_cost(sets, n_variants, ecfg),
        sampled_uncertainty_cost([s for s in sets if s.kind in kinds], len(controls), ecfg) if controls else None,
    ):
        if line:
            log(line)
    opts: dict[str, Any] = {}
    if e.backend == "hf" and backend is None:
        opts = {"device": e.device, "dtype": e.dtype, "threads": e.threads, "loop": e.loop}
    elif e.backend == "vllm" and backend is None:
        opts = {"dtype": e.dtype}
    with ExitStack() as stack:
        # a rich bar per variant and set (counts, ETA) on a terminal; elsewhere a plain line every 30 s
        cb = task_callback(stack.enter_context(make_progress(True)), "generating: ") if progress else None
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
    gen = sum(
        m.get("generated_now", 0) + m.get("samples_generated_now", 0) for v in res.metrics.values() for m in v.values()
    )
    log(
        f"evaluate: {len(adapters) + int(e.include_base)} variants × {len(sets)} sets, {gen} generations "
        f"made now, {time.perf_counter() - t0:.0f} s"
    )
    return res, sets, be


def _make_judge(j):
    if j.kind == "hf_classifier":
        return HFClassifierJudge(**j.options)
    return OpenAIJudge(**j.options)


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
    pool = [it.prompt for ps in sets if ps.kind not in ("utility", "qa") for it in ps.items] or [
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
    old = read_key(dest)
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
