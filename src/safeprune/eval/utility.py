"""Utility metrics: ROUGE-1/2/L (rouge-score, stemming), METEOR (nltk + offline WordNet), AUARC; BLEU is in
``bleu.py``, QA exact match / F1 in ``qa.py``.

METEOR tokenisation: lower-cased ``\\w+|[^\\w\\s]`` tokens (no punkt download). When WordNet is not
available, METEOR is reported as unavailable with the reason, never replaced by something else.

AUARC (methods.md §5.3, UQ-NLG's definition): sort samples by uncertainty ascending, take the expanding
mean of accuracy, integrate it with the trapezoid rule over ``linspace(0, 1, N)``. Uncertainty is the
mean token negative log-likelihood of the (greedy) generation under the model (``mean_nll``), or, with
sampled uncertainty, the entropy over clusters of equivalent sampled answers (``semantic_entropy``, see
``uncertainty.py``). Accuracy on summary sets is ROUGE-1 F > ``threshold`` (0.15, the SPLoRA proxy) and, as
a second number, ROUGE-1 F itself; on QA sets exact match and, second, token F1.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import numpy as np

from .wordnet import find_wordnet, load_wordnet

_TOKEN = re.compile(r"\w+|[^\w\s]")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = []
    for p, r in zip(predictions, references):
        s = sc.score(r, p)  # score(target, prediction)
        out.append({k: float(v.fmeasure) for k, v in s.items()})
    return out


class Meteor:
    """METEOR scorer with an explicit WordNet; ``available`` and ``reason`` say whether it can run."""

    def __init__(self, auto_setup: bool = True):
        self.wordnet = None
        path, how = find_wordnet(auto_setup=auto_setup)
        self.path = path
        self.reason = how
        if path is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "multilingual functions are not available"
                    self.wordnet = load_wordnet(path)
                    self.wordnet.synsets("dog")  # fail now, not mid-run
            except Exception as e:  # noqa: BLE001
                self.wordnet = None
                self.reason = f"WordNet at {path} could not be read: {type(e).__name__}: {e}"

    @property
    def available(self) -> bool:
        return self.wordnet is not None

    def describe(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "wordnet": str(self.path) if self.path else None,
            "how": self.reason,
            "implementation": "nltk.translate.meteor_score (alpha=0.9, beta=3, gamma=0.5)",
            "tokenizer": r"lower-cased \w+|[^\w\s]",
        }

    def score(self, prediction: str, reference: str) -> float | None:
        if not self.available:
            return None
        from nltk.translate.meteor_score import meteor_score

        hyp = _TOKEN.findall(prediction.lower())
        ref = _TOKEN.findall(reference.lower())
        if not hyp or not ref:
            return 0.0
        return float(meteor_score([ref], hyp, wordnet=self.wordnet))


def auarc(uncertainty: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under the accuracy-rejection curve (UQ-NLG ``eval_uq.py``): most confident first,
    expanding mean of accuracy, trapezoid over linspace(0, 1, N). NaN for fewer than 2 samples."""
    u = np.asarray(uncertainty, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if u.shape != a.shape:
        raise ValueError("uncertainty and accuracy differ in length")
    ok = np.isfinite(u) & np.isfinite(a)
    u, a = u[ok], a[ok]
    n = len(u)
    if n < 2:
        return float("nan")
    order = np.argsort(u, kind="stable")
    a_mean = np.cumsum(a[order]) / np.arange(1, n + 1)
    x = np.linspace(0.0, 1.0, n)
    return float(np.trapezoid(a_mean, x) if hasattr(np, "trapezoid") else np.trapz(a_mean, x))


UNCERTAINTY_FIELDS = {"nll": "mean_nll", "sampled": "semantic_entropy"}
UNCERTAINTY_TEXT = {
    "nll": "mean token negative log-likelihood of the greedy generation (mean_nll)",
    "sampled": "entropy over clusters of equivalent sampled answers (semantic_entropy)",
}


def auarc_accuracies(kind: str, items: Sequence[dict[str, Any]], threshold: float) -> dict[str, np.ndarray]:
    """The accuracy vectors AUARC is computed with, per AUARC name: summaries ``auarc`` (ROUGE-1 F >
    threshold) and ``auarc_rouge1`` (ROUGE-1 F); QA ``auarc`` (exact match) and ``auarc_f1`` (token F1)."""
    if kind == "qa":
        return {
            "auarc": np.array([float(it["em"]) for it in items]),
            "auarc_f1": np.array([float(it["f1"]) for it in items]),
        }
    r1 = np.array([float(it["rouge1"]) for it in items])
    return {"auarc": (r1 > threshold).astype(float), "auarc_rouge1": r1}


def auarc_accuracy_text(kind: str, threshold: float) -> dict[str, str]:
    if kind == "qa":
        return {"auarc": "exact match (SQuAD v1.1 normalisation)", "auarc_f1": "token F1"}
    return {"auarc": f"ROUGE-1 F > {threshold}", "auarc_rouge1": "ROUGE-1 F"}


def uncertainty_vector(items: Sequence[dict[str, Any]], field: str) -> np.ndarray:
    return np.array([float("nan") if it.get(field) is None else float(it[field]) for it in items])
