"""QA utility kind: SQuAD v1.1 exact match / F1 against the official script's logic, answer extraction,
the loaders, and QA sets through evaluate, compare and the CLI."""

from __future__ import annotations

import collections
import json
import re
import string

import pytest

from safeprune.errors import InputError, UsageError
from safeprune.eval import compare, evaluate, load_prompts
from safeprune.eval.backends import FakeBackend
from safeprune.eval.qa import exact_match, extract_answer, normalize_answer, qa_scores, token_f1
from safeprune.prompts import QA_INSTRUCTION

# -- reference: the official SQuAD v1.1 evaluation script (evaluate-v1.1.py), its metric functions copied --


def ref_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def ref_exact_match_score(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


# hand-written cases: (prediction, gold answers)
CASES = [
    ("Paris", ["Paris"]),
    ("paris", ["Paris"]),
    ("The Eiffel Tower", ["Eiffel Tower"]),  # article
    ("an apple a day", ["apple day"]),
    ("Theatre", ["the atre"]),  # "the" inside a word is not an article
    ("A", ["a"]),  # only an article: both normalise to ""
    ("", ["something"]),
    ("", [""]),
    ("U.S.A.", ["USA"]),  # punctuation removed, not replaced
    ("rock-and-roll", ["rock and roll"]),
    ("Hello,   world!\n\t", ["hello world"]),  # whitespace collapsed
    ("  yes ", ["yes"]),
    ("yes, both were", ["yes"]),  # partial credit under SQuAD
    ("Chief of Protocol of the United States", ["Chief of Protocol"]),
    ("the the the", ["the"]),
    ("New York New York", ["New York"]),  # repeated tokens: multiset overlap
    ("Café Münster", ["cafe munster"]),  # no accent folding
    ("Café Münster", ["café MÜNSTER"]),  # Unicode lower-casing
    ("“Animorphs”", ["Animorphs"]),  # curly quotes are not string.punctuation
    ("Animorphs—series", ["Animorphs series"]),  # em dash stays
    ("1,000", ["1000"]),
    ("3.14", ["314"]),
    ("The answer is 42.", ["42"]),
    ("Ångström", ["ångström"]),
    ("東京", ["東京"]),
    ("l'Hôpital", ["lHôpital"]),
    ("two", ["2", "two", "Two."]),  # best over several gold answers
    ("Barack Obama", ["Obama", "President Barack Obama"]),
    ("the an a", ["x"]),
    ("A.B", ["a b"]),
]


@pytest.mark.parametrize("pred,golds", CASES)
def test_em_f1_equal_the_squad_v11_script(pred, golds):
    assert normalize_answer(pred) == ref_normalize_answer(pred)
    s = qa_scores(pred, golds)
    assert s["em"] == float(ref_metric_max_over_ground_truths(ref_exact_match_score, pred, golds))
    assert s["f1"] == pytest.approx(ref_metric_max_over_ground_truths(ref_f1_score, pred, golds), abs=0, rel=1e-15)
    for g in golds:
        assert exact_match(pred, g) == float(ref_exact_match_score(pred, g))
        assert token_f1(pred, g) == pytest.approx(ref_f1_score(pred, g), abs=0, rel=1e-15)


def test_some_known_values():
    assert qa_scores("The Eiffel Tower", "Eiffel Tower") == {"em": 1.0, "f1": 1.0}
    assert qa_scores("yes, both were", "yes")["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert qa_scores("Café", "cafe") == {"em": 0.0, "f1": 0.0}


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Paris", "Paris"),
        ("Paris.", "Paris"),
        ("  **Paris**  ", "Paris"),
        ('"Animorphs"', "Animorphs"),
        ("“Animorphs”.", "Animorphs"),
        ("Answer: Chief of Protocol", "Chief of Protocol"),
        ("Let me think.\nThe first one.\nFinal answer: 1923", "1923"),
        ("The answer is Kiss and Tell.", "Kiss and Tell"),
        ("Yes, they were both American.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("Nobody knows", "Nobody knows"),  # "no" only as a whole word followed by punctuation or the end
        ("Yesterday", "Yesterday"),
        ("Chief of Protocol\nShe served under several presidents.", "Chief of Protocol"),
        ("\n\n  Animorphs\n", "Animorphs"),
        ("A: `1923`", "1923"),
        ("", ""),
        ("Answer:", ""),  # a marker with nothing after it: no answer
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# -- loaders ---------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hotpotqa_and_generic_question_answer_files(tmp_path):
    hp = _jsonl(
        tmp_path / "hotpot_dev.jsonl",
        [{"orig_idx": i, "question": f"Who is {i}?", "answer": f"person {i}", "type": "bridge"} for i in range(3)],
    )
    ps = load_prompts(hp)
    assert (ps.format, ps.kind, ps.name) == ("hotpotqa", "qa", "hotpotqa")
    assert ps.items[1].prompt == QA_INSTRUCTION + "Who is 1?" and ps.items[1].reference == "person 1"
    assert ps.info["instruction"] == QA_INSTRUCTION
    assert load_prompts(hp, "utility").items[0].prompt == "Who is 0?"  # as a utility set: the bare question
    # any question/answer JSONL (a list of gold answers allowed), ids from 'id' or the row number
    gq = _jsonl(
        tmp_path / "trivia.jsonl", [{"question": "2+2?", "answer": ["4", "four"]}, {"question": "x?", "answer": "y"}]
    )
    g = load_prompts(gq)
    assert (g.format, g.kind, g.name) == ("qa", "qa", "trivia")
    assert [it.id for it in g.items] == ["0", "1"] and g.items[0].reference == ["4", "four"]
    # a CSV with other column names through the generic loader
    import csv

    with open(tmp_path / "mine.csv", "w", newline="") as f:
        csv.writer(f).writerows([["qid", "q", "a"], ["k1", "Capital of France?", "Paris"]])
    m = load_prompts(tmp_path / "mine.csv", "qa", column="q", id_column="qid", reference_column="a")
    assert m.kind == "qa" and m.items[0].id == "k1" and m.items[0].prompt == QA_INSTRUCTION + "Capital of France?"
    assert m.items[0].reference == "Paris"
    own = load_prompts(tmp_path / "mine.csv", "qa", column="q", reference_column="a", instruction="Q: ")
    assert own.items[0].prompt == "Q: Capital of France?"


def test_qa_file_as_harmless_probes_gives_bare_questions(tmp_path):
    from safeprune.prompts import probes_from_file

    hp = _jsonl(
        tmp_path / "hp.jsonl",
        [{"orig_idx": i, "question": f"Who is {i}?", "answer": "x", "type": "bridge"} for i in range(4)],
    )
    items, info = probes_from_file(hp, "harmless", None, 0)
    assert items == [f"Who is {i}?" for i in range(4)] and info["format"] == "hotpotqa"


def test_qa_loader_errors(tmp_path):
    with pytest.raises(UsageError, match="reference column"):
        load_prompts(_jsonl(tmp_path / "a.jsonl", [{"q": "x?", "a": "y"}]), "qa", column="q")
    with pytest.raises(InputError, match="no reference column 'zz'"):
        load_prompts(tmp_path / "a.jsonl", "qa", column="q", reference_column="zz")
    with pytest.raises(InputError, match="gold answer"):
        load_prompts(_jsonl(tmp_path / "b.jsonl", [{"question": "x?", "answer": ""}]))
    with pytest.raises(InputError, match="gold answer"):
        load_prompts(_jsonl(tmp_path / "c.jsonl", [{"question": "x?", "answer": []}]))
    with pytest.raises(UsageError, match="unknown prompt-set kind"):
        load_prompts(tmp_path / "a.jsonl", "quiz", column="q")


# -- evaluate / compare / CLI ----------------------------------------------------------------------

GOLD = {0: "Paris", 1: "Chief of Protocol", 2: "yes", 3: "1923", 4: "Animorphs", 5: "Ed Wood"}


def _qa_file(tmp_path):
    return _jsonl(
        tmp_path / "hotpot.jsonl",
        [{"orig_idx": i, "question": f"question {i}?", "answer": a, "type": "bridge"} for i, a in GOLD.items()],
    )


def _answers(good: set[int]):
    def f(prompt):
        i = int(prompt.rsplit(" ", 1)[-1].rstrip("?"))
        return f"The answer is {GOLD[i]}." if i in good else "I do not know"

    return f


def test_qa_through_evaluate_and_compare(tmp_path):
    ps = load_prompts(_qa_file(tmp_path))
    be = FakeBackend(adapters={"lora": "L"}, responses={None: _answers({0, 1, 2, 3, 4}), "lora": _answers({0, 1})})
    res = evaluate("fake", {"lora": "L"}, prompt_sets=[ps], include_base=True, backend=be, out_dir=tmp_path / "r")
    m = res.metrics
    assert m["base"]["hotpotqa"]["em"] == pytest.approx(500 / 6) and m["lora"]["hotpotqa"]["em"] == pytest.approx(
        200 / 6
    )
    assert m["base"]["hotpotqa"]["f1"] == pytest.approx(500 / 6)
    assert "rouge1" not in m["base"]["hotpotqa"] and m["base"]["hotpotqa"]["uncertainty"] == "nll"
    it = next(i for i in res.items if i["variant"] == "lora" and i["id"] == "0")
    assert it["answer"] == "Paris" and it["output"] == "The answer is Paris." and it["em"] == 1.0
    assert res.results["settings"]["qa_max_new_tokens"] == 32
    assert res.results["auarc"]["accuracy"]["qa"]["auarc"].startswith("exact match")
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "## Question answering" in md and "EM (SR) %" in md
    c = compare(tmp_path / "r", "base", "lora", n_boot=500)
    rows = {r["metric"]: r for r in c["sets"]["hotpotqa"]["metrics"]}
    assert set(rows) >= {"em", "f1", "auarc", "auarc_f1"}
    assert rows["em"]["delta"] == pytest.approx(-300 / 6)
    assert rows["em"]["ci_low"] <= rows["em"]["delta"] <= rows["em"]["ci_high"] <= 0
    assert rows["auarc"]["a"] == pytest.approx(m["base"]["hotpotqa"]["auarc"])


def test_cli_eval_qa(tmp_path):
    from typer.testing import CliRunner

    from safeprune.cli import app

    f = _qa_file(tmp_path)
    out = tmp_path / "res"
    args = ["-q", "eval", "--backend", "fake", "--base", "fake", "--qa", str(f), "--qa-max-new-tokens", "8", "-o"]
    r = CliRunner().invoke(app, args + [str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["sets"][0]["kind"] == "qa" and res["settings"]["per_kind"]["qa"]["max_new_tokens"] == 8
    assert res["metrics"]["base"]["hotpotqa"]["n"] == 6
    r = CliRunner().invoke(app, args[:-3] + ["--qa-max-new-tokens", "0", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "max new tokens" in r.output and "Traceback" not in r.output
