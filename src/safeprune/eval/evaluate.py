"""``safeprune.evaluate``: generate for every variant (base and/or adapters) on the same prompt sets with
the same settings and judges, score, and write results (JSON, JSONL items, CSV, Markdown)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from ..io.provenance import command_line, now_iso, versions
from ..prompts import PromptSet
from .backends import Backend, GenSettings, make_backend, tokens_per_second
from .bleu import corpus_from_stats, item_stats, sentence_bleu
from .bleu import signature as bleu_signature
from .cache import GenerationCache
from .judges import HarmJudge, KeywordJudge, PatternJudge
from .qa import extract_answer, qa_scores
from .results import write_results
from .runner import generate_cached, generate_cached_sets
from .safety import over_refusal_metrics, safety_metrics
from .uncertainty import cluster, cluster_entropy, parse_equivalence, sampled_cost
from .utility import (
    UNCERTAINTY_FIELDS,
    UNCERTAINTY_TEXT,
    Meteor,
    auarc,
    auarc_accuracies,
    auarc_accuracy_text,
    rouge_scores,
    uncertainty_vector,
)

SCHEMA = "safeprune.eval/1"
BASE_VARIANT = "base"
SCORED_KINDS = ("utility", "qa")  # kinds with references: utility metrics, AUARC, sampled uncertainty


@dataclass
class EvalConfig:
    safety_max_new_tokens: int = 64
    utility_max_new_tokens: int = 96
    batch_size: int = 0  # rows in flight; 0: automatic (as many as fit a quarter of the free memory, at most 256)
    system_prompt: str | None = None
    chat_template: bool = True
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    auarc_threshold: float = 0.15
    sort_by_length: bool = False
    utility_batch_size: int | None = None  # None: batch_size (the automatic size accounts for long prompts)
    # verdict-aware early stopping of safety / over-refusal generations once every refusal judge's verdict
    # is decided: None = on iff no model-based judge is set; True = on (an error with one); False = off
    early_stop: bool | None = None
    qa_max_new_tokens: int = 32
    # AUARC's uncertainty: "nll" (mean token NLL of the greedy generation) or "sampled" (entropy over
    # clusters of equivalent answers among uq_samples sampled generations, seeds seed + k)
    uncertainty: str = "nll"
    uq_samples: int = 5
    uq_temperature: float = 1.0
    uq_top_p: float = 1.0
    uq_equivalence: str = "rougeL:0.5"

    def __post_init__(self) -> None:
        if self.uncertainty not in UNCERTAINTY_FIELDS:
            raise UsageError(f"uncertainty must be one of {', '.join(UNCERTAINTY_FIELDS)}, got {self.uncertainty!r}")
        if self.uncertainty == "sampled" and self.uq_samples < 2:
            raise UsageError(f"sampled uncertainty needs at least 2 samples per item, got {self.uq_samples}")
        if not (self.uq_temperature > 0 and 0 < self.uq_top_p <= 1):
            raise UsageError("sampling needs a temperature > 0 and 0 < top_p <= 1")
        if self.qa_max_new_tokens < 1:
            raise UsageError(f"qa max new tokens must be >= 1, got {self.qa_max_new_tokens}")

    def max_new_tokens(self, kind: str) -> int:
        if kind == "qa":
            return self.qa_max_new_tokens
        return self.utility_max_new_tokens if kind == "utility" else self.safety_max_new_tokens

    def sample_settings(self, kind: str, k: int) -> GenSettings:
        """Settings of the k-th sampled generation for the sampled uncertainty (seed ``seed + k``)."""
        return replace(
            self.settings(kind),
            do_sample=True,
            temperature=self.uq_temperature,
            top_p=self.uq_top_p,
            seed=self.seed + k,
        )

    def settings(self, kind: str) -> GenSettings:
        return GenSettings(
            max_new_tokens=self.max_new_tokens(kind),
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
            batch_size=(
                self.utility_batch_size
                if kind == "utility" and self.utility_batch_size is not None
                else self.batch_size
            ),
            sort_by_length=self.sort_by_length,
        )


def batch_rows(value: int | str | None, where: str = "batch size") -> int | None:
    """A batch size as given by a user (``"auto"``, a positive integer or its text, None) as
    :class:`EvalConfig` takes it: 0 for automatic, None stays None. Anything else: a one-line UsageError."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return 0
        try:
            value = int(value)
        except ValueError:
            raise UsageError(f"{where} must be 'auto' or a positive integer, got {value!r}") from None
    if isinstance(value, bool) or value < 1:
        raise UsageError(f"{where} must be 'auto' or a positive integer, got {value!r}")
    return value


STOP_KINDS = ("safety", "over_refusal")


def early_stop_plan(
    cfg: EvalConfig, judge: KeywordJudge, harm_judges: Sequence[HarmJudge], broad: KeywordJudge | None = None
) -> dict[str, Any]:
    """Whether safety / over-refusal generations stop early, and why. A generation stops once the keyword
    judge and the broad pattern judge have both decided it is a refusal (see ``backends/stopping.py``);
    neither verdict can change after that. A model-based judge reads the whole output, so any such judge
    turns early stopping off."""
    model_judges = [j.id for j in harm_judges]
    if cfg.early_stop is False:
        on, why = False, "off (asked)"
    elif model_judges or type(judge) is not KeywordJudge or (broad is not None and not isinstance(broad, PatternJudge)):
        reason = (
            f"a model-based judge reads the whole output ({', '.join(model_judges)})"
            if model_judges
            else "the refusal judges are not one keyword list plus one pattern list"
        )
        if cfg.early_stop:
            raise UsageError(f"early stopping needs keyword-only judging: {reason}; drop the judge or the early stop")
        on, why = False, f"off: {reason}"
    else:
        on, why = (
            True,
            "on: every judge is keyword- or pattern-based" + (" (asked)" if cfg.early_stop else " (default)"),
        )
    return {
        "enabled": on,
        "why": why,
        "kinds": list(STOP_KINDS) if on else [],
        "judges": [judge.id] + ([broad.id] if broad is not None else []),
        "rule": "a generation ends once a keyword is a substring of its decoded text and a broad pattern matches "
        "it with every character its lookaheads can read already there; both verdicts are then decided. Outputs cut this way have "
        "stopped_early = true",
    }


def stop_at_verdict(s: GenSettings, judge: KeywordJudge, broad: KeywordJudge | None = None) -> GenSettings:
    """``s`` with verdict-aware early stopping: end a generation once ``judge``'s keywords (and ``broad``'s
    patterns, when given) have decided it."""
    return replace(
        s,
        stop_strings=tuple(judge.keywords),
        stop_case_sensitive=judge.case_sensitive,
        stop_patterns=tuple(broad.keywords) if broad is not None else (),
    )


def gen_settings(
    cfg: EvalConfig, kind: str, judge: KeywordJudge, early_stop: bool, broad: KeywordJudge | None = None
) -> GenSettings:
    s = cfg.settings(kind)
    return stop_at_verdict(s, judge, broad) if early_stop and kind in STOP_KINDS else s


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
            "stopped_early": g.stopped_early,
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
        if ps.kind in SCORED_KINDS:
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
        r["bleu"] = sentence_bleu(r["output"], r["reference"]) / 100.0  # a share, like ROUGE (×100 in reports)
        r["bleu_stats"] = item_stats(r["output"], r["reference"])


def _score_qa(recs: list[dict[str, Any]]) -> None:
    for r in recs:
        r["answer"] = extract_answer(r["output"])
        r.update(qa_scores(r["answer"], r["reference"]))


def _sampled_uncertainty(be, gcache, ps: PromptSet, adapter, vname, cfg: EvalConfig, equiv, progress, recs) -> int:
    """K seeded sampled generations per item; uncertainty = entropy over clusters of equivalent answers.
    Returns how many samples were generated now (the rest came from the cache)."""
    prompts = [it.prompt for it in ps.items]
    samples: list[list[str]] = [[] for _ in prompts]
    fresh = 0
    for k in range(cfg.uq_samples):
        cb = (
            (lambda d, n, _k=k: progress(f"{vname} · {ps.name} · sample {_k + 1}/{cfg.uq_samples}", d, n))
            if progress
            else None
        )
        gens = generate_cached(be, gcache, prompts, adapter, cfg.sample_settings(ps.kind, k), label=vname, progress=cb)
        fresh += sum(not g.cached for g in gens)
        for row, g in zip(samples, gens):
            row.append(extract_answer(g.text) if ps.kind == "qa" else g.text)
    for r, it, row in zip(recs, ps.items, samples):
        question = it.prompt.removeprefix(ps.info.get("instruction", "")) if ps.kind == "qa" else ""
        ids = cluster(row, equiv, context=question)  # NLI: the bare question before both answers
        r["uq_samples"] = row
        r["uq_clusters"] = ids
        r["semantic_entropy"] = cluster_entropy(ids)
    return fresh


def _generation_stats(gens) -> dict[str, Any]:
    return {
        "tokens_per_s": tokens_per_second(gens),
        "mean_latency_s": sum(g.batch_seconds for g in gens) / max(1, len(gens)),
        "mean_new_tokens": sum(g.new_tokens for g in gens) / max(1, len(gens)),
        "generated_now": sum(not g.cached for g in gens),
        "stopped_early": sum(bool(g.stopped_early) for g in gens),
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
    stop = early_stop_plan(cfg, judge, harm_judges, broad)
    met = Meteor() if meteor and any(s.kind == "utility" for s in prompt_sets) else None
    hjudges = {j.id: j for j in harm_judges}
    sampled = cfg.uncertainty == "sampled" and any(s.kind in SCORED_KINDS for s in prompt_sets)
    equiv = parse_equivalence(cfg.uq_equivalence) if sampled else None

    items: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    timing: dict[str, Any] = {}
    t_all = time.perf_counter()
    for vname, adapter in variants:
        metrics[vname] = {}
        # sets with the same settings (safety and over-refusal) share one continuous-batching call
        generated = generate_cached_sets(
            be,
            gcache,
            [
                (ps.name, [it.prompt for it in ps.items], gen_settings(cfg, ps.kind, judge, stop["enabled"], broad))
                for ps in prompt_sets
            ],
            adapter,
            label=vname,
            progress=(lambda s, d, n, _v=vname: progress(f"{_v} · {s}", d, n)) if progress else None,
        )
        for ps in prompt_sets:
            gens = generated[ps.name]
            recs = _records(vname, ps, gens, judge, broad)
            if ps.kind == "safety" and hjudges:
                _judge_harm(recs, hjudges)
            if ps.kind == "utility":
                _score_utility(recs, met)
            if ps.kind == "qa":
                _score_qa(recs)
            extra: dict[str, Any] = {}
            if sampled and ps.kind in SCORED_KINDS:
                extra["samples_generated_now"] = _sampled_uncertainty(
                    be, gcache, ps, adapter, vname, cfg, equiv, progress, recs
                )
            metrics[vname][ps.name] = _set_metrics(ps, recs, hjudges, met, cfg) | _generation_stats(gens) | extra
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
        "settings": {
            **asdict(cfg),
            "per_kind": {
                k: gen_settings(cfg, k, judge, stop["enabled"], broad).key()
                for k in ("safety", "over_refusal", "utility", "qa")
            },
        },
        "early_stop": stop,
        "refusal_judge": judge.describe(),
        "refusal_judge_broad": broad.describe(),
        "harm_judges": {jid: j.describe() for jid, j in hjudges.items()},
        "meteor": met.describe() if met else None,
        "bleu": {"implementation": "sacrebleu", "signature": bleu_signature()}
        if any(s.kind == "utility" for s in prompt_sets)
        else None,
        "auarc": _auarc_description(cfg, prompt_sets, equiv),
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
    if ps.kind == "qa":
        for k in ("em", "f1"):
            m[k] = float(100 * np.mean([r[k] for r in recs])) if recs else None
    else:
        for k in ("rouge1", "rouge2", "rougeL"):
            m[k] = float(100 * np.mean([r[k] for r in recs])) if recs else None
        if met is not None and met.available:
            m["meteor"] = float(100 * np.mean([r["meteor"] for r in recs])) if recs else None
        else:
            m["meteor"] = None
            m["meteor_unavailable"] = met.reason if met is not None else "disabled"
        m["bleu"] = float(100 * np.mean([r["bleu"] for r in recs])) if recs else None
        m["bleu_corpus"] = corpus_from_stats(np.array([r["bleu_stats"] for r in recs])) if recs else None
    field_ = UNCERTAINTY_FIELDS[cfg.uncertainty]
    u = uncertainty_vector(recs, field_)
    for name, acc in auarc_accuracies(ps.kind, recs, cfg.auarc_threshold).items():
        m[name] = 100 * auarc(u, acc)
    m["uncertainty"] = cfg.uncertainty
    if cfg.uncertainty == "sampled":
        m["mean_semantic_entropy"] = float(np.nanmean(u)) if len(u) else None
        m["extra_generations"] = len(recs) * cfg.uq_samples
    return m


def _auarc_description(cfg: EvalConfig, prompt_sets: Sequence[PromptSet], equiv) -> dict[str, Any]:
    kinds = sorted({s.kind for s in prompt_sets if s.kind in SCORED_KINDS})
    d: dict[str, Any] = {
        "uncertainty": cfg.uncertainty,
        "field": UNCERTAINTY_FIELDS[cfg.uncertainty],
        "uncertainty_text": UNCERTAINTY_TEXT[cfg.uncertainty],
        "accuracy": {k: auarc_accuracy_text(k, cfg.auarc_threshold) for k in kinds},
        "definition": "UQ-NLG: sort by uncertainty ascending, expanding mean of accuracy, "
        "trapezoid over linspace(0,1,N)",
    }
    if cfg.uncertainty == "sampled":
        d["sampling"] = {
            "samples": cfg.uq_samples,
            "temperature": cfg.uq_temperature,
            "top_p": cfg.uq_top_p,
            "seeds": f"{cfg.seed}..{cfg.seed + cfg.uq_samples - 1} (seed + k)",
            "equivalence": equiv.describe() if equiv is not None else cfg.uq_equivalence,
            "entropy": "discrete: -sum p_c ln p_c over cluster shares (nats)",
        }
    return d


def sampled_uncertainty_cost(prompt_sets: Sequence[PromptSet], n_variants: int, cfg: EvalConfig) -> str | None:
    """The line that announces the sampled uncertainty's extra generations before any is made (None when the
    uncertainty is the token NLL or no set has references)."""
    if cfg.uncertainty != "sampled":
        return None
    scored = [s for s in prompt_sets if s.kind in SCORED_KINDS]
    n = sum(len(s) for s in scored)
    if not n:
        return None
    extra = sampled_cost(n, n_variants, cfg.uq_samples)
    toks = max(cfg.max_new_tokens(s.kind) for s in scored)
    return (
        f"sampled uncertainty: {cfg.uq_samples} samples × {n} items × {n_variants} variants = {extra} extra "
        f"generations (up to {toks} new tokens each; {extra // max(1, cfg.uq_samples)} greedy generations "
        "besides); cached samples are reused"
    )
