"""Sampled uncertainty for AUARC: clustering and entropy, pluggable equivalence (lexical, local NLI),
determinism for a fixed seed (fake and tiny HF model), the cost announced before generation, compare."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from helpers import make_model, tiny_chat_tokenizer
from safeprune.errors import InputError, UsageError
from safeprune.eval import compare, evaluate, load_prompts
from safeprune.eval.backends import FakeBackend, GenSettings, HFBackend
from safeprune.eval.evaluate import EvalConfig, sampled_uncertainty_cost
from safeprune.eval.uncertainty import (
    LexicalEquivalence,
    NLIEquivalence,
    cluster,
    cluster_entropy,
    parse_equivalence,
)


def test_cluster_and_entropy():
    eq = LexicalEquivalence(0.5)
    ids = cluster(["Paris", "paris", "Paris, France", "London", "London, UK", "Rome"], eq)
    assert ids == [0, 0, 0, 1, 1, 2]
    assert cluster_entropy(ids) == pytest.approx(
        -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    )
    assert cluster_entropy([0, 0, 0, 0]) == 0.0
    assert cluster_entropy([0, 1, 2, 3]) == pytest.approx(math.log(4))
    assert cluster(["", "", "x"], eq) == [0, 0, 1]  # two empty answers agree; empty vs text does not
    # the threshold decides: ROUGE-L F of "Paris" vs "Paris France" is 2/3
    assert cluster(["Paris", "Paris France"], LexicalEquivalence(0.7)) == [0, 1]
    assert cluster(["Paris", "Paris France"], LexicalEquivalence(0.6)) == [0, 0]


def test_equivalence_specs():
    assert parse_equivalence(None).id == "rougeL:0.5"
    assert parse_equivalence("rougeL:0.8").threshold == 0.8
    for bad in ("rougeL:2", "rougeL:x", "bleu:1", "nli:"):
        with pytest.raises(UsageError):
            parse_equivalence(bad)
    with pytest.raises(InputError, match="no config.json"):
        parse_equivalence("nli:/nonexistent-dir-for-test")


def test_nli_equivalence_with_a_local_classifier(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    m = make_model(tmp_path / "m", "llama", layers=1)
    tiny_chat_tokenizer(m)
    cfg = LlamaConfig.from_pretrained(m)
    cfg.num_labels = 3
    cfg.id2label = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.pad_token_id = 2
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # entailment iff the head's third row has a positive product: about half the pairs
        clf.score.weight[:2].zero_()
    clf.save_pretrained(tmp_path / "nli")
    tiny_chat_tokenizer(tmp_path / "nli")
    eq = parse_equivalence(f"nli:{tmp_path / 'nli'}")
    assert isinstance(eq, NLIEquivalence) and eq.id == "nli:nli" and eq.entail == 2

    def entails(p, h):  # the classifier run directly
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "nli")
        with torch.no_grad():
            return int(clf.eval()(**tok(p, h, return_tensors="pt")).logits[0].argmax()) == 2

    pairs = [(f"w{i}", f"w{j} w{i + j}") for i in range(1, 6) for j in range(6, 9)]
    wants = []
    for a, b in pairs:
        want = entails(f"w0 {a}", f"w0 {b}") and entails(f"w0 {b}", f"w0 {a}")  # question prepended, both ways
        assert eq.equivalent(a, b, context="w0") == want
        wants.append(want)
    one_way = [entails(f"w0 {a}", f"w0 {b}") != entails(f"w0 {b}", f"w0 {a}") for a, b in pairs]
    assert any(wants) and not all(wants) and any(one_way)  # the cases discriminate
    assert eq.equivalent("w5", "w5") is True
    # labels without an entailment class are refused
    cfg.id2label = {0: "safe", 1: "unsafe", 2: "other"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "notnli")
    tiny_chat_tokenizer(tmp_path / "notnli")
    with pytest.raises(InputError, match="entailment"):
        NLIEquivalence(tmp_path / "notnli")


# -- through evaluate ------------------------------------------------------------------------------

ANSWERS = ["Paris", "paris", "Lyon", "Marseille", "Paris, France"]


def _sampler(adapter, prompt, seed):
    """A seeded 'sampler': the answer is a deterministic function of (adapter, prompt, seed)."""
    h = int(hashlib.sha256(f"{adapter}|{prompt}|{seed}".encode()).hexdigest()[:8], 16)
    spread = 1 if prompt.endswith("0?") else 5  # question 0: always the same meaning
    return ANSWERS[h % spread]


def _qa(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(
        "".join(json.dumps({"id": i, "question": f"capital {i}?", "answer": "Paris"}) + "\n" for i in range(8))
    )
    return load_prompts(f)


def _run(tmp_path, name, seed=0, k=4):
    ps = _qa(tmp_path)
    be = FakeBackend(
        adapters={"lora": "L"}, responses={None: lambda p: "Paris", "lora": lambda p: "Lyon"}, sampler=_sampler
    )
    cfg = EvalConfig(uncertainty="sampled", uq_samples=k, seed=seed)
    res = evaluate(
        "fake", {"lora": "L"}, prompt_sets=[ps], include_base=True, backend=be, config=cfg, out_dir=tmp_path / name
    )
    return res, be


def test_sampled_uncertainty_is_deterministic_for_a_fixed_seed(tmp_path):
    r1, be = _run(tmp_path, "a")
    r2, _ = _run(tmp_path, "b")
    r3, _ = _run(tmp_path, "c", seed=7)
    key = lambda r: [(i["variant"], i["id"], i["uq_samples"], i["semantic_entropy"]) for i in r.items]  # noqa: E731
    assert key(r1) == key(r2)
    assert key(r1) != key(r3)
    # 1 greedy + 4 sampled passes per variant: K extra generations per item
    assert sum(n for _, n in be.calls) == 2 * 8 * (1 + 4)
    it = next(i for i in r1.items if i["variant"] == "base" and i["id"] == "0")
    assert it["semantic_entropy"] == 0.0 and it["uq_clusters"] == [0, 0, 0, 0]
    assert all(len(i["uq_samples"]) == 4 for i in r1.items)
    m = r1.metrics["base"]["qa"]
    assert m["uncertainty"] == "sampled" and m["extra_generations"] == 32 and m["samples_generated_now"] == 32
    assert r1.results["auarc"]["field"] == "semantic_entropy"
    assert r1.results["auarc"]["sampling"]["equivalence"]["id"] == "rougeL:0.5"
    assert "entropy over clusters" in (tmp_path / "a" / "summary.md").read_text()
    # a rerun with the same seed generates nothing new (the samples are cached under their seeds)
    ps = _qa(tmp_path)
    be2 = FakeBackend(adapters={"lora": "L"}, sampler=_sampler)
    evaluate(
        "fake",
        {"lora": "L"},
        prompt_sets=[ps],
        include_base=True,
        backend=be2,
        config=EvalConfig(uncertainty="sampled", uq_samples=4),
        cache=tmp_path / "a" / "cache" / "generations.jsonl",
    )
    assert be2.calls == []
    # compare recomputes AUARC with the sampled uncertainty
    c = compare(tmp_path / "a", "base", "lora", n_boot=200)
    assert c["uncertainty"] == "sampled"
    rows = {r["metric"]: r for r in c["sets"]["qa"]["metrics"]}
    assert rows["auarc"]["a"] == pytest.approx(m["auarc"])


def test_nll_stays_the_default(tmp_path):
    ps = _qa(tmp_path)
    be = FakeBackend(sampler=_sampler)
    res = evaluate("fake", {}, prompt_sets=[ps], backend=be)
    assert res.results["auarc"]["uncertainty"] == "nll" and "semantic_entropy" not in res.items[0]
    assert sum(n for _, n in be.calls) == 8  # no sampling
    assert sampled_uncertainty_cost([ps], 1, EvalConfig()) is None


def test_config_checks():
    with pytest.raises(UsageError, match="uncertainty"):
        EvalConfig(uncertainty="semantic")
    with pytest.raises(UsageError, match="at least 2"):
        EvalConfig(uncertainty="sampled", uq_samples=1)
    with pytest.raises(UsageError, match="temperature"):
        EvalConfig(uq_temperature=0.0)


def test_cli_announces_the_cost_before_generating(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import safeprune.io.progress as progress
    from safeprune.cli import app

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # the progress lines, written at every update

    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"id": i, "question": f"q{i}?", "answer": "a"}) + "\n" for i in range(5)))
    args = [
        "eval",
        "--backend",
        "fake",
        "--base",
        "fake",
        "--adapter",
        "lora=L",
        "--no-adapter-baseline",
        "--qa",
        str(f),
    ]
    r = CliRunner().invoke(app, args + ["--uncertainty", "sampled", "--uq-samples", "3", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "sampled uncertainty" in x)
    assert "3 samples × 5 items × 2 variants = 30 extra generations" in line
    assert r.output.index("sampled uncertainty") < r.output.index("base · qa")  # before any progress line
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["auarc"]["sampling"]["samples"] == 3
    for bad, msg in (
        (["--uncertainty", "entropy"], "uncertainty must be one of"),
        (["--uncertainty", "sampled", "--uq-equivalence", "cosine"], "rougeL"),
        (["--uncertainty", "sampled", "--uq-samples", "1"], "at least 2"),
    ):
        r = CliRunner().invoke(app, args + bad + ["-o", str(tmp_path / "bad")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_hf_sampling_is_deterministic_for_a_fixed_seed(tmp_path):
    """The real backend: the same seed gives the same samples; the K seeds give different ones."""
    m = make_model(tmp_path / "base", "llama", layers=1)
    tiny_chat_tokenizer(m)
    be = HFBackend(str(m), threads=1)
    prompts = ["w1 w2 w3", "w4 w5"]
    cfg = EvalConfig(uncertainty="sampled", uq_samples=3, seed=11, qa_max_new_tokens=6)
    runs = [[g.text for g in be.generate(prompts, None, cfg.sample_settings("qa", k))] for k in range(3)]
    again = [[g.text for g in be.generate(prompts, None, cfg.sample_settings("qa", k))] for k in range(3)]
    assert runs == again
    assert len({tuple(r) for r in runs}) > 1
    s = cfg.sample_settings("qa", 2)
    assert isinstance(s, GenSettings) and s.do_sample and s.seed == 13 and s.max_new_tokens == 6
