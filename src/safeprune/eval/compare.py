"""Paired comparison of two variants of one eval run (same prompts, same judges).

For every prompt set both variants answered, on the items both have:

* every metric's delta (b - a) with a paired bootstrap 95% CI (items resampled with replacement, the
  same resample for a and b; set-level metrics, AUARC and corpus BLEU, are recomputed on each resample,
  AUARC with the uncertainty the eval run used: token NLL or the sampled cluster entropy);
* for binary verdicts (jailbroken on safety sets, refused on over-refusal sets) the exact McNemar test:
  a two-sided binomial test of the discordant pairs (``scipy.stats.binomtest(n_b_only, n_discordant, 0.5)``);
* the list of prompts whose verdict flipped, with both outputs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import binomtest

from ..errors import UsageError
from ..io.files import write_text_atomic
from .bleu import corpus_from_stats
from .results import STOPPED_MARK, dumps, fmt, load_results
from .utility import auarc, auarc_accuracies, uncertainty_vector


def _bootstrap(
    fa: Callable[[np.ndarray], float],
    fb: Callable[[np.ndarray], float],
    n: int,
    n_boot: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> tuple[float, float]:
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        deltas[i] = fb(idx) - fa(idx)
    deltas = deltas[np.isfinite(deltas)]
    if not len(deltas):
        return float("nan"), float("nan")
    lo, hi = np.quantile(deltas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _mean_boot(xa: np.ndarray, xb: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95):
    n = len(xa)
    idx = rng.integers(0, n, (n_boot, n))
    d = xb[idx].mean(1) - xa[idx].mean(1)
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """a, b: paired 0/1 arrays. n_a_only = 1 in a only, n_b_only = 1 in b only."""
    a = a.astype(bool)
    b = b.astype(bool)
    n_a = int((a & ~b).sum())
    n_b = int((~a & b).sum())
    n = n_a + n_b
    p = float(binomtest(n_b, n, 0.5).pvalue) if n else 1.0
    return {"n_a_only": n_a, "n_b_only": n_b, "n_discordant": n, "p_value": p}


# per kind: (verdict field, metrics as (name, item field, scale))
_KIND_METRICS = {
    "safety": ("jailbroken", [("asr", "jailbroken", 100.0), ("asr_broad", "jailbroken_broad", 100.0)]),
    "over_refusal": ("refused", [("over_refusal", "refused", 100.0), ("over_refusal_broad", "refused_broad", 100.0)]),
    "utility": (
        None,
        [
            ("rouge1", "rouge1", 100.0),
            ("rouge2", "rouge2", 100.0),
            ("rougeL", "rougeL", 100.0),
            ("meteor", "meteor", 100.0),
            ("bleu", "bleu", 100.0),
        ],
    ),
    "qa": (None, [("em", "em", 100.0), ("f1", "f1", 100.0)]),
}
_COMMON = [("mean_new_tokens", "new_tokens", 1.0), ("mean_latency_s", "latency_s", 1.0)]


# Long on purpose: one paired comparison per metric kind (safety, over-refusal, utility, AUARC), each a
# short block over the same aligned prompt pairs; the shared state is the pairing itself.
def compare(
    results_dir: str | Path,
    a: str,
    b: str,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    out_dir: str | Path | None = None,
    auarc_threshold: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """``progress(label, done, total)`` is called as the metrics' bootstraps are done (one count per metric)."""
    results, items = load_results(results_dir)
    variants = list(results["variants"])
    for v in (a, b):
        if v not in variants:
            raise UsageError(f"{results_dir}: no variant {v!r} (has: {', '.join(variants)})")
    if a == b:
        raise UsageError("compare two different variants")
    thr = auarc_threshold if auarc_threshold is not None else results["settings"].get("auarc_threshold", 0.15)
    ufield = (results.get("auarc") or {}).get("field", "mean_nll")
    rng = np.random.default_rng(seed)
    by = {(it["variant"], it["set"], it["id"]): it for it in items}
    out: dict[str, Any] = {
        "schema": "safeprune.compare/1",
        "results": str(results_dir),
        "a": a,
        "b": b,
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "refusal_judge": results["refusal_judge"]["id"],
        "refusal_judge_broad": (results.get("refusal_judge_broad") or {}).get("id"),
        "harm_judges": list(results.get("harm_judges", {})),
        "uncertainty": (results.get("auarc") or {}).get("uncertainty", "nll"),
        "sets": {},
    }
    plan = []
    for s in results["sets"]:
        name, kind = s["name"], s["kind"]
        ids = [it["id"] for it in items if it["variant"] == a and it["set"] == name]
        pairs = [(by[(a, name, i)], by[(b, name, i)]) for i in ids if (b, name, i) in by]
        if kind == "safety":
            pairs = [p for p in pairs if not p[0].get("overlap")]
        if not pairs:
            continue
        verdict, mets = _KIND_METRICS[kind]
        mets = list(mets)
        if kind == "safety":
            mets += [(f"hs[{j}]", ("harm", j), 1.0) for j in out["harm_judges"]]
        stats = _set_level_stats(kind, pairs, ufield, thr) if kind in ("utility", "qa") else []
        plan.append((name, kind, pairs, verdict, mets + _COMMON, stats))
    total, done = sum(len(p[4]) + len(p[5]) for p in plan), 0
    label = f"bootstrap CIs ({n_boot} resamples)"

    def tick() -> None:  # called as each metric starts: ``done`` metrics are finished
        nonlocal done
        if progress is not None:
            progress(label, done, total)
        done += 1

    for name, kind, pairs, verdict, mets, stats in plan:
        rows = []
        for mname, field, scale in mets:
            tick()
            xa, xb = _vals(pairs, field)
            if xa is None:
                rows.append(
                    {
                        "metric": mname,
                        "n": 0,
                        "a": None,
                        "b": None,
                        "delta": None,
                        "ci_low": None,
                        "ci_high": None,
                        "note": "not available",
                    }
                )
                continue
            xa, xb = xa * scale, xb * scale
            lo, hi = _mean_boot(xa, xb, n_boot, rng, level)
            rows.append(
                {
                    "metric": mname,
                    "n": len(xa),
                    "a": float(xa.mean()),
                    "b": float(xb.mean()),
                    "delta": float(xb.mean() - xa.mean()),
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
        rows += _set_level_rows(stats, len(pairs), n_boot, rng, level, tick)
        entry: dict[str, Any] = {"kind": kind, "n_pairs": len(pairs), "metrics": rows}
        if verdict:
            va = np.array([bool(p[0][verdict]) for p in pairs])
            vb = np.array([bool(p[1][verdict]) for p in pairs])
            entry["mcnemar"] = {"verdict": verdict, **mcnemar_exact(va, vb)}
            entry["flips"] = [
                {
                    "id": pa["id"],
                    "prompt": pa["prompt"],
                    f"{verdict}_a": bool(pa[verdict]),
                    f"{verdict}_b": bool(pb[verdict]),
                    "output_a": pa["output"],
                    "output_b": pb["output"],
                    "stopped_early_a": bool(pa.get("stopped_early")),
                    "stopped_early_b": bool(pb.get("stopped_early")),
                }
                for pa, pb in pairs
                if bool(pa[verdict]) != bool(pb[verdict])
            ]
        out["sets"][name] = entry
    if progress is not None and total:
        progress(label, total, total)
    if out_dir is not None:
        write_compare(out, out_dir)
    return out


def _set_level_stats(kind, pairs, ufield, thr) -> list[tuple[str, Callable, Callable]]:
    """AUARC (both accuracies) and, on summary sets, corpus BLEU, as functions of a resample of the pairs."""
    ia, ib = [p[0] for p in pairs], [p[1] for p in pairs]
    stats: list[tuple[str, Callable[[np.ndarray], float], Callable[[np.ndarray], float]]] = []
    u_a, u_b = uncertainty_vector(ia, ufield), uncertainty_vector(ib, ufield)
    acc_a, acc_b = auarc_accuracies(kind, ia, thr), auarc_accuracies(kind, ib, thr)
    for name in acc_a:
        xa, xb = acc_a[name], acc_b[name]
        stats.append((name, lambda i, x=xa: 100 * auarc(u_a[i], x[i]), lambda i, x=xb: 100 * auarc(u_b[i], x[i])))
    if kind == "utility" and all("bleu_stats" in it for it in ia + ib):
        sa, sb = np.array([it["bleu_stats"] for it in ia]), np.array([it["bleu_stats"] for it in ib])
        stats.insert(0, ("bleu_corpus", lambda i: corpus_from_stats(sa[i]), lambda i: corpus_from_stats(sb[i])))
    return stats


def _set_level_rows(stats, n, n_boot, rng, level, tick: Callable[[], None]) -> list[dict[str, Any]]:
    """The rows of :func:`_set_level_stats`: recomputed on every paired resample (at most 2000)."""
    rows = []
    everything = np.arange(n)
    for name, fa, fb in stats:
        tick()
        va, vb = fa(everything), fb(everything)
        lo, hi = _bootstrap(fa, fb, n, min(n_boot, 2000), rng, level)
        rows.append({"metric": name, "n": n, "a": va, "b": vb, "delta": vb - va, "ci_low": lo, "ci_high": hi})
    return rows


def _vals(pairs, field):
    def get(it):
        if isinstance(field, tuple):
            return (it.get(field[0]) or {}).get(field[1])
        return it.get(field)

    xs = [(get(pa), get(pb)) for pa, pb in pairs]
    xs = [(x, y) for x, y in xs if x is not None and y is not None]
    if not xs:
        return None, None
    return np.array([float(x) for x, _ in xs]), np.array([float(y) for _, y in xs])


def compare_csv(c: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "metric", "n", "a", "b", "delta", "ci_low", "ci_high", "mcnemar_p"])
    for s, e in c["sets"].items():
        p = e.get("mcnemar", {}).get("p_value")
        for r in e["metrics"]:
            w.writerow(
                [s, r["metric"], r["n"]]
                + ["" if r[k] is None else r[k] for k in ("a", "b", "delta", "ci_low", "ci_high")]
                + ["" if p is None or r["metric"] not in ("asr", "over_refusal") else p]
            )
    return buf.getvalue()


def compare_markdown(c: dict[str, Any], max_flips: int = 20) -> str:
    a, b = c["a"], c["b"]
    lines = [
        f"# {b} vs {a}",
        "",
        f"Paired over the same prompts; Δ = {b} − {a}; {int(c['level'] * 100)}% paired bootstrap CI "
        f"({c['n_boot']} resamples, seed {c['seed']}); refusal judge `{c['refusal_judge']}` "
        f"(`*_broad` rows: `{c.get('refusal_judge_broad') or '—'}`; the two are never averaged); AUARC uncertainty "
        f"`{c.get('uncertainty', 'nll')}`.",
        "",
    ]
    for s, e in c["sets"].items():
        lines += [
            f"## {s} ({e['kind']}, {e['n_pairs']} pairs)",
            "",
            f"| metric | {a} | {b} | Δ | CI |",
            "|---|---:|---:|---:|---|",
        ]
        for r in e["metrics"]:
            nd = 3 if r["metric"] == "mean_latency_s" else 2
            ci = f"[{fmt(r['ci_low'], nd)}, {fmt(r['ci_high'], nd)}]" if r.get("ci_low") is not None else "—"
            lines.append(f"| {r['metric']} | {fmt(r['a'], nd)} | {fmt(r['b'], nd)} | {fmt(r['delta'], nd)} | {ci} |")
        if "mcnemar" in e:
            m = e["mcnemar"]
            lines += [
                "",
                f"Exact McNemar on `{m['verdict']}`: {m['n_a_only']} only under {a}, {m['n_b_only']} only "
                f"under {b}; p = {m['p_value']:.3g}.",
            ]
            if e["flips"]:
                lines += [
                    "",
                    f"Flipped prompts ({len(e['flips'])}; first {min(len(e['flips']), max_flips)}):",
                    "",
                    f"| id | prompt | {a} | {b} |",
                    "|---|---|---|---|",
                ]
                v = m["verdict"]
                for f in e["flips"][:max_flips]:
                    lines.append(
                        f"| {f['id']} | {_cell(f['prompt'], 70)} | {v}={f[v + '_a']}: {_cell(f['output_a'], 60)}"
                        f"{STOPPED_MARK if f.get('stopped_early_a') else ''} "
                        f"| {v}={f[v + '_b']}: {_cell(f['output_b'], 60)}{STOPPED_MARK if f.get('stopped_early_b') else ''} |"
                    )
        lines.append("")
    return "\n".join(lines)


def _cell(t: str, n: int) -> str:
    t = " ".join(str(t).split()).replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def write_compare(c: dict[str, Any], out_dir: str | Path) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{c['a']}_vs_{c['b']}"
    write_text_atomic(d / f"{stem}.csv", compare_csv(c))
    write_text_atomic(d / f"{stem}.md", compare_markdown(c))
    write_text_atomic(d / f"{stem}.json", dumps(c))
    return d
