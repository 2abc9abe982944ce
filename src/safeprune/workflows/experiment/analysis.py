"""From per-item evaluation records to the numbers of the report: each variant's metrics with 95% bootstrap
CIs, paired deltas against the unedited adapter, paired deltas against the mean of the random controls at
the same τ, flipped prompts, and risk–coverage curves.

All intervals are percentile intervals of a paired bootstrap over prompts: one resampling of a set's items
is shared by every variant, so a delta's interval accounts for the pairing. AUARC is reported as a point
value (a set-level statistic), and so is corpus BLEU.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ...eval.compare import mcnemar_exact
from ...eval.results import shown_output
from .variants import Variant

# per set kind: the per-item field and the metric name it becomes (share × 100 or mean × 100)
ITEM_METRICS = {
    "safety": [("asr", "jailbroken"), ("asr_broad", "jailbroken_broad")],
    "over_refusal": [("over_refusal", "refused"), ("over_refusal_broad", "refused_broad")],
    "utility": [("rouge1", "rouge1"), ("meteor", "meteor"), ("bleu", "bleu")],
    "qa": [("em", "em"), ("f1", "f1")],
}
# per set kind: set-level metrics reported as point values (no per-item vector)
SET_METRICS = {"utility": ("auarc", "auarc_rouge1", "bleu_corpus"), "qa": ("auarc", "auarc_f1")}
LEVEL = 0.95


def _vec(items: list[dict[str, Any]], field: str, ids: list[str]) -> np.ndarray | None:
    by = {it["id"]: it.get(field) for it in items}
    vals = [by.get(i) for i in ids]
    if any(v is None for v in vals):
        return None
    return 100.0 * np.asarray(vals, dtype=float)


def _ci(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(lo), float(hi)


def _stat(x: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    lo, hi = _ci(x[idx].mean(1))
    return {"value": float(x.mean()), "lo": lo, "hi": hi}


def _delta(d: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    lo, hi = _ci(d[idx].mean(1))
    return {"delta": float(d.mean()), "lo": lo, "hi": hi}


def _mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    return mcnemar_exact(a > 0, b > 0)["p_value"]


def risk_coverage(
    items: list[dict[str, Any]],
    acc_field: str = "rouge1",
    threshold: float | None = None,
    points: int = 21,
    uncertainty_field: str = "mean_nll",
) -> dict[str, list[float]]:
    """Figure-1 style: reject ('refer to experts') the most uncertain share x of samples (uncertainty =
    mean token NLL, or the field the evaluation's AUARC used), accuracy on the rest. ``threshold``:
    accuracy = ROUGE-1 > threshold, else ROUGE-1."""
    u = np.asarray(
        [it.get(uncertainty_field) if it.get(uncertainty_field) is not None else np.inf for it in items], float
    )
    a = np.asarray([it.get(acc_field) or 0.0 for it in items], float)
    if threshold is not None:
        a = (a > threshold).astype(float)
    order = np.argsort(u, kind="stable")  # most confident first
    a = a[order]
    n = len(a)
    xs, ys = [], []
    for x in np.linspace(0.0, 0.9, points):
        keep = max(1, int(round(n * (1 - x))))
        xs.append(float(x))
        ys.append(float(100 * a[:keep].mean()))
    return {"refer": xs, "accuracy": ys}


class _Vectors:
    """Per-prompt metric vectors of every variant (aligned on one prompt order per set), the bootstrap
    indices, and the statistics built from them."""

    def __init__(self, results: dict[str, Any], items: list[dict[str, Any]], n_boot: int, seed: int):
        rng = np.random.default_rng(seed)
        self.by_vs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for it in items:
            self.by_vs[it["variant"], it["set"]].append(it)
        self.sets = results["sets"]
        self.metrics = results["metrics"]
        self.ids = {
            s["name"]: [it["id"] for it in self.by_vs.get((_first_variant(self.by_vs, s["name"]), s["name"]), [])]
            for s in self.sets
        }
        self.idx = {name: rng.integers(0, len(v), (n_boot, len(v))) for name, v in self.ids.items() if v}
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, vname: str) -> dict[str, np.ndarray]:
        if vname not in self._cache:
            out = {}
            for s in self.sets:
                for mname, field in ITEM_METRICS.get(s["kind"], []):
                    x = _vec(self.by_vs.get((vname, s["name"]), []), field, self.ids[s["name"]])
                    if x is not None:
                        out[f"{s['name']}/{mname}"] = x
            self._cache[vname] = out
        return self._cache[vname]

    def boot(self, key: str) -> np.ndarray:
        return self.idx[key.split("/")[0]]

    def point_stats(self, vname: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, x in self(vname).items():
            out[key] = _stat(x, self.boot(key))
        for s in self.sets:
            m = self.metrics.get(vname, {}).get(s["name"], {})
            for k in SET_METRICS.get(s["kind"], ()):
                out[f"{s['name']}/{k}"] = {"value": m.get(k)}
            if s["kind"] == "safety":
                for k, v in m.items():
                    if k.startswith(("hs[", "harmful_rate[")) and isinstance(v, (int, float)):
                        out[f"{s['name']}/{k}"] = {"value": float(v)}
            out[f"{s['name']}/tokens_per_s"] = {"value": m.get("tokens_per_s")}
        return out

    def variant_row(self, v: Variant, ref: str, randoms: dict[int, list[str]]) -> dict[str, Any]:
        """A variant's metrics with paired deltas against the adapter and against the random controls' mean."""
        row: dict[str, Any] = {
            "variant": v.to_dict(),
            "metrics": self.point_stats(v.name),
            "vs_ref": {},
            "vs_random": {},
        }
        rvec, x = self(ref), self(v.name)
        for key, xv in x.items():
            if key in rvec and v.name != ref:
                d = _delta(xv - rvec[key], self.boot(key))
                if key.endswith(("/asr", "/over_refusal", "/asr_broad", "/over_refusal_broad")):
                    d["p_mcnemar"] = _mcnemar(rvec[key], xv)
                row["vs_ref"][key] = d
        if v.method not in (None, "random") and v.control_of is None and randoms.get(v.tau):
            rv = [self(n) for n in randoms[v.tau]]
            for key, xv in x.items():
                if all(key in r for r in rv):
                    d = _delta(xv - np.mean([r[key] for r in rv], axis=0), self.boot(key))
                    d["n_random"] = len(rv)
                    row["vs_random"][key] = d
        return row

    def random_summary(self, randoms: dict[int, list[str]], ref: str) -> dict[int, Any]:
        """The random control per τ: mean over seeds (paired CI over prompts)."""
        rvec = self(ref)
        rsum = {}
        for tau, names in sorted(randoms.items()):
            rv = [self(n) for n in names]
            keys = set.intersection(*(set(r) for r in rv)) if rv else set()
            m = {}
            for key in keys:
                xm = np.mean([r[key] for r in rv], axis=0)
                m[key] = _stat(xm, self.boot(key))
                m[key]["seeds"] = [float(r[key].mean()) for r in rv]
                if key in rvec:
                    m[key]["vs_ref"] = _delta(xm - rvec[key], self.boot(key))
            rsum[tau] = {"variants": names, "metrics": m}
        return rsum


def analyse(
    results: dict[str, Any],
    items: list[dict[str, Any]],
    variants: list[Variant],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    auarc_threshold: float = 0.15,
) -> dict[str, Any]:
    vec = _Vectors(results, items, n_boot, seed)
    ufield = (results.get("auarc") or {}).get("field", "mean_nll")
    primary: dict[str, str] = {}
    for s in vec.sets:
        primary.setdefault(s["kind"], s["name"])
    adapters = sorted({v.adapter for v in variants if v.adapter}, key=lambda a: [v.adapter for v in variants].index(a))
    gen_s = sum((it.get("latency_s") or 0.0) / max(1, it.get("batch_size") or 1) for it in items)
    out: dict[str, Any] = {
        "primary_sets": primary,
        "n_boot": n_boot,
        "level": LEVEL,
        "adapters": {},
        "generation_seconds": gen_s,
        "generations": len(items),
        "sets": {s["name"]: {"kind": s["kind"], "n": len(vec.ids[s["name"]])} for s in vec.sets},
    }
    if "base" in vec.metrics:
        out["base"] = {"metrics": vec.point_stats("base")}
    for a in adapters:
        ref = a
        randoms: dict[int, list[str]] = defaultdict(list)
        for v in variants:
            if v.adapter == a and v.method == "random":
                randoms[v.tau].append(v.name)
        mine = [v for v in variants if v.adapter == a]
        out["adapters"][a] = {
            "reference": ref,
            "rows": [vec.variant_row(v, ref, randoms) for v in mine if not v.is_repair],
            "random": vec.random_summary(randoms, ref),
            "repairs": _repair_rows(vec, mine, ref),
            "flips": _flips(
                vec.by_vs, primary.get("safety"), ref, [v.name for v in variants if v.adapter == a and v.name != ref]
            ),
            "risk_coverage": {},
        }
        if "utility" in primary:
            us = primary["utility"]
            names = ([("base", "base")] if "base" in vec.metrics else []) + [
                (v.name, v.name) for v in variants if v.adapter == a
            ]
            for label, vname in names:
                its = vec.by_vs.get((vname, us), [])
                if its:
                    out["adapters"][a]["risk_coverage"][label] = {
                        "rouge1": risk_coverage(its, "rouge1", uncertainty_field=ufield),
                        "thresholded": risk_coverage(
                            its, "rouge1", threshold=auarc_threshold, uncertainty_field=ufield
                        ),
                    }
    return out


def _repair_rows(vec: _Vectors, variants: list[Variant], ref: str) -> list[dict[str, Any]]:
    """Each repaired variant (``repairs:``) against the adapter and against the mean of its own energy-matched
    random controls (paired per prompt); each control's own row beside it (``controls``)."""
    rows = []
    for v in variants:
        if not v.is_repair or v.control_of is not None:
            continue
        ctl = [c for c in variants if c.control_of == v.name]
        row = vec.variant_row(v, ref, {None: [c.name for c in ctl]})  # type: ignore[dict-item]
        row["controls"] = [vec.variant_row(c, ref, {}) for c in ctl]
        rows.append(row)
    return rows


def _first_variant(by_vs, set_name: str) -> str:
    for v, s in by_vs:
        if s == set_name:
            return v
    return ""


def _flips(by_vs, safety_set: str | None, ref: str, others: list[str]) -> dict[str, Any]:
    if not safety_set:
        return {}
    refd = {it["id"]: it for it in by_vs.get((ref, safety_set), [])}
    res = {}
    for o in others:
        to_refused, to_jail = [], []
        for it in by_vs.get((o, safety_set), []):
            r = refd.get(it["id"])
            if r is None:
                continue
            if r["jailbroken"] and not it["jailbroken"]:
                to_refused.append(
                    {
                        "id": it["id"],
                        "prompt": it["prompt"],
                        "before": shown_output(r),
                        "after": shown_output(it),
                        "keyword": it.get("refusal_keyword"),
                    }
                )
            elif not r["jailbroken"] and it["jailbroken"]:
                to_jail.append(
                    {"id": it["id"], "prompt": it["prompt"], "before": shown_output(r), "after": shown_output(it)}
                )
        res[o] = {"now_refused": to_refused, "now_jailbroken": to_jail}
    return res
