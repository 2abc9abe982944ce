"""BLEU: corpus and sentence BLEU equal sacrebleu's own command line on a fixture; the per-item statistics
rebuild the corpus score (what compare's bootstrap resamples); BLEU appears in eval and compare."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from safeprune.eval import compare, evaluate, load_prompts
from safeprune.eval.backends import FakeBackend
from safeprune.eval.bleu import corpus_bleu, corpus_from_stats, item_stats, sentence_bleu

REFS = [
    "#Person1# asks #Person2# to help move the sofa, and #Person2# agrees.",
    "The cat sat on the mat.",
    "They talk about the weather in Paris; it's raining again.",
    "Mr. Smith's order, 3,000 units, ships on 12/05.",
    "Tom and Mary plan a trip to the beach next weekend.",
    "A short one.",
    "Café owners discuss the new menu — prices go up by 5%.",
]
HYPS = [
    "#Person1# asks #Person2# to move the sofa and #Person2# agrees.",
    "The cat is on the mat.",
    "They talk about Paris weather, it is raining.",
    "Mr. Smith orders 3,000 units shipping 12/05.",
    "",
    "Something else entirely.",
    "Café owners talk about the new menu — prices rise 5%.",
]


def _cli(tmp_path, *extra: str) -> list[float]:
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "-b", "-w", "6", *extra],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [float(x) for x in out.split()]


def test_corpus_bleu_equals_the_sacrebleu_cli(tmp_path):
    (cli,) = _cli(tmp_path)
    assert corpus_bleu(HYPS, REFS) == pytest.approx(cli, abs=5e-7)
    stats = np.array([item_stats(h, r) for h, r in zip(HYPS, REFS)])
    assert corpus_from_stats(stats) == pytest.approx(corpus_bleu(HYPS, REFS), abs=1e-9)
    assert 5 < cli < 95  # a fixture that is neither trivial nor hopeless


def test_sentence_bleu_equals_the_sacrebleu_cli(tmp_path):
    cli = _cli(tmp_path, "--sentence-level")
    ours = [sentence_bleu(h, r) for h, r in zip(HYPS, REFS)]
    assert len(cli) == len(REFS)
    assert ours == pytest.approx(cli, abs=5e-7)
    assert ours[4] == 0.0 and max(ours) < 100


def test_bleu_in_evaluate_and_compare(tmp_path):
    d = tmp_path / "test.jsonl"
    d.write_text(
        "".join(json.dumps({"fname": f"t{i}", "dialogue": f"d{i}", "summary": r}) + "\n" for i, r in enumerate(REFS))
    )
    ps = load_prompts(d)
    hyp = dict(zip((it.prompt for it in ps.items), HYPS))
    ref = dict(zip((it.prompt for it in ps.items), REFS))
    be = FakeBackend(adapters={"lora": "L"}, responses={None: hyp, "lora": ref})
    res = evaluate(
        "fake", {"lora": "L"}, prompt_sets=[ps], include_base=True, backend=be, out_dir=tmp_path / "r", meteor=False
    )
    m = res.metrics["base"][ps.name]
    # the fake backend joins words with single spaces: the corpus BLEU of exactly those outputs
    outs = [" ".join(h.split()) for h in HYPS]
    assert m["bleu_corpus"] == pytest.approx(corpus_bleu(outs, REFS), abs=1e-9)
    assert m["bleu"] == pytest.approx(np.mean([sentence_bleu(h, r) for h, r in zip(outs, REFS)]), abs=1e-9)
    assert res.metrics["lora"][ps.name]["bleu_corpus"] == pytest.approx(100.0)
    assert "sacrebleu" in res.results["bleu"]["implementation"] and "tok:13a" in res.results["bleu"]["signature"]
    assert "| BLEU |" in (tmp_path / "r" / "summary.md").read_text()
    c = compare(tmp_path / "r", "base", "lora", n_boot=300)
    rows = {r["metric"]: r for r in c["sets"][ps.name]["metrics"]}
    assert rows["bleu_corpus"]["a"] == pytest.approx(m["bleu_corpus"])
    assert rows["bleu_corpus"]["ci_low"] <= rows["bleu_corpus"]["delta"] <= rows["bleu_corpus"]["ci_high"]
    assert rows["bleu"]["a"] == pytest.approx(m["bleu"])
