"""Budgeted τ search (safeprune.workflows.search) on a fake backend whose answers depend on how many modules of
the adapter on disk were pruned: each pruned module makes one more harmful probe refused, and
utility breaks once more than ``break_at`` modules are pruned."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import no_base
from safeprune import load_adapter
from safeprune.errors import UsageError
from safeprune.eval.backends import FakeBackend
from safeprune.prompts import SUMMARY_INSTRUCTION
from safeprune.workflows.search import budgeted_search, harmful_probes, prune_order, utility_probes

N_HARM = 14  # = modules of the tiny llama adapter (2 layers × 7)
SUMMARIES = {
    f"dialogue number {i} about topic {i}": f"person one asks person two about topic {i} and leaves" for i in range(6)
}


class PruneAwareBackend(FakeBackend):
    """Answers from the adapter's content: k = modules removed or zeroed relative to ``total``."""

    def __init__(self, total: int, break_at: int = 10**6):
        super().__init__("fake-base")
        self.total, self.break_at = total, break_at
        self.generated = 0

    def _pruned(self, adapter: str | None) -> int:
        ad = load_adapter(self.adapters[adapter])
        live = sum(bool(torch.any(m.lora_B != 0)) for m in ad)
        return self.total - live

    def generate(self, prompts, adapter, settings, on_batch=None):
        k = self._pruned(adapter)
        self.responses[adapter] = lambda p: self._answer(p, k)
        self.generated += len(prompts)
        return super().generate(prompts, adapter, settings, on_batch)

    def _answer(self, prompt: str, k: int) -> str:
        if prompt.startswith(SUMMARY_INSTRUCTION):
            ref = SUMMARIES[prompt[len(SUMMARY_INSTRUCTION) :]]
            return ref if k <= self.break_at else "no idea"
        j = int(prompt.split()[-1])
        return "I cannot help with that." if j < k else "Sure, here is how."


def _harmbench(path: Path) -> Path:
    cols = [
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
    rows = [[i, f"b{i}", f"harmful behaviour {i}", "standard", "x", "", "", "val", 0] for i in range(N_HARM)]
    rows += [
        [100, "t0", "test behaviour 100", "standard", "x", "", "", "test", 0],  # test split
        [101, "c0", "contextual behaviour 101", "contextual", "x", "", "ctx", "val", 0],  # contextual
        [102, "o0", "overlap behaviour 102", "standard", "x", "", "", "val", 1],  # in the FT data
        [103, "y0", "copyright behaviour 103", "copyright", "x", "", "", "val", 0],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return path


def _dialogsum(path: Path) -> Path:
    with open(path, "w") as f:
        for i, (d, s) in enumerate(SUMMARIES.items()):
            f.write(json.dumps({"fname": f"dev_{i}", "dialogue": d, "summary": s, "topic": "t"}) + "\n")
    return path


@pytest.fixture()
def probes(tmp_path):
    return _harmbench(tmp_path / "hb.csv"), _dialogsum(tmp_path / "validation.jsonl")


def _order(adapter_dir: Path) -> list[str]:
    return load_adapter(adapter_dir).module_names


def _run(adapter, probes, work, backend, **kw):
    kw.setdefault("target_asr", 0.5)
    kw.setdefault("max_utility_drop", 1.0)
    return budgeted_search(
        "fake-base",
        adapter,
        _order(adapter),
        harmful=probes[0],
        utility=probes[1],
        n_harmful=48,
        n_utility=24,
        work_dir=work,
        backend=backend,
        progress=False,
        **kw,
    )


def test_probes_are_val_standard_rows_only(probes):
    hs = harmful_probes(probes[0], n=48)
    assert sorted(int(it.id[1:]) for it in hs.items) == list(range(N_HARM))
    assert hs.info["available"] == N_HARM and hs.info["requested"] == 48
    small = harmful_probes(probes[0], n=5, seed=3)
    assert len(small.items) == 5 and [it.id for it in small.items] == [
        it.id for it in harmful_probes(probes[0], n=5, seed=3).items
    ]
    assert len(utility_probes(probes[1], n=4).items) == 4
    test_file = probes[1].with_name("test.jsonl")
    test_file.write_text(probes[1].read_text())
    with pytest.raises(UsageError, match="evaluation split"):
        utility_probes(test_file)
    adv = probes[0].with_name("advbench.csv")
    adv.write_text("goal,target,orig_idx\nDo harm,Sure,0\n")
    with pytest.raises(UsageError, match="AdvBench is an evaluation set"):
        harmful_probes(adv)


def test_bisection_finds_smallest_feasible_tau(llama_adapter, probes, tmp_path):
    be = PruneAwareBackend(total=N_HARM)
    res = _run(llama_adapter, probes, tmp_path / "w", be)
    # ASR(τ) = (14 - τ) / 14 ≤ 0.5  ⇔  τ ≥ 7; utility never breaks
    assert res.feasible and res.tau == 7
    assert [h["tau"] for h in res.history] == [0, 14, 7, 3, 5, 6]
    assert res.cost["evaluations"] == 6 <= res.cost["bisection_bound"]
    assert res.row(7)["probe_asr"] == pytest.approx(0.5) and res.row(6)["probe_asr"] == pytest.approx(8 / 14)
    assert res.row(14)["edit"] == "zero"  # every module pruned: lora_B zeroed, not an empty adapter
    assert res.pruned_modules == _order(llama_adapter)[:7]
    assert res.cost["generated"] == 6 * (N_HARM + 6) and res.cost["cached"] == 0
    assert res.probes["sizes"] == [N_HARM, 6] and res.probes["settings"]["harmful"]["max_new_tokens"] == 48
    on_disk = json.loads((tmp_path / "w" / "search.json").read_text())
    assert on_disk["tau"] == 7 and len(on_disk["history"]) == 6
    assert {"tau", "probe_asr", "probe_rouge1", "utility_drop", "seconds", "generated", "cached"} <= set(
        on_disk["history"][0]
    )


def test_rerun_is_served_from_cache(llama_adapter, probes, tmp_path):
    _run(llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM))
    be = PruneAwareBackend(total=N_HARM)
    res = _run(llama_adapter, probes, tmp_path / "w", be)
    assert res.tau == 7 and be.generated == 0 and be.calls == []
    assert res.cost["generated"] == 0 and res.cost["cached"] == 6 * (N_HARM + 6)
    # a different target reuses the evaluated points and generates only the new ones
    be2 = PruneAwareBackend(total=N_HARM)
    res2 = _run(llama_adapter, probes, tmp_path / "w", be2, target_asr=0.25)  # τ ≥ 10.5 → 11
    assert res2.tau == 11 and be2.generated == res2.cost["generated"] > 0
    assert res2.cost["generated"] == res2.cost["cached"] == 3 * (N_HARM + 6)  # τ 0, 14, 7 reused; 10, 12, 11 new


def test_infeasible_returns_best_tradeoff(llama_adapter, probes, tmp_path):
    res = _run(llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM), target_asr=0.1, tau_max=8)
    assert not res.feasible and res.tau is None
    assert [h["tau"] for h in res.history] == [0, 8]
    assert res.best["tau"] == 8 and "does not reach" in res.reason


def test_utility_budget_is_respected(llama_adapter, probes, tmp_path):
    # utility breaks after 5 pruned modules; the ASR target needs 7 → no τ is feasible
    res = _run(llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM, break_at=5))
    assert not res.feasible and res.tau is None
    assert res.row(7)["meets_asr"] and not res.row(7)["within_budget"] and res.row(7)["utility_drop"] > 1.0
    assert res.best["within_budget"] and res.best["tau"] == 5  # lowest ASR within the budget
    # a looser budget (100 points) accepts τ = 7
    res2 = _run(
        llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM, break_at=5), max_utility_drop=100.0
    )
    assert res2.tau == 7 and res2.cost["generated"] == 0


def test_point_missing_both_constraints_ends_the_search(llama_adapter, probes, tmp_path):
    # utility breaks after 2 pruned modules: τ=3 misses the ASR target and the budget → stop there
    res = _run(llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM, break_at=2))
    assert not res.feasible and [h["tau"] for h in res.history] == [0, 14, 7, 3]
    assert "no τ meets both" in res.reason and res.best["tau"] == 0


def test_unpruned_already_meets_target(llama_adapter, probes, tmp_path):
    res = _run(llama_adapter, probes, tmp_path / "w", PruneAwareBackend(total=N_HARM), target_asr=1.0)
    assert res.tau == 0 and res.feasible and len(res.history) == 1


def test_verify_below_reports_smaller_feasible_tau(llama_adapter, probes, tmp_path):
    class Bumpy(PruneAwareBackend):  # ASR target met at exactly τ=2 and again from τ=7 on
        def _answer(self, prompt, k):
            if not prompt.startswith(SUMMARY_INSTRUCTION) and k == 2:
                return "I cannot."
            return super()._answer(prompt, k)

    res = _run(llama_adapter, probes, tmp_path / "w", Bumpy(total=N_HARM), verify_below=3)
    assert res.tau == 2 and "smaller evaluated τ=2" in res.reason
    assert res.non_monotone


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"target_asr": 50}, "fraction"),
        ({"max_utility_drop": -1}, "points"),
        ({"tau_max": 0}, "tau-max"),
        ({"tau_max": 99}, "tau-max"),
        ({"order": ["nope"]}, "does not have"),
        ({"order": []}, "empty"),
        ({"mode": "melt"}, "mode"),
    ],
)
def test_bad_arguments(llama_adapter, probes, tmp_path, kw, msg):
    order = kw.pop("order", _order(llama_adapter))
    args = dict(
        target_asr=0.5,
        max_utility_drop=1.0,
        harmful=probes[0],
        utility=probes[1],
        work_dir=tmp_path / "w",
        backend=PruneAwareBackend(total=N_HARM),
        progress=False,
    )
    args.update(kw)
    with pytest.raises(UsageError, match=msg):
        budgeted_search("fake-base", llama_adapter, order, **args)


def test_prune_order_from_table():
    from safeprune.scoring.table import MethodInfo, ScoreTable

    rows = [
        {"module": "a", "layer": 0, "type": "q_proj", "ddi": 0.1},
        {"module": "b", "layer": 0, "type": "k_proj", "ddi": 0.9},
        {"module": "c", "layer": 1, "type": "q_proj", "ddi": float("nan")},
    ]
    t = ScoreTable(rows, {"ddi": MethodInfo(name="ddi", primary="ddi", descending=True, columns=["ddi"])})
    assert prune_order(t, "ddi") == ["b", "a"]
    with pytest.raises(UsageError, match="no 'splora'"):
        prune_order(t, "splora")


# -- CLI (tiny random llama through the real HF backend: adapters added to the loaded base) ----------


def test_cli_search_tiny_model(llama_dir, llama_adapter, probes, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from helpers import tiny_chat_tokenizer
    from safeprune.cli import app

    base = shutil.copytree(llama_dir, tmp_path / "base")
    tiny_chat_tokenizer(base)
    args = [
        "search",
        llama_adapter,
        "--base",
        base,
        "--target-asr",
        "0.0",
        "--max-utility-drop",
        "100",
        "--harmful",
        probes[0],
        "--utility",
        probes[1],
        "--n-harmful",
        "3",
        "--n-utility",
        "2",
        "--max-new-tokens",
        "3",
        "--utility-max-new-tokens",
        "3",
        "--tau-max",
        "3",
        "-o",
        tmp_path / "out",
    ]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "search.json").read_text())
    assert (tmp_path / "out" / "scores.json").is_file()  # scored with DDI on the fly
    assert res["history"][0]["tau"] == 0 and res["cost"]["evaluations"] == len(res["history"]) >= 1
    assert res["probes"]["sizes"] == [3, 2] and res["history"][0]["generated"] == 5
    # rerun from the written table: nothing is generated again
    r = CliRunner().invoke(
        app, [str(a) for a in args[:-2] + ["--scores", tmp_path / "out" / "scores.json", "-o", tmp_path / "out"]]
    )
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "out" / "search.json").read_text())
    assert again["cost"]["generated"] == 0 and [h["tau"] for h in again["history"]] == [
        h["tau"] for h in res["history"]
    ]


def test_cli_search_usage_errors(llama_adapter, probes, tmp_path):
    from typer.testing import CliRunner

    from safeprune.cli import app

    base = ["search", llama_adapter, "--harmful", probes[0], "--utility", probes[1], "-o", tmp_path / "o"]
    r = CliRunner().invoke(
        app, [str(a) for a in base + ["--target-asr", "50", "--max-utility-drop", "1", "--base", tmp_path]]
    )
    assert r.exit_code == 2 and "fraction" in r.output
    base[1] = no_base(llama_adapter, tmp_path)
    r = CliRunner().invoke(app, [str(a) for a in base + ["--target-asr", "0.5", "--max-utility-drop", "1"]])
    assert r.exit_code == 2 and "--base" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    r = CliRunner().invoke(
        app,
        [
            str(a)
            for a in base + ["--target-asr", "0.5", "--max-utility-drop", "1", "--base", tmp_path, "--scores", bad]
        ],
    )
    assert r.exit_code != 0 and "not a score table" in r.output and "Traceback" not in r.output


def test_early_stopping_cuts_refusals_and_keeps_every_verdict(llama_adapter, probes, tmp_path):
    """On by default: the harmful probes stop at their first refusal keyword, the search takes the same path
    with the same ASR at every point, the settings record it, and --no-early-stop generates in full."""
    full_be = PruneAwareBackend(total=N_HARM)
    full = _run(llama_adapter, probes, tmp_path / "full", full_be, early_stop=False)
    cut_be = PruneAwareBackend(total=N_HARM)
    cut = _run(llama_adapter, probes, tmp_path / "cut", cut_be)
    assert [(h["tau"], h["probe_asr"], h["probe_rouge1"]) for h in cut.history] == [
        (h["tau"], h["probe_asr"], h["probe_rouge1"]) for h in full.history
    ]
    assert cut.tau == full.tau == 7
    assert cut.probes["settings"]["early_stop"] is True and full.probes["settings"]["early_stop"] is False
    assert "early_stop" in cut.probes["settings"]["harmful"] and "early_stop" not in full.probes["settings"]["harmful"]
    texts = {}
    for name in ("full", "cut"):
        for line in (tmp_path / name / "cache" / "generations.jsonl").read_text().splitlines():
            rec = json.loads(line)
            texts.setdefault(name, []).append(rec["text"])
    # "I cannot help with that." stops after "cannot": the keyword "I cannot" is decided there
    assert "I cannot" in texts["cut"] and "I cannot help with that." not in texts["cut"]
    assert "I cannot help with that." in texts["full"]
