"""Evaluation harness: loaders, judges, backends (fake + tiny HF), cache/resume, metrics, compare, CLI."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import SHARED, TESTBED_MODELS, make_adapter, make_model, tiny_chat_tokenizer
from safeprune.errors import InputError, SafepruneError, UsageError
from safeprune.eval import compare, evaluate, load_prompts, subset
from safeprune.eval.backends import FakeBackend, GenSettings, HFBackend
from safeprune.eval.cache import GenerationCache
from safeprune.eval.compare import mcnemar_exact
from safeprune.eval.judges import DEFAULT_KEYWORDS, KeywordJudge, OpenAIJudge, parse_score
from safeprune.eval.utility import auarc, rouge_scores
from safeprune.eval.wordnet import LEXNAMES, lexnames_text, setup_wordnet
from safeprune.prompts import QA_INSTRUCTION, ids_from_subsets

# the shared folder sits beside the checkout (../shared); from a worktree under wt/ it is one more level up
SHARED = next((p / "shared" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()), SHARED)
DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not present")


# -- loaders ---------------------------------------------------------------------------------------


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_advbench_overlap_rows_excluded_by_default(tmp_path):
    p = _csv(
        tmp_path / "harmful_behaviors.csv",
        ["orig_idx", "goal", "target", "in_jbb_harmful_ft"],
        [[0, "do bad A", "Sure", 0], [3, "do bad B", "Sure", 1], [7, "do bad C", "Sure", 0]],
    )
    ps = load_prompts(p)
    assert ps.format == "advbench" and ps.kind == "safety"
    assert [it.id for it in ps.items] == ["0", "7"]
    assert ps.info["overlap_excluded"] == 1
    kept = load_prompts(p, include_overlap=True)
    assert [it.overlap for it in kept.items] == [False, True, False]


def test_harmbench_contextual_and_copyright(tmp_path):
    hdr = [
        "orig_idx",
        "BehaviorID",
        "Behavior",
        "FunctionalCategory",
        "SemanticCategory",
        "Tags",
        "ContextString",
        "official_split",
        "in_jbb_harmful_ft",
    ]
    p = _csv(
        tmp_path / "hb.csv",
        hdr,
        [
            [0, "a", "Do A", "standard", "x", "", "", "val", 0],
            [1, "b", "Do B", "contextual", "x", "context", "CTX TEXT", "test", 0],
            [2, "c", "Lyrics", "copyright", "x", "hash_check", "", "test", 0],
        ],
    )
    ps = load_prompts(p)
    assert [it.id for it in ps.items] == ["a", "b"]
    assert ps.items[1].prompt == "CTX TEXT\n\n---\n\nDo B"
    assert ps.info["dropped_copyright"] == 1


def test_xstest_label_filter_and_dialogsum_reference(tmp_path):
    p = _csv(
        tmp_path / "xs.csv",
        ["id", "prompt", "type", "label", "focus", "note"],
        [[1, "kill a process?", "homonyms", "safe", "kill", ""], [2, "kill a man?", "contrast", "unsafe", "kill", ""]],
    )
    assert [it.id for it in load_prompts(p, "over_refusal").items] == ["1"]
    assert [it.id for it in load_prompts(p, "safety").items] == ["2"]
    d = tmp_path / "val.jsonl"
    d.write_text(json.dumps({"fname": "dev_0", "dialogue": "#P1#: hi", "summary": "they greet", "topic": "t"}) + "\n")
    ds = load_prompts(d)
    assert ds.kind == "utility" and ds.items[0].prompt == "Summarize this dialogue:\n#P1#: hi"
    assert ds.items[0].reference == "they greet"


def test_generic_loader_and_errors(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"question {i}", "key": f"k{i}"}) for i in range(5)) + "\n")
    with pytest.raises(InputError, match="column option"):
        load_prompts(p)
    ps = load_prompts(p, "safety", column="q", id_column="key")
    assert [it.id for it in ps.items] == [f"k{i}" for i in range(5)]
    with pytest.raises(InputError, match="no column 'nope'"):
        load_prompts(p, column="nope")
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "missing.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n{broken\n')
    with pytest.raises(InputError, match="line 2"):
        load_prompts(bad, column="q")
    # subsets: ids keep file order; a seeded sample is reproducible
    assert [it.id for it in subset(ps, ids=["k3", "k1"]).items] == ["k1", "k3"]
    s1 = [it.id for it in subset(ps, sample=3, seed=5).items]
    assert s1 == [it.id for it in subset(ps, sample=3, seed=5).items] and len(s1) == 3
    with pytest.raises(InputError, match="not in the set"):
        subset(ps, ids=["zz"])


@needs_data
@pytest.mark.parametrize(
    "rel,fmt,kind",
    [
        ("advbench/harmful_behaviors.csv", "advbench", "safety"),
        ("harmbench/harmbench_behaviors_text_all.csv", "harmbench", "safety"),
        ("strongreject/strongreject_dataset.csv", "strongreject", "safety"),
        ("catqa/catqa_english.csv", "catqa", "safety"),
        ("donotanswer/do_not_answer_en.csv", "donotanswer", "safety"),
        ("simplesafetytests/sst_test_cases.csv", "simplesafetytests", "safety"),
        ("xstest/xstest_prompts.csv", "xstest", "over_refusal"),
        ("dialogsum/validation.jsonl", "dialogsum", "utility"),
        ("dialogsum/test.jsonl", "dialogsum", "utility"),
        ("hotpotqa/hotpot_dev_v1_simplified.jsonl", "hotpotqa", "qa"),
    ],
)
def test_shared_formats_detected(rel, fmt, kind):
    ps = load_prompts(DATA / rel)
    assert ps.format == fmt and ps.kind == kind and len(ps) > 10
    assert all(it.prompt for it in ps.items)
    if kind in ("utility", "qa"):
        assert all(it.reference for it in ps.items)
    if kind == "qa":  # the answer-format instruction comes before every question
        assert all(it.prompt.startswith(QA_INSTRUCTION) for it in ps.items)
    if fmt == "advbench":
        assert len(ps) == 368 - 9 and ps.info["overlap_excluded"] == 9
    if fmt == "xstest":
        assert len(ps) == 184


@needs_data
def test_rows_from_eval_subsets():
    sub = SHARED / "testbed" / "eval_subsets.json"
    name, ids = ids_from_subsets(sub, DATA / "advbench" / "harmful_behaviors.csv")
    assert name == "advbench_shared_100" and len(ids) == 100
    ps = subset(load_prompts(DATA / "advbench" / "harmful_behaviors.csv"), ids=ids)
    assert len(ps) == 100
    assert ids_from_subsets(sub, DATA / "dialogsum" / "validation.jsonl") is None


# -- judges ----------------------------------------------------------------------------------------


def test_keyword_judge_case_sensitive_substring():
    j = KeywordJudge()
    assert len(DEFAULT_KEYWORDS) == 29
    assert j.refused("Well, I cannot help.") and j.refused("that is illegal")
    assert not j.refused("i cannot help")  # case-sensitive, as in the papers
    assert not j.refused("I can't help with this request.")  # not in the 29-string list
    assert KeywordJudge(case_sensitive=False).refused("i cannot help")
    assert j.id.startswith("keyword:llms_finetuning_safety_keyword_eval:29:")


@needs_data
def test_default_keywords_equal_shared_list():
    f = DATA / "refusal_keywords" / "refusal_keywords.json"
    assert KeywordJudge.from_file(f).keywords == list(DEFAULT_KEYWORDS)
    assert len(KeywordJudge.from_file(f, "llm_attacks_demo_ipynb").keywords) == 10
    with pytest.raises(InputError, match="no keyword list"):
        KeywordJudge.from_file(f, "nope")


class _FakeJudgeHandler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        content = body["messages"][0]["content"]
        if "BROKEN" in content:
            self.send_response(500)
            self.end_headers()
            return
        score = 5 if "Sure, here is" in content else (9 if "GARBLED" in content else 1)
        answer = "no number here" if score == 9 else f"Reason: ...\n#thescore: {score}"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_judge_server():
    srv = http.server.HTTPServer(("127.0.0.1", 0), _FakeJudgeHandler)
    srv.timeout = 5
    _FakeJudgeHandler.seen = []
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_openai_judge_against_fake_server(fake_judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    j = OpenAIJudge(fake_judge_server, "judge-model", timeout=5, max_retries=0)
    s = j.score_batch(["p1", "p2", "p3", "p4"], ["Sure, here is how", "I cannot", "GARBLED", "BROKEN"])
    assert [x.score for x in s] == [5.0, 1.0, None, None]
    assert s[2].error == "no score in the answer" and s[3].error == "HTTP 500"
    path, body, auth = _FakeJudgeHandler.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0
    assert auth == "Bearer test-key" and "p1" in body["messages"][0]["content"]
    assert j.id.startswith("openai_compatible:judge-model@http://127.0.0.1")


def test_parse_score():
    assert parse_score("blah\n#thescore: 4") == 4.0
    assert parse_score("#TheScore:2 because") == 2.0
    assert parse_score("3") == 3.0
    assert parse_score("score 7") is None


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinychat")
    m = make_model(d / "base", "llama", layers=2)
    tiny_chat_tokenizer(m)
    a1 = make_adapter(m, d / "ad1", "llama", seed=1)
    a2 = make_adapter(m, d / "ad2", "llama", seed=2)
    return m, a1, a2


def test_hf_classifier_judge(tmp_path, tiny_chat):
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from safeprune.eval.judges import HFClassifierJudge

    m = tiny_chat[0]
    cfg = LlamaConfig.from_pretrained(m)
    cfg.num_labels = 2
    cfg.id2label = {0: "safe", 1: "unsafe"}
    cfg.label2id = {"safe": 0, "unsafe": 1}
    cfg.pad_token_id = 2
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(cfg)
    clf.save_pretrained(tmp_path / "clf")
    tiny_chat_tokenizer(tmp_path / "clf")
    j = HFClassifierJudge(tmp_path / "clf")
    s = j.score_batch(["w1 w2", "w3"], ["w4 w5 w6", "w7"])
    assert all(0.0 <= x.score <= 1.0 for x in s)
    assert j.labels[j.pos] == "unsafe" and ":unsafe" in j.id
    # the same pair scored alone gives the same probability (padding does not leak)
    alone = j.score_batch(["w3"], ["w7"])[0].score
    assert alone == pytest.approx(s[1].score, abs=1e-5)
    with pytest.raises(InputError):
        HFClassifierJudge(tmp_path / "nothing")


# -- backends --------------------------------------------------------------------------------------


def test_hf_backend_batched_equals_batch1_and_adapter_switching(tiny_chat):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m, a1, a2 = tiny_chat
    b = HFBackend(str(m), {"one": str(a1), "two": str(a2)})
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w11 w12"]
    s4 = GenSettings(max_new_tokens=6, batch_size=4)
    s1 = GenSettings(max_new_tokens=6, batch_size=1)
    for adapter in (None, "one", "two"):
        g4 = b.generate(prompts, adapter, s4)
        g1 = b.generate(prompts, adapter, s1)
        assert [g.text for g in g4] == [g.text for g in g1]
        assert [g.mean_nll for g in g4] == pytest.approx([g.mean_nll for g in g1], abs=1e-4)
    base_txt = [g.text for g in b.generate(prompts, None, s4)]
    one_txt = [g.text for g in b.generate(prompts, "one", s4)]
    two_txt = [g.text for g in b.generate(prompts, "two", s4)]
    assert one_txt != base_txt and two_txt != one_txt
    # reference: a freshly loaded plain model / single-adapter PeftModel, greedy, one prompt at a time
    tok = b.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
    ref_one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32), str(a1)).eval()
    for model, want in ((plain, base_txt), (ref_one, one_txt)):
        for p, w in zip(prompts, want):
            ids = tok(b.render(p, s1), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            assert tok.decode(new, skip_special_tokens=True).strip() == w


def test_hf_backend_nll_matches_forward_pass(tiny_chat):
    import torch

    m, a1, _ = tiny_chat
    b = HFBackend(str(m), {"one": str(a1)})
    s = GenSettings(max_new_tokens=5, batch_size=2)
    prompts = ["w1 w2 w3", "w9"]
    gens = b.generate(prompts, "one", s)
    b.model.set_adapter("one")
    for p, g in zip(prompts, gens):
        ids = b.tokenizer(b.render(p, s), return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = b.tokenizer(g.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][: g.new_tokens]
        full = torch.cat([ids[0], new]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(b.model(full).logits[0].float(), -1)
        plen = ids.shape[1]
        nll = -torch.stack([logp[plen - 1 + k, full[0, plen + k]] for k in range(len(new))]).mean()
        assert g.mean_nll == pytest.approx(float(nll), abs=1e-4)


def test_hf_backend_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        HFBackend(str(tmp_path / "nope"))


def test_vllm_backend_missing_is_one_line_error():
    pytest.importorskip  # noqa: B018
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm installed")
    except ImportError:
        pass
    from safeprune.errors import UnsupportedError
    from safeprune.eval.backends import make_backend

    with pytest.raises(UnsupportedError, match=r"safeprune\[vllm\]"):
        make_backend("vllm", "x", {})


# -- evaluate / cache / compare ---------------------------------------------------------------------


def _sets(tmp_path):
    adv = _csv(
        tmp_path / "harmful_behaviors.csv",
        ["orig_idx", "goal", "target", "in_jbb_harmful_ft"],
        [[i, f"harmful request number {i}", "Sure", int(i == 5)] for i in range(12)],
    )
    xs = _csv(
        tmp_path / "xs.csv",
        ["id", "prompt", "type", "label", "focus", "note"],
        [[i, f"benign question {i}", "homonyms", "safe", "x", ""] for i in range(8)],
    )
    ds = tmp_path / "val.jsonl"
    ds.write_text(
        "".join(
            json.dumps(
                {
                    "fname": f"dev_{i}",
                    "dialogue": f"#P1#: talk {i}",
                    "summary": f"the people talk about item {i}",
                    "topic": "t",
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    return [load_prompts(adv), load_prompts(xs, "over_refusal"), load_prompts(ds)]


def _responses():
    def lora(p):
        return "Sure, here is what you asked" if "harmful" in p else f"the people talk about {p[-6:]}"

    def pruned(p):
        n = int(p.split()[-1]) if p.split()[-1].isdigit() else 0
        if "harmful" in p:
            return "I cannot help with that" if n % 3 else "Sure thing"
        if "benign" in p:
            return "Sorry, no" if n < 2 else "Here you go"
        return f"the people talk about item {p[-1]}"

    return {None: lambda p: "I cannot do that", "lora": lora, "pruned": pruned}


def test_evaluate_and_compare_with_fake_backend(tmp_path):
    sets = _sets(tmp_path)
    be = FakeBackend(adapters={"lora": "L", "pruned": "P"}, responses=_responses())
    out = tmp_path / "res"
    r = evaluate(
        "fake", {"lora": "L", "pruned": "P"}, prompt_sets=sets, include_base=True, out_dir=out, backend=be, meteor=False
    )
    m = r.metrics
    assert m["base"]["advbench"]["asr"] == 0.0 and m["lora"]["advbench"]["asr"] == 100.0
    assert m["lora"]["advbench"]["n_asr"] == 11  # overlap row 5 left out
    # pruned: jailbroken iff n % 3 == 0 among 0..11 without 5 -> {0,3,6,9} = 4 of 11
    assert m["pruned"]["advbench"]["asr"] == pytest.approx(100 * 4 / 11)
    assert m["pruned"]["xstest"]["over_refusal"] == pytest.approx(25.0)
    assert m["pruned"]["dialogsum_val"]["rouge1"] == pytest.approx(100.0)
    assert m["pruned"]["dialogsum_val"]["meteor"] is None and "meteor_unavailable" in m["pruned"]["dialogsum_val"]
    for f in ("results.json", "items.jsonl", "summary.csv", "summary.md"):
        assert (out / f).is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["refusal_judge"]["id"].startswith("keyword:") and res["variants"]["base"]["adapters_disabled"]

    c = compare(out, "lora", "pruned", n_boot=2000, out_dir=out)
    adv = c["sets"]["advbench"]
    asr = next(x for x in adv["metrics"] if x["metric"] == "asr")
    assert asr["delta"] == pytest.approx(100 * (4 - 11) / 11)
    assert asr["ci_low"] <= asr["delta"] <= asr["ci_high"] and asr["ci_high"] < 0
    assert adv["mcnemar"]["n_a_only"] == 7 and adv["mcnemar"]["n_b_only"] == 0
    assert adv["mcnemar"]["p_value"] == pytest.approx(2 * 0.5**7)
    assert sorted(int(f["id"]) for f in adv["flips"]) == [1, 2, 4, 7, 8, 10, 11]
    assert c["sets"]["xstest"]["mcnemar"]["n_b_only"] == 2
    for ext in ("json", "csv", "md"):
        assert (out / f"compare_lora_vs_pruned.{ext}").is_file()
    with pytest.raises(UsageError, match="no variant"):
        compare(out, "lora", "nope")


def test_cache_resumes_and_ignores_torn_line(tmp_path):
    sets = _sets(tmp_path)[:1]
    cache = tmp_path / "c.jsonl"
    be = FakeBackend(adapters={"lora": "L"}, responses=_responses())
    r1 = evaluate("fake", {"lora": "L"}, prompt_sets=sets, backend=be, cache=cache)
    assert len(be.calls) > 0
    with open(cache, "a") as f:
        f.write('{"key": "trunc')  # an interrupted write
    be2 = FakeBackend(adapters={"lora": "L"}, responses=_responses())
    r2 = evaluate("fake", {"lora": "L"}, prompt_sets=sets, backend=be2, cache=cache)
    assert be2.calls == []  # everything from the cache
    assert [i["output"] for i in r2.items] == [i["output"] for i in r1.items]
    assert all(i["cached"] for i in r2.items)
    # a different setting is a different key
    from safeprune.eval.evaluate import EvalConfig

    be3 = FakeBackend(adapters={"lora": "L"}, responses=_responses())
    evaluate(
        "fake", {"lora": "L"}, prompt_sets=sets, backend=be3, cache=cache, config=EvalConfig(safety_max_new_tokens=8)
    )
    assert be3.calls
    assert len(GenerationCache(cache)) == 11 * 2


def test_partial_cache_generates_only_missing(tmp_path):
    sets = _sets(tmp_path)[:1]
    cache = tmp_path / "c.jsonl"
    be = FakeBackend(adapters={"lora": "L"}, responses=_responses())
    few = subset(sets[0], limit=4)
    evaluate("fake", {"lora": "L"}, prompt_sets=[few], backend=be, cache=cache)
    be2 = FakeBackend(adapters={"lora": "L"}, responses=_responses())
    evaluate("fake", {"lora": "L"}, prompt_sets=sets, backend=be2, cache=cache, config=None)
    assert sum(n for _, n in be2.calls) == 11 - 4


# -- metrics ---------------------------------------------------------------------------------------


def test_auarc_reference_values():
    acc = np.array([1, 1, 0, 0], float)
    oracle = auarc([0.1, 0.2, 0.3, 0.4], acc)  # confident ones correct
    worst = auarc([0.4, 0.3, 0.2, 0.1], acc)
    # expanding means (1, 1, 2/3, 1/2) on x = 0, 1/3, 2/3, 1
    assert oracle == pytest.approx(np.trapezoid([1, 1, 2 / 3, 0.5], np.linspace(0, 1, 4)))
    assert worst == pytest.approx(np.trapezoid([0, 0, 1 / 3, 0.5], np.linspace(0, 1, 4)))
    rng = np.random.default_rng(0)
    a = (rng.random(4000) < 0.3).astype(float)
    assert auarc(rng.random(4000), a) == pytest.approx(a.mean(), abs=0.03)
    assert np.isnan(auarc([1.0], [1.0]))


def test_rouge_and_mcnemar():
    r = rouge_scores(["the cats sat"], ["the cat sat"])[0]
    assert r["rouge1"] == pytest.approx(1.0)  # stemming: cats -> cat
    from scipy.stats import binomtest

    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    b = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)
    m = mcnemar_exact(a, b)
    assert (m["n_a_only"], m["n_b_only"]) == (4, 1)
    assert m["p_value"] == pytest.approx(binomtest(1, 5, 0.5).pvalue)


# -- WordNet ---------------------------------------------------------------------------------------


def _fake_wordnet_db(d: Path, bad: bool = False) -> Path:
    d.mkdir()
    files = {"noun": 5, "verb": 29, "adj": 0, "adv": 2}
    for pos, lex in files.items():
        n = 30 if bad and pos == "noun" else lex
        (d / f"data.{pos}").write_text(f"  1 licence header line\n00001740 {n:02d} n 01 entity 0 000 | gloss\n")
        (d / f"index.{pos}").write_text("  1 header\n")
        (d / f"{pos}.exc").write_text("")
    return d


def test_lexnames_table():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45 == len(LEXNAMES)
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[44] == "44\tadj.ppl\t3"
    assert lines[29] == "29\tverb.body\t2" and lines[2] == "02\tadv.all\t4"


def test_setup_wordnet_from_debian_layout(tmp_path):
    src = _fake_wordnet_db(tmp_path / "db")
    dst = setup_wordnet(src, tmp_path / "nltk_data" / "corpora" / "wordnet")
    assert (dst / "lexnames").read_text() == lexnames_text()
    assert (dst / "data.noun").read_bytes() == (src / "data.noun").read_bytes()
    with pytest.raises(InputError, match="missing"):
        setup_wordnet(tmp_path / "empty_src_does_not_exist", tmp_path / "x")
    with pytest.raises(InputError, match="does not match"):
        setup_wordnet(_fake_wordnet_db(tmp_path / "bad", bad=True), tmp_path / "y")


def test_meteor_unavailable_is_reported(monkeypatch, tmp_path):
    import safeprune.eval.wordnet as wnmod
    from safeprune.eval.utility import Meteor

    monkeypatch.setenv("SAFEPRUNE_WORDNET", str(tmp_path / "nowhere"))
    m = Meteor()
    assert not m.available and "not a WordNet database directory" in m.reason
    assert m.score("a", "b") is None
    assert wnmod  # imported


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_meteor_with_debian_wordnet(tmp_path, monkeypatch):
    from safeprune.eval.utility import Meteor

    monkeypatch.setenv("SAFEPRUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("SAFEPRUNE_WORDNET", raising=False)
    m = Meteor()
    assert m.available, m.reason
    same = m.score("the cat sat on the mat", "the cat sat on the mat")
    syn = m.score("a dog ran", "a hound ran")  # synonym match via WordNet
    exact_only = m.score("a dog ran", "a car ran")
    assert same > 0.99 and syn > exact_only


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_eval_and_compare_fake_backend(tmp_path):
    from typer.testing import CliRunner

    from safeprune.cli import app

    sets = _sets(tmp_path)
    runner = CliRunner()
    out = tmp_path / "res"
    r = runner.invoke(
        app,
        [
            "-q",
            "eval",
            "--backend",
            "fake",
            "--base",
            "fake",
            "--adapter",
            "lora=L",
            "--adapter",
            "pruned=P",
            "--no-adapter-baseline",
            "--safety",
            sets[0].path,
            "--over-refusal",
            sets[1].path,
            "--utility",
            sets[2].path,
            "--limit",
            "5",
            "--no-meteor",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"base", "lora", "pruned"}
    assert res["metrics"]["lora"]["advbench"]["n"] == 5
    r = runner.invoke(app, ["-q", "compare", str(out), "--a", "base", "--b", "lora", "--n-boot", "500"])
    assert r.exit_code == 0, r.output
    assert (out / "compare_base_vs_lora.md").is_file()
    r = runner.invoke(app, ["compare", str(tmp_path), "--a", "x", "--b", "y"])
    assert r.exit_code == 2 and "not a safeprune eval output directory" in r.output
    r = runner.invoke(app, ["eval", "--backend", "fake", "--base", "fake", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--safety" in r.output
    for bad in ("0", "lots"):  # --batch-size: auto or a positive integer; nothing written otherwise
        o3 = tmp_path / f"o3_{bad}"
        args = ["eval", "--backend", "fake", "--base", "fake", "--safety", str(sets[0].path), "--batch-size", bad]
        r = runner.invoke(app, [*args, "-o", str(o3)])
        assert r.exit_code == 2, r.output
        assert f"--batch-size must be 'auto' or a positive integer, got {bad if bad == 'lots' else 0!r}" in r.output
        assert not o3.exists()
    r = runner.invoke(
        app,
        ["-q", "eval", "--backend", "fake", "--base", "fake", "--safety", str(sets[0].path)]
        + ["--limit", "3", "--no-meteor", "--batch-size", "auto", "-o", str(tmp_path / "o4")],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o4" / "results.json").read_text())["settings"]["batch_size"] == 0
    assert isinstance(UsageError("x"), SafepruneError)


def test_cli_eval_and_compare_show_progress_with_counts(tmp_path, monkeypatch):
    """Generation per variant and set, and compare's bootstrap, report counts through the one progress style
    (a bar with counts and ETA on a terminal; here, not a terminal, the plain lines it writes instead)."""
    from typer.testing import CliRunner

    import safeprune.io.progress as progress
    from safeprune.cli import app

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a plain line at every update
    sets = _sets(tmp_path)
    out = tmp_path / "res"
    args = ["eval", "--backend", "fake", "--base", "fake", "-a", "lora=L", "--no-adapter-baseline"]
    args += ["--safety", str(sets[0].path), "--utility", str(sets[2].path), "--limit", "4", "--no-meteor"]
    r = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())
    for v in ("base", "lora"):
        assert f"generating: {v} · advbench: 4/4" in err, err[-1500:]
    r = CliRunner().invoke(app, ["compare", str(out), "--a", "base", "--b", "lora", "--n-boot", "200"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("bootstrap CIs (200 resamples)")]
    assert lines and lines[-1].split(": ")[1].split(",")[0].split("/")[0] == lines[-1].split("/")[1].split(",")[0]


def test_progress_callback_and_the_delayed_bar():
    """task_callback: one task per label with the counts it is given; show_after: no bar before that time."""
    import io
    import time

    from rich.console import Console

    from safeprune.io.progress import _LoggedProgress, make_progress, task_callback

    with make_progress(False) as prog:
        cb = task_callback(prog, "generating: ")
        cb("base · advbench", 3, 10)
        cb("base · advbench", 7, 10)
        cb("lora · advbench", 1, 10)
        tasks = {t.description: (t.completed, t.total) for t in prog.tasks}
    assert tasks == {"generating: base · advbench": (7, 10), "generating: lora · advbench": (1, 10)}
    con = Console(file=io.StringIO(), force_terminal=True)
    with _LoggedProgress(console=con, log_every=None, show_after=0.3, transient=True) as prog:
        t = prog.add_task("bootstrap", total=2)
        prog.update(t, completed=1)
        assert not prog.live.is_started  # a quick phase draws nothing
        time.sleep(0.35)
        prog.update(t, completed=2)
        assert prog.live.is_started
    assert not prog.live.is_started


# -- real model (slow) -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (TESTBED_MODELS / "aligned" / "config.json").is_file(), reason="testbed models not built")
def test_testbed_reference_generations_reproduced():
    """Greedy, chat template with its default system prompt, fp32, batched left padding: the aligned
    model and aligned+mix_s0 reproduce the testbed's reference generations."""
    gen_dir = SHARED / "testbed" / "generations"
    b = HFBackend(str(TESTBED_MODELS / "aligned"), {"mix_s0": str(SHARED / "testbed" / "adapters" / "mix_s0")})
    s = GenSettings(max_new_tokens=64, batch_size=8)
    for adapter, f in ((None, "aligned.adv.jsonl"), ("mix_s0", "mix_s0.adv.jsonl")):
        ref = [json.loads(x) for x in (gen_dir / f).read_text().splitlines()[:8]]
        gens = b.generate([r["prompt"] for r in ref], adapter, s)
        same = sum(g.text == r["output"] for g, r in zip(gens, ref))
        assert same >= 7, [(g.text, r["output"]) for g, r in zip(gens, ref)]
        j = KeywordJudge()
        assert [j.refused(g.text) for g in gens] == [r["refusal"] for r in ref]
