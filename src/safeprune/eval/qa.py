"""Question answering: answer extraction, exact match (SR) and token F1 with SQuAD v1.1 normalisation.

**Normalisation** (the official SQuAD v1.1 ``evaluate-v1.1.py``): lower-case; delete every character of
``string.punctuation`` (ASCII only: curly quotes, dashes and other Unicode punctuation stay); replace the
whole words ``a``, ``an``, ``the`` by a space; collapse whitespace. **EM** = the normalised prediction
equals the normalised gold answer; **F1** = harmonic mean of token precision and recall over the shared
multiset of normalised tokens (0 when nothing is shared). With several gold answers, the best over them.
(HotpotQA's own script differs in one point: a yes/no/noanswer prediction or gold that differs from the
other scores F1 = 0 instead of partial credit; safeprune uses the SQuAD rule for every QA set.)

**Answer extraction** (``extract_answer``), applied to the generation before scoring, in order:

1. if a line contains ``Answer:`` / ``Final answer:`` (any case), keep the text after the last one;
2. keep the first non-empty line;
3. drop a leading ``The answer is`` / ``Answer:`` / ``A:`` (any case);
4. a reply that starts with ``yes`` or ``no`` followed by punctuation or the end (``Yes, both are
   American.``) becomes ``yes`` / ``no``;
5. strip Markdown emphasis (``*``, ``_``, backticks), surrounding quotes and a trailing ``.``/``!``.

The prediction kept for scoring is stored per item as ``answer``, beside the raw ``output``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_MARKER = re.compile(r"(?:final\s+)?answer\s*:", re.IGNORECASE)
_LEAD = re.compile(r"^\s*(?:the\s+(?:final\s+)?answer\s+is\s*:?|answer\s*:|a\s*:)\s*", re.IGNORECASE)
_YESNO = re.compile(r"^(yes|no)(?:[\s]*[,.;:!]|\s*$)", re.IGNORECASE)
_QUOTES = "\"'“”‘’«»"


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    p = normalize_answer(prediction).split()
    g = normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def golds(reference: str | Sequence[str]) -> list[str]:
    """A reference as a list of gold answers (a JSON list in the data gives several)."""
    if isinstance(reference, str):
        return [reference]
    return [str(r) for r in reference]


def qa_scores(prediction: str, reference: str | Sequence[str]) -> dict[str, float]:
    """EM and F1 of one prediction, best over the gold answers."""
    gs = golds(reference)
    return {"em": max(exact_match(prediction, g) for g in gs), "f1": max(token_f1(prediction, g) for g in gs)}


def extract_answer(text: str) -> str:
    """The short answer in a generation (rules in the module docstring)."""
    t = text.strip()
    hits = list(_MARKER.finditer(t))
    if hits:
        after = t[hits[-1].end() :].strip()
        if after:
            t = after
    t = next((line.strip() for line in t.splitlines() if line.strip()), "")
    t = _LEAD.sub("", t).strip()
    m = _YESNO.match(t)
    if m:
        return m.group(1).lower()
    t = re.sub(r"[*_`]+", "", t).strip()
    t = t.strip(_QUOTES + " ").rstrip(".!").strip(_QUOTES + " ")
    return t
