"""Continuous batching and verdict-aware early stopping (issue 18): the tokens equal HF generate's, and early
stopping never changes a keyword verdict."""

from __future__ import annotations

import csv
import json
import random
import re

import pytest

from helpers import SHARED, TESTBED_MODELS, make_adapter, make_model, tiny_chat_tokenizer
from safeprune.errors import UsageError
from safeprune.eval import EvalConfig, KeywordJudge, evaluate
from safeprune.eval.backends import FakeBackend, GenSettings, HFBackend
from safeprune.eval.backends.stopping import SubstringStop, pattern_reach
from safeprune.eval.cache import GenerationCache
from safeprune.eval.evaluate import early_stop_plan
from safeprune.eval.judges import BROAD_REFUSAL_PATTERNS, HarmJudge, PatternJudge
from safeprune.prompts import PromptItem, PromptSet

PROMPTS = [" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(1 + (i * 5) % 17)) for i in range(24)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    m = make_model(d / "base", "llama", layers=2)
    tiny_chat_tokenizer(m)
    return m, make_adapter(m, d / "ad", "llama", seed=3)


def _frequent_eos(b: HFBackend, token: int) -> None:
    """Make a common token an end-of-sequence token too, so rows end at different steps mid-batch."""
    b.model.generation_config.eos_token_id = [b.tokenizer.eos_token_id, token]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_continuous_equals_generate(tiny, dtype):
    m, ad = tiny
    cont = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype)
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype, loop="generate")
    assert cont.describe()["loop"] == "continuous" and gen.describe()["loop"] == "generate"
    s = GenSettings(max_new_tokens=10, batch_size=5)  # 24 prompts through 5 slots: slots are refilled
    for adapter in (None, "ad"):
        ref = gen.generate(PROMPTS, adapter, s)
        # a token the tiny model often emits becomes an EOS: rows end at different steps
        common = cont.tokenizer.convert_tokens_to_ids(ref[0].text.split()[1])
        for b in (cont, gen):
            _frequent_eos(b, common)
        ref = gen.generate(PROMPTS, adapter, s)
        alone = gen.generate(PROMPTS, adapter, GenSettings(max_new_tokens=10, batch_size=1))
        got = cont.generate(PROMPTS, adapter, s)
        assert 0 < sum(g.finished for g in got) < len(PROMPTS)  # some end by EOS, some at max tokens
        assert len({g.new_tokens for g in got}) > 2
        if dtype == "float64":  # identical tokens; the float32 case is counted by the benchmark
            assert [g.text for g in got] == [g.text for g in ref] == [g.text for g in alone]
        else:
            assert sum(g.text == r.text for g, r in zip(got, alone)) >= len(PROMPTS) - 1
        same = [(g, r) for g, r in zip(got, alone) if g.text == r.text]
        assert [g.new_tokens for g, _ in same] == [r.new_tokens for _, r in same]
        assert [g.finished for g, _ in same] == [r.finished for _, r in same]
        assert [g.mean_nll for g, _ in same] == pytest.approx([r.mean_nll for _, r in same], abs=1e-4)
        assert [g.mean_entropy for g, _ in same] == pytest.approx([r.mean_entropy for _, r in same], abs=1e-4)
        # continuous batching reports per-generation seconds that add up to the generation time
        assert all(g.batch_size == 1 and g.batch_seconds > 0 for g in got)


def test_continuous_reports_each_generation_once(tiny):
    m, _ = tiny
    b = HFBackend(str(m))
    seen: list[int] = []
    gens = b.generate(PROMPTS, None, GenSettings(max_new_tokens=4, batch_size=3), on_batch=lambda i, g: seen.extend(i))
    assert sorted(seen) == list(range(len(PROMPTS))) and len(gens) == len(PROMPTS)


@pytest.mark.parametrize("loop", ["continuous", "generate"])
def test_early_stop_keeps_every_verdict(tiny, loop):
    """Stopping at the first keyword cuts the text to a prefix of the full generation that still holds a
    keyword: the judge's verdict is the full generation's, prompt by prompt."""
    m, ad = tiny
    b = HFBackend(str(m), {"ad": str(ad)}, loop=loop)
    full_s = GenSettings(max_new_tokens=12, batch_size=4)
    for adapter in (None, "ad"):
        full = b.generate(PROMPTS, adapter, full_s)
        words = [w for g in full for w in g.text.split()]

        def hits(ks):
            return sum(any(k in g.text for k in ks) for g in full)

        # keywords that some outputs contain and others do not, one a substring of a token ("w3" of "w35")
        kws = next(
            [w, w[:2]]
            for w in sorted(set(words), key=lambda w: (-words.count(w), w))
            if 0 < hits([w, w[:2]]) < len(full)
        )
        judge = KeywordJudge(kws)
        stop_s = GenSettings(max_new_tokens=12, batch_size=4, stop_strings=tuple(kws))
        cut = b.generate(PROMPTS, adapter, stop_s)
        assert [judge.refused(c.text) for c in cut] == [judge.refused(f.text) for f in full]
        assert 0 < sum(c.stopped_early for c in cut) < len(PROMPTS)
        for c, f in zip(cut, full):
            assert f.text.startswith(c.text)
            if c.stopped_early:
                assert judge.refused(c.text) and not c.finished and c.new_tokens <= f.new_tokens
                # it stopped at the first token whose text holds a keyword
                toks = b.tokenizer(c.text, add_special_tokens=False)["input_ids"]
                assert not judge.refused(b.tokenizer.decode(toks[:-1]))
            else:
                assert c.text == f.text  # not cut (a keyword in the last allowed token ends it anyway)


class _Tok:
    """A stand-in tokenizer: token i decodes to the concatenation of pieces[:i]."""

    def __init__(self, pieces, cleanup=False):
        self.pieces = pieces
        self.clean_up_tokenization_spaces = cleanup

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_stable_text_holds_back_what_a_later_token_can_change():
    # a multi-byte character split across tokens decodes as U+FFFD until it is complete
    stop = SubstringStop(_Tok(["Sorr", "y", "\ufffd"]), ["Sorry\ufffd", "Sorry"], True, [])
    assert stop.stable_text([0, 1, 2]) == "Sorry"
    assert stop.decided([0, 1]) and not stop.decided([0])
    # with clean_up_tokenization_spaces a later " n't" can delete a space in the last characters
    stop = SubstringStop(_Tok(["I can", " not", " n't"], cleanup=True), ["can not"], True, [])
    assert not stop.decided([0, 1])  # "I can not" -> its tail is held back
    # leading/trailing spaces are stripped as the judge strips the output
    stop = SubstringStop(_Tok(["  As an", " "]), [" As an", "As an "], True, [])
    assert not stop.decided([0, 1])
    stop = SubstringStop(_Tok(["SORRY"]), ["sorry"], False, [])
    assert stop.decided([0])


def test_pattern_judge_must_be_decided_too():
    """The broad judge's regexes are not monotone ("I can't help" refuses, "I can't help but" does not):
    a generation stops only once a pattern match has, after it, every character its lookaheads can read."""
    pats = [r"\bI can't help\b(?! but\b)"]  # reach: " but" and the boundary after it = 5
    assert pattern_reach(pats[0]) == 5
    tail = [" x" * 20]
    stop = SubstringStop(_Tok(["I can't help", " but", " smile"] + tail), ["I can"], True, [], patterns=pats)
    assert not stop.decided([0])  # keyword found, pattern matches, but nothing after it yet
    assert not stop.decided([0, 1, 2, 3])  # "... but": no refusal pattern any more
    stop = SubstringStop(_Tok(["I can't help", " but"]), ["I can"], True, [], patterns=[r"\bI can't help\b(?! butt)"])
    assert not stop.decided([0, 1])  # " but" is 4 characters; " butt" could still follow
    stop = SubstringStop(_Tok(["I can't help", " wit", "h that."] + tail), ["I can"], True, [], patterns=pats)
    assert not stop.decided([0, 1]) and stop.decided([0, 1, 2])
    assert not SubstringStop(_Tok(["no", " x" * 40]), ["I can"], True, [], patterns=[r"no\Z"]).decided([0, 1])
    # a pattern that ends in a consumed character decides as soon as it matches
    stop = SubstringStop(_Tok(["I'm sorry", ",", " but"]), ["I'm sorry"], True, [], patterns=[r"^I'm sorry[,.!]"])
    assert not stop.decided([0]) and stop.decided([0, 1])


def test_pattern_reach_bounds_what_each_assertion_reads():
    assert [pattern_reach(p) for p in BROAD_REFUSAL_PATTERNS] == [8] + [1] * 6 + [0] + [1] * 8
    assert pattern_reach(r"a(?=bc)\b") == 2  # the lookahead reads 2, the boundary after the match 1
    assert pattern_reach(r"(?<=x)a") == 0 and pattern_reach(r"^a") == 0  # they read backwards
    assert pattern_reach(r"a(?!b+)") is None and pattern_reach(r"a\Z") is None  # never decided early
    assert pattern_reach(r"a$") == 1 and pattern_reach(r"a$", flags=0) is None
    assert pattern_reach(r"(a)(?(1)b(?=cd)|c)") == 2 and pattern_reach(r"(?:a(?=xyz))+") == 3


def test_decided_pattern_verdict_survives_any_continuation():
    """Property test: whenever the stop rule calls the broad judge's verdict decided on a prefix, the
    pattern judge refuses every continuation of it, adversarial ones (" but", " myself", " it") included."""
    judge = PatternJudge()
    rng = random.Random(18)
    frags = ["I can't help", "I'm sorry", "I am unable to", "I cannot assist", "Sorry, but I", "As an AI"]
    frags += ["I must decline", "I won't provide", "I can't help but", "I can't help myself", "I can't help it"]
    frags += ["It's not appropriate for me to", "My apologies", " with that.", " but", " smile", " it", ",", "."]
    conts = ["", " but", " myself", " it", "but", "s", "!", "\n", " with that.", "n't", " butter"]
    n_decided = 0
    for _ in range(400):
        text = " ".join(rng.choice(frags) for _ in range(rng.randint(1, 4)))
        pieces = re.findall(r"\s*\S+", text) if rng.random() < 0.5 else list(text)  # word or character tokens
        stop = SubstringStop(_Tok(pieces), [], True, [], patterns=BROAD_REFUSAL_PATTERNS)
        for k in range(1, len(pieces) + 1):
            if stop.decided(list(range(k))):
                n_decided += 1
                text = "".join(pieces[:k])
                for c in conts:
                    assert judge.refused((text + c).strip()), (text, c)
                    assert judge.refused((text + c + "".join(pieces[k:])).strip())
    assert n_decided > 50


def _sets():
    adv = PromptSet("adv", "safety", "adv.csv", "csv", [PromptItem(str(i), f"harm {i}") for i in range(6)])
    xs = PromptSet("xs", "over_refusal", "xs.csv", "csv", [PromptItem(str(i), f"benign {i}") for i in range(4)])
    util = PromptSet(
        "util", "utility", "u.jsonl", "jsonl", [PromptItem(str(i), f"dialog {i}", reference="a b") for i in range(3)]
    )
    return [adv, xs, util]


REFUSAL = "Sure. I cannot help with {} at all: it is not something I will do, have a good day, goodbye"


def _responses():
    return {None: lambda p: REFUSAL.format(p) if p.endswith(("0", "2")) else f"Sure: {p} a b c"}


class _ModelJudge(HarmJudge):
    id = "model:x"

    def score_batch(self, prompts, responses):
        return []


def test_early_stop_default_on_for_keyword_judging_only():
    j = KeywordJudge()
    assert early_stop_plan(EvalConfig(), j, [])["enabled"]
    assert not early_stop_plan(EvalConfig(early_stop=False), j, [])["enabled"]
    off = early_stop_plan(EvalConfig(), j, [_ModelJudge()])
    assert not off["enabled"] and "model-based" in off["why"]
    with pytest.raises(UsageError, match="keyword-only"):
        early_stop_plan(EvalConfig(early_stop=True), j, [_ModelJudge()])


def test_early_stop_recorded_in_results_items_and_cache_key(tmp_path):
    cache = tmp_path / "c.jsonl"
    be = FakeBackend(responses=_responses())
    r = evaluate("fake", prompt_sets=_sets(), backend=be, cache=cache, meteor=False, out_dir=tmp_path / "on")
    res = r.results
    assert res["early_stop"]["enabled"] and res["early_stop"]["kinds"] == ["safety", "over_refusal"]
    assert "early_stop" in res["settings"]["per_kind"]["safety"]
    assert "early_stop" not in res["settings"]["per_kind"]["utility"]
    by = {(i["set"], i["id"]): i for i in r.items}
    cut = by[("adv", "0")]["output"]
    assert by[("adv", "0")]["stopped_early"] and REFUSAL.format("harm 0").startswith(cut)
    # it ran until the broad pattern judge's verdict was decided too ("I cannot help" + its lookahead's reach)
    reach = pattern_reach(BROAD_REFUSAL_PATTERNS[0])
    assert len(cut) < len(REFUSAL.format("harm 0")) and len(cut) >= len("Sure. I cannot help") + reach
    assert by[("adv", "0")]["refused"] and by[("adv", "0")]["refused_broad"]
    assert not by[("adv", "1")]["stopped_early"] and not by[("util", "0")]["stopped_early"]
    assert res["metrics"]["base"]["adv"]["stopped_early"] == 2  # "harm 0", "harm 2"
    assert "truncated once their verdict was decided" in (tmp_path / "on" / "summary.md").read_text()
    off = evaluate(
        "fake",
        prompt_sets=_sets(),
        backend=FakeBackend(responses=_responses()),
        cache=cache,
        meteor=False,
        config=EvalConfig(early_stop=False),
    )
    # early stopping is part of the cache key for safety/over-refusal only: utility came from the cache
    assert [i["cached"] for i in off.items if i["set"] == "util"] == [True] * 3
    assert not any(i["cached"] for i in off.items if i["set"] != "util")
    assert [i["refused"] for i in off.items] == [i["refused"] for i in r.items]
    assert len(GenerationCache(cache)) == 6 + 4 + 3 + 6 + 4
    # with early stopping off the key is the one used before early stopping existed
    assert "early_stop" not in GenSettings().key()


def _count_calls(be) -> list[int]:
    """Wrap ``be.generate`` so that each call appends its number of prompts to the returned list."""
    calls: list[int] = []
    orig = be.generate

    def spy(prompts, adapter, settings, on_batch=None):
        calls.append(len(prompts))
        return orig(prompts, adapter, settings, on_batch)

    be.generate = spy
    return calls


def test_streaming_backend_caches_as_generations_finish(tmp_path, tiny):
    m, _ = tiny
    be = HFBackend(str(m))
    ps = PromptSet("adv", "safety", "adv.csv", "csv", [PromptItem(str(i), p) for i, p in enumerate(PROMPTS[:7])])
    calls = _count_calls(be)
    cfg = EvalConfig(safety_max_new_tokens=3, batch_size=2)
    evaluate(str(m), prompt_sets=[ps], backend=be, cache=tmp_path / "c.jsonl", config=cfg, meteor=False)
    assert calls == [7]  # one call: the backend schedules the prompts itself
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(x)["batch_size"] == 1 for x in lines)


def test_sets_with_the_same_settings_share_one_call(tmp_path, tiny):
    """Safety and over-refusal sets (same settings) go to the continuous loop in one call; the generations
    are those of each set on its own (float64), and each set gets its own records."""
    m, ad = tiny
    mk = [PromptItem(str(i), p) for i, p in enumerate(PROMPTS)]
    sets = [
        PromptSet("adv", "safety", "adv.csv", "csv", mk[:7]),
        PromptSet("xs", "over_refusal", "xs.csv", "csv", mk[7:11] + mk[:1]),  # one prompt in both sets
        PromptSet(
            "util",
            "utility",
            "u.jsonl",
            "jsonl",
            [PromptItem(str(i), p, reference="w1") for i, p in enumerate(PROMPTS[11:14])],
        ),
    ]
    cfg = EvalConfig(safety_max_new_tokens=5, utility_max_new_tokens=4, batch_size=3)
    be = HFBackend(str(m), {"ad": str(ad)}, dtype="float64")
    calls = _count_calls(be)
    kw = dict(backend=be, config=cfg, meteor=False, include_base=True)
    together = evaluate(str(m), {"ad": str(ad)}, prompt_sets=sets, cache=tmp_path / "a.jsonl", **kw)
    assert calls == [11, 3, 11, 3]  # per variant: adv + xs in one call (the shared prompt once), util alone
    calls.clear()
    alone = [
        evaluate(str(m), {"ad": str(ad)}, prompt_sets=[ps], cache=tmp_path / f"{ps.name}.jsonl", **kw) for ps in sets
    ]
    assert calls == [7, 7, 5, 5, 3, 3]
    key = lambda it: (it["variant"], it["set"], it["id"])  # noqa: E731
    got = {key(it): it for it in together.items}
    ref = {key(it): it for r in alone for it in r.items}
    assert got.keys() == ref.keys() and len(got) == 2 * (7 + 5 + 3)
    assert all(got[k]["output"] == ref[k]["output"] and got[k]["new_tokens"] == ref[k]["new_tokens"] for k in got)
    assert together.metrics["ad"]["xs"]["generated_now"] == 4  # the shared prompt: generated for adv


def test_running_cache_writes_in_place_and_grows_past_its_room():
    from safeprune.eval.backends.continuous import _Layer

    torch = pytest.importorskip("torch")
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(1, 3, 6, 5, dtype=torch.float64)
    la = _Layer()
    la.room = 2
    la.fill([a, a + 1], [b[:, :, :4].expand(2, -1, -1, -1), b[:, :, :4].expand(2, -1, -1, -1)], 4)
    assert la.keys.shape == (4, 3, 4, 5) and torch.equal(la.keys[2:], a + 1)
    la2 = _Layer()
    la2.fill([a, b], [a, b], 6)  # left padding with zeros
    assert torch.equal(la2.keys[:2, :, :2], torch.zeros(2, 3, 2, 5, dtype=torch.float64))
    assert torch.equal(la2.keys[:2, :, 2:], a) and torch.equal(la2.keys[2:], b)
    ref_k = la.keys.clone()
    for step in range(5):  # room 2: the third step needs a bigger buffer
        k = torch.full((4, 3, 1, 5), float(step), dtype=torch.float64)
        keys, _ = la.update(k, k)
        ref_k = torch.cat([ref_k, k], 2)
        assert torch.equal(keys, ref_k)
    la.select(torch.tensor([3, 1]), 2)
    assert torch.equal(la.keys, ref_k[[3, 1], :, 2:]) and la.keys.shape[2] == la.get_seq_length() == 7


def test_lanes_keep_generate_tokens(tiny, monkeypatch):
    """Prompts of very different lengths run in separate lanes when the padding a join would add costs more
    than a lane; the float64 tokens still equal generate's, alone and batched."""
    import safeprune.eval.backends.continuous as cont_mod

    m, ad = tiny
    cont = HFBackend(str(m), {"ad": str(ad)}, dtype="float64")
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", loop="generate")
    prompts = [" ".join(f"w{(i * 11 + j) % 120}" for j in range(40 if i % 5 == 0 else 2 + i % 3)) for i in range(20)]
    s = GenSettings(max_new_tokens=8, batch_size=7)
    ref = gen.generate(prompts, "ad", GenSettings(max_new_tokens=8, batch_size=1))
    common = cont.tokenizer.convert_tokens_to_ids(ref[1].text.split()[0])
    for b in (cont, gen):
        _frequent_eos(b, common)
    ref = gen.generate(prompts, "ad", GenSettings(max_new_tokens=8, batch_size=1))
    one = cont.generate(prompts, "ad", s)  # the tiny model's own limit (738): one lane
    assert cont.loop_stats["lanes_max"] == 1
    monkeypatch.setattr(cont_mod, "lane_padding_limit", lambda model: 20)
    got = cont.generate(prompts, "ad", s)
    assert cont.loop_stats["lanes_max"] >= 2
    assert cont.loop_stats["forwards"] > 0 and cont.loop_stats["prefill_forwards"] > 0
    assert 0 < sum(g.finished for g in got) < len(prompts)
    assert [g.text for g in got] == [g.text for g in one] == [g.text for g in ref]
    assert [g.new_tokens for g in got] == [g.new_tokens for g in ref]


def test_pick_lane_bounds_each_lanes_padding():
    torch = pytest.importorskip("torch")
    from safeprune.eval.backends.continuous import _Batch, _pick_lane

    def group(widths: list[int], cols: int) -> _Batch:
        b = _Batch("past_key_values")
        b.rows = list(range(len(widths)))
        b.mask = torch.tensor([[0] * (cols - w) + [1] * w for w in widths])
        return b

    long = group([100, 90], 100)  # padding 10
    short = group([10, 10, 8, 9], 10)  # padding 3; joining the long lane pads it by 4 × 90
    assert _pick_lane([long], {}, short, limit=400) == 0  # 10 + 3 + 360 = 373 ≤ 400
    assert _pick_lane([long], {}, short, limit=300) == 1  # over: a new lane
    assert _pick_lane([long], {}, short, limit=300, most=1) == 0  # no more lanes: the least padding
    other = group([12, 11], 12)
    # a lane being formed in this admission counts the groups already bound for it
    assert _pick_lane([long, _Batch("past_key_values")], {1: [other]}, short, limit=300) == 1
    assert _pick_lane([], {}, short, limit=0) == 0


def test_lane_padding_limit_is_weights_over_kv_per_token(tiny):
    from safeprune.eval.backends.continuous import lane_padding_limit

    m, _ = tiny
    b = HFBackend(str(m))
    cfg = b.model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2 * cfg.num_hidden_layers
    params = sum(p.numel() for p in b.model.parameters())
    tied = b.model.get_output_embeddings().weight is b.model.get_input_embeddings().weight
    read = params - (0 if tied else b.model.get_input_embeddings().weight.numel())
    assert lane_padding_limit(b.model) == read // kv > 1


def test_choose_in_row_chunks_gives_the_same_bits():
    torch = pytest.importorskip("torch")
    from safeprune.eval.backends.continuous import _choose

    x = torch.randn(37, 500, generator=torch.Generator().manual_seed(0)) * 5
    tok, logp, ent = _choose(x, chunk=4)
    assert (tok, logp, ent) == _choose(x, chunk=37)  # the same bits in chunks of 4 rows as all at once
    ref = torch.log_softmax(x.double(), -1)
    assert tok == x.argmax(-1).tolist()
    assert logp == pytest.approx(ref.max(-1).values.tolist(), abs=1e-5)
    assert ent == pytest.approx((-(ref.exp() * ref).sum(-1)).tolist(), abs=1e-4)


def test_output_layer_gets_a_contiguous_input_and_the_hook_is_removed(tiny):
    m, _ = tiny
    b = HFBackend(str(m))
    head = b.model.get_output_embeddings()
    seen: list[bool] = []
    h = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].is_contiguous()))
    b.generate(PROMPTS[:6], None, GenSettings(max_new_tokens=3, batch_size=4))
    h.remove()
    assert seen and all(seen)  # the prefill's last-position slice is made contiguous
    assert not head._forward_pre_hooks


def test_prefill_groups_bound_padding_and_size():
    from safeprune.eval.backends.continuous import _prefill_groups

    assert [len(g) for g in _prefill_groups([250] * 20)] == [8, 8, 4]  # 8 × 250 ≤ 2,048 tokens
    assert [len(g) for g in _prefill_groups([20] * 100)] == [64, 36]  # short prompts: 64 rows a forward
    assert _prefill_groups([470, 100, 100]) == [[0], [1, 2]]  # padding bound
    assert _prefill_groups([3000, 3000]) == [[0], [1]]  # one prompt over the size: a group of its own


@pytest.mark.slow
@pytest.mark.skipif(not (TESTBED_MODELS / "aligned" / "config.json").is_file(), reason="testbed models not built")
def test_testbed_early_stop_same_verdicts():
    """On the testbed model (byte-level BPE), early stopping and continuous batching keep every verdict."""
    rows = list(csv.DictReader(open(SHARED / "data" / "advbench" / "harmful_behaviors.csv", encoding="utf-8")))
    prompts = [r["goal"] for r in random.Random(18).sample(rows, 12)]
    b = HFBackend(str(TESTBED_MODELS / "aligned"), {"mix_s0": str(SHARED / "testbed" / "adapters" / "mix_s0")})
    j, broad = KeywordJudge(), PatternJudge()
    stop = GenSettings(
        max_new_tokens=64, batch_size=4, stop_strings=tuple(j.keywords), stop_patterns=tuple(broad.keywords)
    )
    n_cut = 0
    for adapter in (None, "mix_s0"):
        b.loop = "generate"
        full = b.generate(prompts, adapter, GenSettings(max_new_tokens=64, batch_size=12))
        b.loop = "continuous"
        cut = b.generate(prompts, adapter, stop)
        assert [j.refused(c.text) for c in cut] == [j.refused(f.text) for f in full]
        assert [broad.refused(c.text) for c in cut] == [broad.refused(f.text) for f in full]
        assert all(f.text.startswith(c.text) for c, f in zip(cut, full))
        assert sum(c.stopped_early for c in cut) <= sum(j.refused(f.text) for f in full)
        n_cut += sum(c.stopped_early for c in cut)
    assert n_cut > 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (the GPU machine)")
def test_continuous_equals_generate_on_cuda(tiny):
    """On a GPU the continuous loop's float64 tokens equal HF generate's there and the CPU's, with rows ending
    at different steps, and the early stop keeps every keyword verdict."""
    m, ad = tiny
    s = GenSettings(max_new_tokens=10, batch_size=5)
    cpu = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", loop="generate")
    cont = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", device="cuda")
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", loop="generate", device="cuda")
    assert cont.describe()["loop"] == "continuous" and next(cont.model.parameters()).device.type == "cuda"
    common = cpu.tokenizer.convert_tokens_to_ids(cpu.generate(PROMPTS, "ad", s)[0].text.split()[1])
    for b in (cpu, cont, gen):
        _frequent_eos(b, common)
    for adapter in (None, "ad"):
        ref = cpu.generate(PROMPTS, adapter, s)
        got = cont.generate(PROMPTS, adapter, s)
        assert 0 < sum(g.finished for g in got) < len(PROMPTS)
        assert [g.text for g in got] == [g.text for g in gen.generate(PROMPTS, adapter, s)] == [g.text for g in ref]
        assert [g.mean_nll for g in got] == pytest.approx([r.mean_nll for r in ref], abs=1e-6)
        words = sorted({w for g in ref for w in g.text.split()})[:3]
        stop = GenSettings(max_new_tokens=10, batch_size=5, stop_strings=tuple(words))
        judge = KeywordJudge(words)
        cut = cont.generate(PROMPTS, adapter, stop)
        assert [judge.refused(c.text) for c in cut] == [judge.refused(r.text) for r in ref]
        assert all(r.text.startswith(c.text) for c, r in zip(cut, ref))


def test_running_cache_takes_new_rows_into_its_spare_rows():
    from safeprune.eval.backends.continuous import _Layer

    torch = pytest.importorskip("torch")
    a = torch.randn(4, 2, 5, 3, dtype=torch.float64)
    la = _Layer()
    la.room = 2
    la.fill([a], [a + 1], 5)
    buf = la._k
    la.move(torch.tensor([0]), torch.tensor([3]), 2)  # rows 0 and 1 kept (row 3 moved onto row 0)
    assert la.keys.shape[0] == 2
    b = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert la.append([b], [b + 1])  # two spare rows: in place, left-padded with zeros
    assert la._k is buf and la.keys.shape == (4, 2, 5, 3)
    assert torch.equal(la.keys[2:, :, :2], torch.zeros(2, 2, 2, 3, dtype=torch.float64))
    assert torch.equal(la.keys[2:, :, 2:], b) and torch.equal(la.values[2:, :, 2:], b + 1)
    assert torch.equal(la.keys[:2], torch.stack([a[3], a[1]]))
    assert not la.append([b[:1]], [b[:1]])  # no spare row left
    la.move(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    wide = torch.randn(1, 2, 6, 3, dtype=torch.float64)
    assert not la.append([wide], [wide]) and la.keys.shape[0] == 3  # wider than the running cache: refused


def test_grouped_refills_into_spare_rows_keep_generate_tokens(tiny):
    """Slots are refilled a group at a time (an eighth of the rows in flight) and the new rows are written
    into the rows finished sequences freed; the float64 tokens still equal generate's alone."""
    m, ad = tiny
    cont = HFBackend(str(m), {"ad": str(ad)}, dtype="float64")
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", loop="generate")
    one = GenSettings(max_new_tokens=8, batch_size=1)
    common = cont.tokenizer.convert_tokens_to_ids(gen.generate(PROMPTS[:1], "ad", one)[0].text.split()[0])
    for b in (cont, gen):
        _frequent_eos(b, common)
    prompts = PROMPTS * 2
    ref = gen.generate(prompts, "ad", one)
    got = cont.generate(prompts, "ad", GenSettings(max_new_tokens=8, batch_size=16))  # refills of 2
    assert 0 < sum(g.finished for g in got) < len(got)
    assert cont.loop_stats["joins_in_place"] > 0
    assert cont.loop_stats["prefill_forwards"] < len(prompts) - 16  # not one prefill per freed slot
    assert [g.text for g in got] == [g.text for g in ref]
    assert [g.new_tokens for g in got] == [g.new_tokens for g in ref]


def test_automatic_batch_size_fits_a_share_of_free_memory(tiny, monkeypatch):
    """batch_size 0: as many rows as the keys/values of the longest prompt plus the new tokens (and three
    float32 logit rows) fit in a quarter of the free memory, at most ROWS_MAX; the tokens are generate's."""
    import safeprune.eval.backends.continuous as cont_mod

    m, ad = tiny
    cont = HFBackend(str(m), {"ad": str(ad)}, dtype="float64")
    base, layers, kv, dim = cont_mod._kv_dims(cont.model)
    vocab = base.get_output_embeddings().weight.shape[0]
    per_row = 2 * layers * kv * dim * 8 * 30 + 3 * 4 * vocab  # float64, 30 tokens
    assert cont_mod.auto_rows(cont.model, 30, "cpu", free=4 * 7 * per_row + 3) == 7
    assert cont_mod.auto_rows(cont.model, 30, "cpu", free=1) == 1
    assert cont_mod.auto_rows(cont.model, 30, "cpu", free=1 << 50) == cont_mod.ROWS_MAX
    assert cont_mod.free_memory("cpu") > 0
    ids = [
        cont.tokenizer(cont.render(p, GenSettings()), **cont.encode_kwargs(GenSettings()))["input_ids"] for p in PROMPTS
    ]
    longest = max(len(x) for x in ids) + 6
    monkeypatch.setattr(
        cont_mod, "free_memory", lambda device: 4 * 3 * (2 * layers * kv * dim * 8 * longest + 12 * vocab)
    )
    got = cont.generate(PROMPTS, "ad", GenSettings(max_new_tokens=6, batch_size=0))
    assert cont.loop_stats["rows_cap"] == 3
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype="float64", loop="generate")
    ref = gen.generate(PROMPTS, "ad", GenSettings(max_new_tokens=6, batch_size=0))  # auto on generate: 3 too
    assert [g.text for g in got] == [g.text for g in ref]


def test_batch_size_auto_or_a_positive_integer():
    from safeprune.eval.evaluate import batch_rows

    assert batch_rows("auto") == batch_rows("AUTO") == 0
    assert batch_rows("12") == batch_rows(12) == 12
    assert batch_rows(None) is None
    for bad in ("0", 0, -3, "many", True):
        with pytest.raises(UsageError, match="--batch-size must be 'auto' or a positive integer"):
            batch_rows(bad, "--batch-size")
    assert EvalConfig().settings("safety").batch_size == 0  # automatic by default
    assert EvalConfig(batch_size=8).settings("utility").batch_size == 8
    assert EvalConfig(batch_size=8, utility_batch_size=2).settings("utility").batch_size == 2


def test_fused_output_layer_gives_the_tokens_and_statistics_of_choose():
    """The output layer computed in vocabulary chunks with the statistics accumulated per chunk: the same
    tokens as the argmax of the whole product (the first of tied maxima, also across chunks), the
    log-probability and entropy within float32 rounding, with and without a bias, any chunk size."""
    torch = pytest.importorskip("torch")
    from safeprune.eval.backends.continuous import _choose, _fused_choose

    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(23, 40, generator=g), torch.randn(1000, 40, generator=g), torch.randn(1000, generator=g)
    # two equal columns in different chunks, and a row whose maximum is their tie: small integers, so every
    # product is exact whatever the order of its sums
    w[300] = w[700] = torch.arange(40) % 5 - 2.0
    x[0] = (torch.arange(40) % 5 - 2.0) * 4
    bias[700] = bias[300]
    for b in (None, bias):
        logits = torch.nn.functional.linear(x, w, b)
        ref = _choose(logits)
        assert ref[0][0] == 300
        for chunk in (64, 333, 1000, 4096):
            tok, logp, ent = _fused_choose(x, w, b, chunk=chunk)
            assert tok == ref[0]
            assert logp == pytest.approx(ref[1], abs=1e-4)
            assert ent == pytest.approx(ref[2], abs=1e-4)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loop_fuses_the_output_layer_after_checking_it(tiny, dtype, monkeypatch):
    """On a CPU the loop fuses the output layer once its first forward's fused statistics agree with the
    model's logits: the generations are those of the unfused loop (float64: the same tokens and statistics
    to rounding; float32: the same tokens on these prompts). A model that changes its logits after the layer
    fails the check and keeps the unfused path, with the generate loop's tokens."""
    m, ad = tiny
    from safeprune.eval.backends import continuous

    s = GenSettings(max_new_tokens=8, batch_size=6)
    fused_be = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype)
    got = fused_be.generate(PROMPTS, "ad", s)
    assert fused_be.loop_stats["fused_head"] is True
    plain_be = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype)
    with monkeypatch.context() as mp:
        mp.setattr(continuous, "FUSE_HEAD", False)
        ref = plain_be.generate(PROMPTS, "ad", s)
    assert plain_be.loop_stats["fused_head"] is False
    assert [g.text for g in got] == [r.text for r in ref]
    assert [g.mean_nll for g in got] == pytest.approx([r.mean_nll for r in ref], abs=1e-5)
    assert [g.mean_entropy for g in got] == pytest.approx([r.mean_entropy for r in ref], abs=1e-5)

    scaled = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype)
    gen = HFBackend(str(m), {"ad": str(ad)}, dtype=dtype, loop="generate")
    for b in (scaled, gen):  # logits scaled after the output layer (as a soft-capping model does)
        b.model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out * 3.0)
    got = scaled.generate(PROMPTS, "ad", s)
    assert scaled.loop_stats["fused_head"] is False
    ref = gen.generate(PROMPTS, "ad", GenSettings(max_new_tokens=8, batch_size=1))
    if dtype == "float64":
        assert [g.text for g in got] == [r.text for r in ref]
        assert [g.mean_nll for g in got] == pytest.approx([r.mean_nll for r in ref], abs=1e-4)
