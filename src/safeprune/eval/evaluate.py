"""``safeprune.evaluate``: generate for every variant (base and/or adapters) on the same prompt sets with
the same settings and judges, score, and write results (JSON, JSONL items, CSV, Markdown)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from ..io.provenance import command_line, now_iso, versions
from ..prompts import PromptSet
from .backends import Backend, GenSettings, make_backend, tokens_per_second
from .cache import GenerationCache
from .judges import HarmJudge, KeywordJudge, PatternJudge
from .results import write_results
from .runner import generate_cached
from .safety import over_refusal_metrics, safety_metrics
from .utility import Meteor, auarc, rouge_scores

SCHEMA = "safeprune.eval/1"
BASE_VARIANT = "base"


@dataclass
class EvalConfig:
    safety_max_new_tokens: int = 64
    utility_max_new_tokens: int = 96
    batch_size: int = 16
    system_prompt: str | None = None
    chat_template: bool = True
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    auarc_threshold: float = 0.15
    sort_by_length: bool = False
    utility_batch_size: int | None = None  # long prompts (dialogues): smaller batches pad less

    def settings(self, kind: str) -> GenSettings:
        return GenSettings(
            max_new_tokens=self.utility_max_new_tokens if kind == "utility" else self.safety_max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
            batch_size=(self.utility_batch_size or self.batch_size) if kind == "utility" else self.batch_size,
            sort_by_length=self.sort_by_length,
        )


@dataclass
class EvalResult:
    results: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.results["metrics"]


def _records(vname: str, ps: PromptSet, gens, judge: KeywordJudge, broad: KeywordJudge) -> list[dict[str, Any]]:
    """One record per prompt: the generation, both refusal judges' verdicts (never combined) and what the
    set's kind needs."""
    recs = []
    for it, g in zip(ps.items, gens):
        refused_kw = judge.matched(g.text)
        refused_broad = broad.matched(g.text)
        rec: dict[str, Any] = {
            "variant": vname,
            "set": ps.name,
            "kind": ps.kind,
            "id": it.id,
            "prompt": it.prompt,
            "output": g.text,
            "new_tokens": g.new_tokens,
            "finished": g.finished,
            "latency_s": g.batch_seconds,
            "batch_size": g.batch_size,
            "mean_nll": g.mean_nll,
            "mean_entropy": g.mean_entropy,
            "cached": g.cached,
            "refused": refused_kw is not None,
            "refusal_keyword": refused_kw,
            "refused_broad": refused_broad is not None,
            "refusal_pattern": refused_broad,
        }
        if ps.kind == "safety":
            rec["overlap"] = it.overlap
            rec["jailbroken"] = refused_kw is None
            rec["jailbroken_broad"] = refused_broad is None
        if ps.kind == "utility":
            rec["reference"] = it.reference
        recs.append(rec)
    return recs


def _judge_harm(recs: list[dict[str, Any]], hjudges: dict[str, HarmJudge]) -> None:
    for jid, hj in hjudges.items():
        scores = hj.score_batch([r["prompt"] for r in recs], [r["output"] for r in recs])
        for r, s in zip(recs, scores):
            r.setdefault("harm", {})[jid] = s.score
            if s.error:
                r.setdefault("harm_error", {})[jid] = s.error


def _score_utility(recs: list[dict[str, Any]], met: Meteor | None) -> None:
    rs = rouge_scores([r["output"] for r in recs], [r["reference"] for r in recs])
    for r, s in zip(recs, rs):
        r.update(s)
        if met is not None:
            r["meteor"] = met.score(r["output"], r["reference"])


def _generation_stats(gens) -> dict[str, Any]:
    return {
        "tokens_per_s": tokens_per_second(gens),
        "mean_latency_s": sum(g.batch_seconds for g in gens) / max(1, len(gens)),
        "mean_new_tokens": sum(g.new_tokens for g in gens) / max(1, len(gens)),
        "generated_now": sum(not g.cached for g in gens),
    }


# Long because of the results record: the generation loop is four helpers; the rest is the provenance
# dictionary written once, field by field.
def evaluate(
    base: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    prompt_sets: Sequence[PromptSet],
    include_base: bool = False,
    out_dir: str | Path | None = None,
    backend: str | Backend = "hf",
    refusal_judge: KeywordJudge | None = None,
    broad_judge: KeywordJudge | None = None,
    harm_judges: Sequence[HarmJudge] = (),
    config: EvalConfig | None = None,
    cache: str | Path | None = None,
    meteor: bool = True,
    backend_options: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``adapters`` (name -> PEFT directory) on ``base``, plus the base itself with adapters
    disabled when ``include_base`` (variant ``'base'``), on every prompt set, with the same generation
    settings and judges. Generations are cached (default ``OUT/cache/generations.jsonl``). ``refusal_judge``
    (default: the papers' 29 strings) gives ``asr``; ``broad_judge`` (default :class:`PatternJudge`, the
    maintained refusal phrases) gives ``asr_broad`` beside it."""
    adapters = {k: str(v) for k, v in (adapters or {}).items()}
    if BASE_VARIANT in adapters:
        raise UsageError(f"adapter name {BASE_VARIANT!r} is reserved for the base model")
    if not adapters and not include_base:
        include_base = True  # nothing else to evaluate
    if not prompt_sets:
        raise UsageError("give at least one prompt set (--safety, --over-refusal or --utility)")
    names = [s.name for s in prompt_sets]
    if len(set(names)) != len(names):
        raise UsageError(f"two prompt sets share a name: {names}; rename one")
    cfg = config or EvalConfig()
    judge = refusal_judge or KeywordJudge()
    broad = broad_judge or PatternJudge()
    be = (
        backend
        if isinstance(backend, Backend)
        else make_backend(backend, str(base), adapters, **(backend_options or {}))
    )
    cache_path = Path(cache) if cache else (Path(out_dir) / "cache" / "generations.jsonl" if out_dir else None)
    gcache = GenerationCache(cache_path)
    variants: list[tuple[str, str | None]] = ([(BASE_VARIANT, None)] if include_base else []) + [
        (n, n) for n in adapters
    ]
    met = Meteor() if meteor and any(s.kind == "utility" for s in prompt_sets) else None
    hjudges = {j.id: j for j in harm_judges}

    items: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    timing: dict[str, Any] = {}
    t_all = time.perf_counter()
    for vname, adapter in variants:
        metrics[vname] = {}
        for ps in prompt_sets:
            cb = (lambda d, n, _v=vname, _s=ps.name: progress(f"{_v} · {_s}", d, n)) if progress else None
            gens = generate_cached(
                be, gcache, [it.prompt for it in ps.items], adapter, cfg.settings(ps.kind), label=vname, progress=cb
            )
            recs = _records(vname, ps, gens, judge, broad)
            if ps.kind == "safety" and hjudges:
                _judge_harm(recs, hjudges)
            if ps.kind == "utility":
                _score_utility(recs, met)
            metrics[vname][ps.name] = _set_metrics(ps, recs, hjudges, met, cfg) | _generation_stats(gens)
            items.extend(recs)
    timing["seconds"] = time.perf_counter() - t_all

    results = {
        "schema": SCHEMA,
        "created": now_iso(),
        "command": command_line(),
        "versions": versions(),
        "backend": be.describe(),
        "model_hash": be.model_hash(),
        "variants": {
            v: {
                "adapter": adapters.get(a) if a else None,
                "adapter_hash": be.adapter_hash(a),
                "adapters_disabled": a is None,
            }
            for v, a in variants
        },
        "sets": [s.describe() for s in prompt_sets],
        "settings": {**asdict(cfg), "per_kind": {k: cfg.settings(k).key() for k in ("safety", "utility")}},
        "refusal_judge": judge.describe(),
        "refusal_judge_broad": broad.describe(),
        "harm_judges": {jid: j.describe() for jid, j in hjudges.items()},
        "meteor": met.describe() if met else None,
        "auarc": {
            "uncertainty": "mean token negative log-likelihood of the generation (mean_nll)",
            "accuracy": f"ROUGE-1 F > {cfg.auarc_threshold}",
            "accuracy_continuous": "ROUGE-1 F",
            "definition": "UQ-NLG: sort by uncertainty ascending, expanding mean of accuracy, "
            "trapezoid over linspace(0,1,N)",
        },
        "metrics": metrics,
        "timing": timing,
        "cache": str(cache_path) if cache_path else None,
    }
    res = EvalResult(results, items, Path(out_dir) if out_dir else None)
    if out_dir:
        write_results(res, out_dir)
    return res


def _set_metrics(ps: PromptSet, recs, hjudges, met, cfg: EvalConfig) -> dict[str, Any]:
    if ps.kind == "safety":
        return safety_metrics(recs, hjudges)
    if ps.kind == "over_refusal":
        return over_refusal_metrics(recs)
    m: dict[str, Any] = {"n": len(recs)}
    for k in ("rouge1", "rouge2", "rougeL"):
        m[k] = float(100 * np.mean([r[k] for r in recs])) if recs else None
    if met is not None and met.available:
        m["meteor"] = float(100 * np.mean([r["meteor"] for r in recs])) if recs else None
    else:
        m["meteor"] = None
        m["meteor_unavailable"] = met.reason if met is not None else "disabled"
    u = [r["mean_nll"] if r["mean_nll"] is not None else float("nan") for r in recs]
    m["auarc"] = 100 * auarc(u, [float(r["rouge1"] > cfg.auarc_threshold) for r in recs])
    m["auarc_rouge1"] = 100 * auarc(u, [r["rouge1"] for r in recs])
    return m
