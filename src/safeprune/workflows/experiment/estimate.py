"""``safeprune run --estimate``: how many generations an experiment needs and about how long they take,
from the experiment file and a short measured warm-up on the base model, before anything is run."""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ...eval.backends import Backend, GenSettings, make_backend
from ...eval.evaluate import EvalConfig, batch_rows, early_stop_plan, gen_settings
from ...eval.judges import KeywordJudge, PatternJudge
from .config import ExperimentConfig, load_config
from .eval_stages import load_sets

WARMUP_PROMPTS = 16  # per kind of prompt set (timed after one untimed call that loads the kernels)


def count_variants(cfg: ExperimentConfig) -> dict[str, int]:
    """Variants the evaluation stage generates for: the base, each adapter, each method's τ values and
    the random controls (an automatic τ counts as one variant; a τ of 0 or two equal τ make fewer)."""
    n_adapters = len(cfg.adapter_names)
    per_adapter = sum(len(m.taus) for m in cfg.methods)
    int_taus = {t for m in cfg.methods for t in m.taus if isinstance(t, int)}
    n_auto = sum(1 for m in cfg.methods for t in m.taus if not isinstance(t, int))
    r_taus = len(cfg.random.taus) if cfg.random.taus is not None else len(int_taus) + n_auto
    # repairs: the fit's strength and the others asked for (at most; the fit's choice may be one of them),
    # and the energy-matched controls of each, evaluated on every kind of set
    rep = sum(1 + len(r.strengths) for r in cfg.repairs)
    rep_ctl = sum((1 + len(r.strengths)) * len(r.seeds) for r in cfg.repairs)
    return {
        "base": int(cfg.evaluation.include_base),
        "adapters": n_adapters,
        "edited": n_adapters * per_adapter,
        "random_controls": n_adapters * len(cfg.random.seeds) * r_taus,
        "repaired": n_adapters * rep,
        "repair_controls": n_adapters * rep_ctl,
    }


def estimate_experiment(config: ExperimentConfig | str | Path, backend: Backend | None = None) -> dict[str, Any]:
    """Generation counts per kind of prompt set and the expected generation time, extrapolated from a
    warm-up: up to 16 prompts of each kind generated on the base with the configured settings."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    e = cfg.evaluation
    sets = load_sets(cfg)
    nv = count_variants(cfg)
    full = nv["base"] + nv["adapters"] + nv["edited"] + nv["repaired"] + nv["repair_controls"]
    kinds_rc = set(cfg.random.kinds or ("safety", "over_refusal", "utility"))
    judge = KeywordJudge.from_file(e.refusal_keywords) if e.refusal_keywords else KeywordJudge()
    ecfg = EvalConfig(
        safety_max_new_tokens=e.safety_max_new_tokens,
        utility_max_new_tokens=e.utility_max_new_tokens,
        batch_size=batch_rows(e.batch_size),
        system_prompt=e.system_prompt,
        seed=cfg.seed,
        sort_by_length=e.sort_by_length,
        utility_batch_size=batch_rows(e.utility_batch_size),
        early_stop=e.early_stop,
    )
    model_judges = [SimpleNamespace(id=j.kind) for j in e.judges]  # not loaded for an estimate
    broad = PatternJudge()
    stop = early_stop_plan(ecfg, judge, model_judges, broad)
    opts: dict[str, Any] = {}
    if e.backend == "hf":
        opts = {"device": e.device, "dtype": e.dtype, "threads": e.threads, "loop": e.loop}
    t0 = time.perf_counter()
    be = backend or make_backend(e.backend, cfg.base, {}, **opts)
    load_s = time.perf_counter() - t0
    first = next((it.prompt for s in sets for it in s.items), "warm up")
    be.generate([first], None, GenSettings(max_new_tokens=2, batch_size=1))
    rows = []
    total = 0.0
    for kind in ("safety", "over_refusal", "utility"):
        ks = [s for s in sets if s.kind == kind]
        if not ks:
            continue
        n_prompts = sum(len(s) for s in ks)
        n_gen = n_prompts * (full + (nv["random_controls"] if kind in kinds_rc else 0))
        pool = [it.prompt for s in ks for it in s.items]
        sample = random.Random(cfg.seed).sample(pool, min(WARMUP_PROMPTS, len(pool)))
        st = gen_settings(ecfg, kind, judge, stop["enabled"], broad)
        t0 = time.perf_counter()
        gens = be.generate(sample, None, st)
        per = (time.perf_counter() - t0) / len(sample)
        total += per * n_gen
        rows.append(
            {
                "kind": kind,
                "prompts": n_prompts,
                "generations": n_gen,
                "warmup_prompts": len(sample),
                "warmup_s_per_generation": per,
                "warmup_mean_new_tokens": sum(g.new_tokens for g in gens) / len(gens),
                "expected_s": per * n_gen,
            }
        )
    res = {
        "variants": nv,
        "kinds": rows,
        "generations": sum(r["generations"] for r in rows),
        "expected_generation_s": total,
        "model_load_s": load_s,
        "early_stop": stop["why"],
        "caveats": "measured on the base model with the warm-up's few prompts in flight: a full batch is faster "
        "per generation; adapters that answer instead of refusing run longer when early stopping is on; "
        "generations already in the cache are not subtracted",
    }
    return res


def estimate_lines(res: dict[str, Any]) -> list[str]:
    nv = res["variants"]
    out = [
        f"variants: base {nv['base']}, adapters {nv['adapters']}, edited {nv['edited']}, "
        f"random controls {nv['random_controls']}"
        + (
            f", repaired {nv['repaired']} (+ {nv['repair_controls']} energy-matched controls; the fits' own time "
            "is not in the estimate)"
            if nv.get("repaired")
            else ""
        ),
        f"early stopping: {res['early_stop']}",
    ]
    for r in res["kinds"]:
        out.append(
            f"{r['kind']:>12}: {r['prompts']} prompts, {r['generations']} generations × "
            f"{r['warmup_s_per_generation']:.2f} s (warm-up: {r['warmup_prompts']} prompts, "
            f"{r['warmup_mean_new_tokens']:.0f} new tokens each) ≈ {r['expected_s'] / 60:.1f} min"
        )
    out.append(
        f"expected generation time: {res['generations']} generations ≈ {res['expected_generation_s'] / 60:.0f} min "
        f"(model load {res['model_load_s']:.0f} s)"
    )
    out.append(f"note: {res['caveats']}")
    return out
