"""Sampled uncertainty for AUARC: entropy over clusters of equivalent sampled answers.

For every item, K generations are sampled (temperature/top-p sampling; sample k uses seed ``seed + k``, so
a fixed seed gives the same samples). The samples are clustered greedily in order (Kuhn et al. 2023): a
sample joins the first cluster whose first member is equivalent to it, else it opens a new cluster.
The uncertainty is the entropy of the cluster sizes, ``-Σ (n_c/K) ln(n_c/K)`` (the "discrete" semantic
entropy of Farquhar et al. 2024, which needs no token probabilities): 0 when every sample means the same,
ln K when no two do.

Equivalence is pluggable (``--uq-equivalence``):

* ``rougeL:0.5`` (default): lexical — ROUGE-L F (rouge-score, stemming) ≥ the threshold, symmetric; two
  empty answers are equivalent;
* ``nli:DIR``: a local NLI sequence classifier (a directory with an ``entailment`` label); two answers are
  equivalent when each entails the other (bidirectional entailment), with the question prepended to both
  when the set has one. Nothing is downloaded.

On QA sets the extracted answers are clustered (``qa.extract_answer``), on other sets the whole generation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, UsageError

DEFAULT_EQUIVALENCE = "rougeL:0.5"


class LexicalEquivalence:
    def __init__(self, threshold: float = 0.5):
        if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
            raise UsageError(f"rougeL equivalence threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._scorer = None

    @property
    def id(self) -> str:
        return f"rougeL:{self.threshold:g}"

    def equivalent(self, a: str, b: str, context: str = "") -> bool:
        if not a.strip() or not b.strip():
            return not a.strip() and not b.strip()
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return self._scorer.score(a, b)["rougeL"].fmeasure >= self.threshold

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "lexical", "rule": f"ROUGE-L F (stemmed) >= {self.threshold:g}"}


class NLIEquivalence:
    """Bidirectional entailment under a local NLI classifier."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise InputError("not a local model directory (no config.json) for the NLI equivalence", p)
        try:
            self.tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True).to(device).eval()
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InputError(
                f"cannot load the NLI model ({type(e).__name__}: {str(e).splitlines()[0][:200]})", p
            ) from None
        labels = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}
        ent = [i for i, v in labels.items() if "entail" in v and "not" not in v]
        if len(ent) != 1:
            raise InputError(f"the NLI model needs one 'entailment' label (labels: {sorted(labels.values())})", p)
        self.entail = ent[0]
        self.path = p
        self.device = device
        self._torch = torch
        self._memo: dict[tuple[str, str], bool] = {}

    @property
    def id(self) -> str:
        return f"nli:{self.path.name}"

    def _entails(self, premise: str, hypothesis: str) -> bool:
        key = (premise, hypothesis)
        if key not in self._memo:
            enc = self.tok(premise, hypothesis, return_tensors="pt", truncation=True).to(self.device)
            with self._torch.inference_mode():
                logits = self.model(**enc).logits[0]
            self._memo[key] = int(logits.argmax()) == self.entail
        return self._memo[key]

    def equivalent(self, a: str, b: str, context: str = "") -> bool:
        if a == b:
            return True
        pa, pb = (f"{context} {a}", f"{context} {b}") if context else (a, b)
        return self._entails(pa, pb) and self._entails(pb, pa)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "nli", "model": str(self.path), "rule": "bidirectional entailment"}


def parse_equivalence(spec: str | None, device: str = "cpu"):
    """``rougeL[:THRESHOLD]`` or ``nli:DIR``."""
    spec = spec or DEFAULT_EQUIVALENCE
    kind, _, arg = spec.partition(":")
    if kind.lower() == "rougel":
        try:
            return LexicalEquivalence(float(arg) if arg else 0.5)
        except ValueError:
            raise UsageError(f"--uq-equivalence {spec!r}: the threshold must be a number") from None
    if kind.lower() == "nli":
        if not arg:
            raise UsageError("--uq-equivalence nli:DIR needs the NLI model directory")
        return NLIEquivalence(arg, device=device)
    raise UsageError(f"--uq-equivalence {spec!r}: use rougeL[:THRESHOLD] or nli:DIR")


def cluster(answers: Sequence[str], equiv, context: str = "") -> list[int]:
    """Cluster id per answer: each joins the first cluster whose first member is equivalent."""
    heads: list[str] = []
    ids = []
    for a in answers:
        for c, h in enumerate(heads):
            if equiv.equivalent(h, a, context):
                ids.append(c)
                break
        else:
            heads.append(a)
            ids.append(len(heads) - 1)
    return ids


def cluster_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the cluster-size distribution."""
    n = len(ids)
    if n == 0:
        return float("nan")
    sizes = [ids.count(c) for c in sorted(set(ids))]
    return float(-sum((s / n) * math.log(s / n) for s in sizes))


def sampled_cost(n_items: int, n_variants: int, k: int) -> int:
    """Extra generations the sampled uncertainty needs (before the cache is consulted)."""
    return n_items * n_variants * k
