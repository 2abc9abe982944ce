"""BLEU with sacrebleu (default settings: 13a tokenisation, case-sensitive, 4-grams, one reference).

* **corpus BLEU** (``bleu_corpus``): sacrebleu's corpus BLEU of all generations of a set, as
  ``sacrebleu REF -i HYP`` computes it (no smoothing);
* **sentence BLEU** (``bleu``, per item, averaged): sacrebleu's sentence BLEU (exponential smoothing,
  effective n-gram order), as ``sacrebleu REF -i HYP --sentence-level`` computes it.

Corpus BLEU is not a mean of per-item numbers; each item keeps its sufficient statistics (n-gram matches
and totals, hypothesis and reference length) so that a bootstrap resample's corpus BLEU is recomputed from
the summed statistics without re-tokenising (:func:`corpus_from_stats`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

ORDER = 4  # sacrebleu's default max n-gram order


@lru_cache(maxsize=4)
def _bleu(effective_order: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=effective_order)


def signature() -> str:
    return str(_bleu().get_signature())


def item_stats(prediction: str, reference: str) -> list[int]:
    """[sys_len, ref_len, correct_1..4, total_1..4] of one segment."""
    s = _bleu().corpus_score([prediction], [[reference]])
    return [int(s.sys_len), int(s.ref_len)] + [int(c) for c in s.counts] + [int(t) for t in s.totals]


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0–100)."""
    return float(_bleu(effective_order=True).sentence_score(prediction, [reference]).score)


def corpus_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0–100) from summed per-item statistics (rows as :func:`item_stats`)."""
    from sacrebleu.metrics import BLEU

    s = np.asarray(stats, dtype=np.int64).sum(0)
    return float(BLEU.compute_bleu(s[2 : 2 + ORDER].tolist(), s[2 + ORDER :].tolist(), int(s[0]), int(s[1])).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    return float(_bleu().corpus_score(list(predictions), [list(references)]).score)
