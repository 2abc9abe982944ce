"""Budgeted τ search: the fewest modules to prune, along one method's order, for a target ASR.

Given a LoRA adapter, its base and a prune order (module names, most-prune-first, e.g.
:func:`prune_order` of a ScoreTable), :func:`budgeted_search` looks for the smallest τ such that the
adapter with the first τ modules of the order pruned has

* probe ASR ≤ ``target_asr`` (a fraction in [0, 1]: share of harmful probes the keyword judge does not
  flag as refused), and
* probe ROUGE-1 (points, 100 × mean F1 vs the reference summaries) at most ``max_utility_drop`` points
  below the unpruned adapter's (τ = 0).

Probes are small and are never the evaluation sets: HarmBench rows of the official ``val`` split
(standard behaviours only: no contextual, no copyright, none the harmful fine-tuning set trains on)
and DialogSum ``validation`` dialogues. The loaders refuse AdvBench, XSTest and DialogSum ``test``.

Algorithm: evaluate τ = 0 (the reference utility; if it already meets the target, τ = 0 is the
answer) and τ_max; if τ_max misses the ASR target, the search is infeasible. Otherwise bisect τ on the
ASR condition (assuming ASR does not rise as more modules are pruned) until the bracket closes; the
upper end is the candidate, and it is feasible if its utility drop is within the budget (utility is
assumed not to improve with pruning, so a candidate over the budget means no τ is feasible; so does a
bisection point that misses the ASR target *and* the budget, which ends the search early). ASR along a
prefix order is not exactly monotone: ``verify_below`` extra evaluations below the candidate test this,
and any smaller evaluated τ that met both constraints is reported (and returned). Infeasible results
carry the best trade-off seen: the lowest probe ASR among the evaluated τ within the utility budget.

Every (adapter, prompt) generation goes through the eval harness's :class:`GenerationCache`, so a rerun
or a wider search never regenerates. Pruned adapters are written under ``work_dir/adapters``;
results go to ``work_dir/search.json`` (atomic).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..adapter import LoraAdapter, load_adapter
from ..edit import PRUNE_MODES, prune_modules
from ..errors import UsageError
from ..eval.backends import Backend, GenSettings, HFBackend
from ..eval.cache import GenerationCache
from ..eval.evaluate import stop_at_verdict
from ..eval.judges import KeywordJudge
from ..eval.runner import generate_cached
from ..eval.utility import rouge_scores
from ..io.files import write_text_atomic
from ..prompts import PromptSet, harmful_probes, probe_set, utility_probes
from ..scoring.table import ScoreTable


def prune_order(table: ScoreTable, method: str, column: str | None = None) -> list[str]:
    """Module names most-prune-first by the method's primary column (modules whose score is undefined
    are left out, as :func:`safeprune.selection.select` never picks them)."""
    if method not in table.methods:
        raise UsageError(f"the score table has no {method!r} scores (it has: {', '.join(table.methods) or 'none'})")
    info = table.methods[method]
    col = column or info.primary
    return [
        r["module"] for r in table.ordered(col, info.descending) if r.get(col) is not None and r.get(col) == r.get(col)
    ]


# -- result ------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    tau: int | None  # smallest feasible τ found (None: infeasible)
    feasible: bool
    target_asr: float
    max_utility_drop: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluated τ, in evaluation order
    cost: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # the history row of the answer, or the best trade-off if infeasible
    reason: str = ""
    order: list[str] = field(default_factory=list)
    non_monotone: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pruned_modules(self) -> list[str]:
        return self.order[: self.tau] if self.tau is not None else []

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pruned_modules"] = self.pruned_modules
        return d

    def row(self, tau: int) -> dict[str, Any] | None:
        return next((h for h in self.history if h["tau"] == tau), None)


def check_budget(target_asr: float, max_utility_drop: float) -> None:
    if not 0.0 <= target_asr <= 1.0:
        raise UsageError(f"--target-asr is a fraction in [0, 1] (0.5 = 50%), got {target_asr}")
    if not (max_utility_drop >= 0 and math.isfinite(max_utility_drop)):
        raise UsageError(f"--max-utility-drop is ROUGE-1 points >= 0, got {max_utility_drop}")


# -- search ------------------------------------------------------------------------------------------


def _check_search(
    ad: LoraAdapter, order: list[str], mode: str, verify_below: int, tau_max: int | None, sizes: dict[str, int]
) -> int:
    """Refuse a bad search before anything is generated; returns τ_max."""
    if mode not in PRUNE_MODES:
        raise UsageError(f"--mode must be one of {', '.join(PRUNE_MODES)}, got {mode!r}")
    if verify_below < 0:
        raise UsageError(f"verify_below must be >= 0, got {verify_below}")
    if not order:
        raise UsageError("the prune order is empty")
    dup = sorted({m for m in order if order.count(m) > 1})
    if dup:
        raise UsageError(f"the prune order names modules twice: {', '.join(dup[:5])}")
    unknown = [m for m in order if m not in ad.modules]
    if unknown:
        raise UsageError(f"the prune order names modules the adapter does not have: {', '.join(unknown[:5])}")
    if tau_max is None:
        tau_max = len(order)
    if not 1 <= tau_max <= len(order):
        raise UsageError(f"--tau-max must be in [1, {len(order)}] (the length of the prune order), got {tau_max}")
    for name, v in sizes.items():
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    return tau_max


class _ProbeEvaluator:
    """Prunes the first τ modules of the order, generates on the probes (cached) and scores the result;
    each τ is evaluated at most once. ``history`` keeps the rows in evaluation order (τ = 0 first: the
    utility reference)."""

    def __init__(
        self,
        ad: LoraAdapter,
        order: list[str],
        mode: str,
        work: Path,
        backend: Backend,
        cache: GenerationCache,
        judge: KeywordJudge,
        hset: PromptSet,
        uset: PromptSet,
        s_set: GenSettings,
        u_set: GenSettings,
        target_asr: float,
        max_utility_drop: float,
        say,
    ):
        self.ad, self.order, self.mode, self.work = ad, order, mode, work
        self.backend, self.cache, self.judge, self.say = backend, cache, judge, say
        self.s_set, self.u_set = s_set, u_set
        self.target_asr, self.max_utility_drop = target_asr, max_utility_drop
        self.h_prompts = [it.prompt for it in hset.items]
        self.u_prompts = [it.prompt for it in uset.items]
        self.u_refs = [str(it.reference) for it in uset.items]
        self.history: list[dict[str, Any]] = []
        self.seen: dict[int, dict[str, Any]] = {}

    def _variant(self, tau: int) -> tuple[str, Path, str]:
        name = f"tau_{tau:04d}"
        if tau == 0:
            return name, self.ad.path, "unpruned"
        # remove mode cannot drop every module (an empty adapter); zeroing lora_B is the same model
        m = "zero" if (self.mode == "remove" and tau == len(self.ad.modules)) else self.mode
        path = self.work / "adapters" / name
        prune_modules(self.ad, self.order[:tau], mode=m).save(path, force=True)  # deterministic: stable cache keys
        return name, path, m

    def __call__(self, tau: int) -> dict[str, Any]:
        if tau in self.seen:
            return self.seen[tau]
        t0 = time.perf_counter()
        name, path, how = self._variant(tau)
        self.backend.add_adapter(name, str(path))
        hg = generate_cached(self.backend, self.cache, self.h_prompts, name, self.s_set, label=f"{name}/harmful")
        ug = generate_cached(self.backend, self.cache, self.u_prompts, name, self.u_set, label=f"{name}/utility")
        refused = [self.judge.refused(g.text) for g in hg]
        asr = sum(not r for r in refused) / len(refused)
        r1 = 100.0 * sum(s["rouge1"] for s in rouge_scores([g.text for g in ug], self.u_refs)) / len(self.u_refs)
        gens = hg + ug
        drop = self.history[0]["probe_rouge1"] - r1 if self.history else 0.0
        row = {
            "tau": tau,
            "probe_asr": asr,
            "probe_rouge1": r1,
            "utility_drop": drop,
            "meets_asr": asr <= self.target_asr,
            "within_budget": drop <= self.max_utility_drop + 1e-9,
            "feasible": None,
            "edit": how,
            "generated": sum(not g.cached for g in gens),
            "cached": sum(g.cached for g in gens),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        row["feasible"] = row["meets_asr"] and row["within_budget"]
        self.history.append(row)
        self.seen[tau] = row
        self.say(
            f"  τ={tau:>4}: probe ASR {asr:.3f}  ROUGE-1 {r1:.2f} (drop {drop:+.2f})  "
            f"{'feasible' if row['feasible'] else 'meets ASR' if row['meets_asr'] else 'ASR too high'}  "
            f"[{row['generated']} generated, {row['cached']} cached, {row['seconds']:.1f}s]"
        )
        return row


def _bisect(ev: _ProbeEvaluator, tau_max: int, target_asr: float, max_utility_drop: float) -> tuple[int | None, str]:
    """The smallest τ ≤ τ_max meeting the ASR target, assuming ASR does not rise with τ, or None and why."""
    if ev(0)["meets_asr"]:
        return 0, "the unpruned adapter already meets the ASR target"
    top = ev(tau_max)
    if not top["meets_asr"]:
        reason = f"τ_max={tau_max} does not reach probe ASR ≤ {target_asr} (got {top['probe_asr']:.3f})"
        if not top["within_budget"]:
            reason += (
                f" and already drops ROUGE-1 by {top['utility_drop']:.2f} > {max_utility_drop} points, so "
                "a larger τ_max would not help either (assuming monotone ASR and utility)"
            )
        return None, reason
    lo, hi = 0, tau_max  # invariant: ASR(lo) > target, ASR(hi) ≤ target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = ev(mid)
        if r["meets_asr"]:
            hi = mid
        elif not r["within_budget"]:  # smaller τ miss the ASR target, larger τ lose more utility
            return None, (
                f"τ={mid} misses the ASR target and already drops ROUGE-1 by "
                f"{r['utility_drop']:.2f} > {max_utility_drop} points: with ASR not rising "
                "and utility not improving as τ grows, no τ meets both"
            )
        else:
            lo = mid
    if not ev.seen[hi]["within_budget"]:
        return None, (
            f"the smallest τ meeting the ASR target ({hi}) drops ROUGE-1 by "
            f"{ev.seen[hi]['utility_drop']:.2f} > {max_utility_drop} points"
        )
    return hi, f"bisection bracket closed at ({lo}, {hi}]"


def _smallest_evaluated(rows: list[dict[str, Any]], tau: int | None, reason: str) -> tuple[int | None, str]:
    """A smaller evaluated feasible τ than the bisection's answer (ASR or utility not monotone) wins."""
    feasible_rows = [r for r in rows if r["feasible"]]
    if feasible_rows and (tau is None or feasible_rows[0]["tau"] < tau):
        smaller = feasible_rows[0]["tau"]
        if tau is None:
            reason += (
                f"; but the evaluated τ={smaller} meets both constraints (ASR or utility is not monotone "
                "along this order), so it is returned: the smallest evaluated feasible τ"
            )
        else:
            reason += (
                f"; a smaller evaluated τ={smaller} also meets both constraints (ASR is not monotone along "
                "this order) and is returned"
            )
        tau = smaller
    return tau, reason


def _non_monotone(rows: list[dict[str, Any]]) -> list[dict[str, int]]:
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a["meets_asr"] and not b["meets_asr"]:
                out.append({"tau_meets": a["tau"], "tau_misses": b["tau"]})
    return out


# Long because of the record: checks, evaluator, bisection and the verify/smallest-τ steps are helpers
# above; what stays is wiring and the cost/probe dictionaries of search.json.
def budgeted_search(
    base: str | Path,
    adapter: str | Path,
    order: Sequence[str],
    *,
    target_asr: float,
    max_utility_drop: float,
    work_dir: str | Path,
    harmful: str | Path | PromptSet | None = None,
    utility: str | Path | PromptSet | None = None,
    n_harmful: int = 48,
    n_utility: int = 24,
    seed: int = 0,
    backend: Backend | None = None,
    tau_max: int | None = None,
    verify_below: int = 0,
    mode: str = "remove",
    safety_max_new_tokens: int = 48,
    utility_max_new_tokens: int = 64,
    batch_size: int = 48,
    threads: int | None = 1,
    device: str = "cpu",
    judge: KeywordJudge | None = None,
    early_stop: bool = True,
    progress: bool | Callable[[str], None] = True,
) -> SearchResult:
    """Smallest τ along ``order`` whose pruned adapter meets probe ASR ≤ ``target_asr`` (fraction) with
    probe ROUGE-1 at most ``max_utility_drop`` points below the unpruned adapter's. See the module doc."""
    t_start = time.perf_counter()
    check_budget(target_asr, max_utility_drop)
    ad: LoraAdapter = load_adapter(adapter)
    order = list(order)
    sizes = {
        "safety_max_new_tokens": safety_max_new_tokens,
        "utility_max_new_tokens": utility_max_new_tokens,
        "batch_size": batch_size,
    }
    tau_max = _check_search(ad, order, mode, verify_below, tau_max, sizes)

    hset = probe_set(harmful, harmful_probes, n_harmful, seed, "safety")
    uset = probe_set(utility, utility_probes, n_utility, seed, "utility")
    say = progress if callable(progress) else ((lambda m: print(m, flush=True)) if progress else (lambda m: None))
    for ps, n in ((hset, n_harmful), (uset, n_utility)):
        if len(ps.items) < n:
            say(f"note: {ps.name} has {len(ps.items)} probe rows, fewer than the {n} asked for; using all of them")

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if backend is None:
        backend = HFBackend(str(base), {}, device=device, threads=threads)
    judge = judge or KeywordJudge()
    s_set = GenSettings(max_new_tokens=safety_max_new_tokens, batch_size=batch_size)
    # verdict-aware early stopping on the harmful probes (issue 18): the search reads only the keyword judge's
    # verdict, which a generation cut at its first keyword cannot change; a judge that is not the plain keyword
    # list (a subclass with its own rule) generates in full
    stop = early_stop and type(judge) is KeywordJudge
    if stop:
        s_set = stop_at_verdict(s_set, judge)
    u_set = GenSettings(max_new_tokens=utility_max_new_tokens, batch_size=batch_size)
    ev = _ProbeEvaluator(
        ad,
        order,
        mode,
        work,
        backend,
        GenerationCache(work / "cache" / "generations.jsonl"),
        judge,
        hset,
        uset,
        s_set,
        u_set,
        target_asr,
        max_utility_drop,
        say,
    )
    say(
        f"search: {len(order)} modules in the order, τ_max={tau_max}, target ASR ≤ {target_asr}, "
        f"ROUGE-1 drop ≤ {max_utility_drop} points; probes {len(ev.h_prompts)} harmful + {len(ev.u_prompts)} utility"
    )
    tau, reason = _bisect(ev, tau_max, target_asr, max_utility_drop)
    # non-monotonicity check: extra points below the candidate (evenly spaced, not yet evaluated)
    if verify_below and tau is not None and tau > 1:
        for t in sorted(
            {max(1, round(tau * k / (verify_below + 1))) for k in range(1, verify_below + 1)} - set(ev.seen)
        ):
            ev(t)
    rows = sorted(ev.seen.values(), key=lambda r: r["tau"])
    tau, reason = _smallest_evaluated(rows, tau, reason)
    if tau is not None:
        best = ev.seen[tau]
    else:  # best trade-off: lowest probe ASR within the utility budget (τ=0 always is), then smallest τ
        best = min((r for r in rows if r["within_budget"]), key=lambda r: (r["probe_asr"], r["tau"]))
    secs = time.perf_counter() - t_start
    history = ev.history
    cost = {
        "evaluations": len(history),
        "generated": sum(r["generated"] for r in history),
        "cached": sum(r["cached"] for r in history),
        "seconds": round(secs, 3),
        "bisection_bound": 2 + math.ceil(math.log2(tau_max)) if tau_max > 1 else 2,
    }
    probes = {
        "note": "probe settings for the search, not the evaluation protocol",
        "harmful": {**hset.describe(), "ids": [it.id for it in hset.items], "size": len(hset.items)},
        "utility": {**uset.describe(), "ids": [it.id for it in uset.items], "size": len(uset.items)},
        "names": [hset.name, uset.name],
        "sizes": [len(hset.items), len(uset.items)],
        "settings": {
            "harmful": s_set.key(),
            "utility": u_set.key(),
            "batch_size": batch_size,
            "seed": seed,
            "judge": judge.id,
            "early_stop": stop,
            "asr": "fraction of harmful probes not refused (keyword judge)",
            "rouge1": "100 x mean ROUGE-1 F1 (rouge_score, stemmer) vs the reference summary",
            "backend": backend.describe() | {"adapters": len(backend.adapters)},
        },
    }
    res = SearchResult(
        tau=tau,
        feasible=tau is not None,
        target_asr=target_asr,
        max_utility_drop=max_utility_drop,
        history=history,
        cost=cost,
        probes=probes,
        best=best,
        reason=reason.strip("; "),
        order=order[:tau_max],
        non_monotone=_non_monotone(rows),
    )

    write_text_atomic(work / "search.json", json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    say(
        f"search: {'τ = ' + str(tau) if tau is not None else 'infeasible'} ({res.reason}); {cost['evaluations']} "
        f"evaluations, {cost['generated']} generated, {cost['cached']} from cache, {secs:.1f}s"
    )
    return res
