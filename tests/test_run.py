"""`safeprune run`: experiment file validation, the stage cache, the random control, analysis and report,
on a tiny random model with a fake generation backend (rule: harmful prompt i is refused exactly when the
variant removed module i mod M of the adapter's sorted module list)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from tests.helpers import make_adapter, make_model

from safeprune.errors import InputError
from safeprune.eval.backends import FakeBackend
from safeprune.workflows.experiment import load_config, run_experiment
from safeprune.workflows.experiment.analysis import risk_coverage


def _csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    base = make_model(d / "base", layers=4)
    make_adapter(base, d / "lora", targets=["q_proj", "v_proj", "o_proj"])
    _csv(
        d / "harmful_behaviors.csv",
        ["orig_idx", "goal", "target", "in_jbb_harmful_ft"],
        [[i, f"harmful request {i}", "Sure", 0] for i in range(24)],
    )
    _csv(
        d / "xs.csv",
        ["id", "prompt", "type", "label", "focus", "note"],
        [[i, f"benign question {i}", "homonyms", "safe", "x", ""] for i in range(10)],
    )
    (d / "test.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "fname": f"test_{i}",
                    "dialogue": f"#P1#: talk {i}",
                    "summary1": f"they talk about item {i}",
                    "summary2": "",
                    "summary3": "",
                    "topic1": "t",
                    "topic2": "",
                    "topic3": "",
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    (d / "hotpot.jsonl").write_text(
        "".join(
            json.dumps({"orig_idx": i, "question": f"question {i}?", "answer": f"answer {i}", "type": "bridge"}) + "\n"
            for i in range(6)
        )
    )
    return d


def _pruned(path: str | None) -> set[str]:
    if path is None:
        return set()
    p = Path(path) / "safeprune.json"
    if not p.exists():
        return set()
    return set((json.loads(p.read_text()).get("edit") or {}).get("modules") or [])


def _factory(modules: list[str]):
    def make(base, adapters):
        def responder(path):
            gone = _pruned(path)

            def f(prompt):
                if prompt.startswith("harmful"):
                    i = int(prompt.split()[-1])
                    return "I cannot help with that" if modules[i % len(modules)] in gone else "Sure, here it is"
                if prompt.startswith("benign"):
                    return "Sure"
                if prompt.endswith("?"):  # QA: the adapter answers questions 0-3; pruning module 0 loses 0-1
                    i = int(prompt.rsplit(" ", 1)[-1][:-1])
                    return f"Answer: answer {i}" if i < 4 and not (i < 2 and modules[0] in gone) else "no idea"
                return prompt.replace("Summarize this dialogue:\n#P1#: talk", "they talk about item")

            return f

        resp = {None: lambda p: "I cannot help" if p.startswith("harmful") else "ok"}
        resp.update({n: responder(p) for n, p in adapters.items()})
        return FakeBackend("fake-base", adapters, resp)

    return make


def _config(d: Path, **over) -> Path:
    cfg = {
        "name": "tiny",
        "base": "base",
        "adapters": {"lora": "lora"},
        "methods": [{"name": "ddi", "taus": [2, 4]}],
        "random": {"seeds": [0, 1, 2]},
        "evaluation": {
            "safety": [{"path": "harmful_behaviors.csv"}],
            "over_refusal": [{"path": "xs.csv"}],
            "utility": [{"path": "test.jsonl", "limit": 6}],
            "meteor": False,
            "bootstrap": 500,
            "batch_size": 8,
        },
        "latency": {"enabled": True, "n_prompts": 2, "max_new_tokens": 4},
    }
    cfg.update(over)
    p = d / f"exp_{len(list(d.glob('exp_*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_config_errors_name_the_file_and_field(world):
    bad = world / "bad.yaml"
    bad.write_text(
        "name: x\nbase: base\nadapters: {lora: lora}\nmethods: [{name: ddi, taus: [-1]}]\n"
        "evaluation: {safety: [{path: harmful_behaviors.csv}]}\n"
    )
    with pytest.raises(InputError, match=r"bad\.yaml.*methods\.0\.taus"):
        load_config(bad)
    bad.write_text(
        "name: x\nbase: base\nadapters: {lora: lora}\nmethods: [{name: safelora}]\n"
        "evaluation: {safety: [{path: harmful_behaviors.csv}]}\n"
    )
    with pytest.raises(InputError, match="unaligned"):
        load_config(bad)
    bad.write_text("name: x\nbase: base\nadapters: {lora: lora}\nmethods: [{name: ddi}]\nevaluation: {}\nbogus: 1\n")
    with pytest.raises(InputError, match="evaluation|bogus"):
        load_config(bad)
    # repairs: options are RepairOptions fields with valid values, strengths in (0, 1], names unique
    ev = "evaluation: {safety: [{path: harmful_behaviors.csv}]}\n"
    for repairs, msg in (
        ("[{options: {stepz: 3}}]", r"bad\.yaml.*repairs\.0\.options.*unknown repair option.*stepz"),
        ("[{options: {steps: 0}}]", r"bad\.yaml.*repairs\.0\.options.*--steps must be an integer >= 1"),
        ("[{strengths: [1.5]}]", r"bad\.yaml.*repairs\.0\.strengths.*strength is in \(0, 1\]"),
        ("[{name: ddi}]", r"bad\.yaml.*repair names must be unique and differ from the method names"),
    ):
        bad.write_text(
            f"name: x\nbase: base\nadapters: {{lora: lora}}\nmethods: [{{name: ddi}}]\nrepairs: {repairs}\n" + ev
        )
        with pytest.raises(InputError, match=msg):
            load_config(bad)
    # batch sizes: auto (the default) or a positive integer
    for bs, ok in (("auto", True), ("64", True), ("0", False), ("lots", False)):
        bad.write_text(
            "name: x\nbase: base\nadapters: {lora: lora}\nmethods: [{name: ddi}]\n"
            f"evaluation: {{safety: [{{path: harmful_behaviors.csv}}], batch_size: {bs}, utility_batch_size: {bs}}}\n"
        )
        if ok:
            e = load_config(bad).evaluation
            assert e.batch_size == e.utility_batch_size == (bs if bs == "auto" else int(bs))
        else:
            with pytest.raises(InputError, match=r"bad\.yaml.*evaluation\.batch_size"):
                load_config(bad)
    bad.write_text("name: x\nbase: base\nadapters: {lora: lora}\n" + ev)
    with pytest.raises(InputError, match=r"at least one method \(methods:\) or repair \(repairs:\)"):
        load_config(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="YAML"):
        load_config(bad)
    with pytest.raises(InputError, match="not found"):
        load_config(world / "missing.yaml")


def test_config_resolves_paths_relative_to_the_file(world):
    cfg = load_config(_config(world))
    assert cfg.base == str((world / "base").resolve())
    assert cfg.adapters["lora"] == str((world / "lora").resolve())
    assert cfg.aligned == cfg.base
    assert cfg.methods[0].action == "prune" and cfg.methods[0].method == "ddi"


def test_run_end_to_end_and_cache(world, tmp_path):
    from safeprune.adapter import load_adapter

    modules = sorted(load_adapter(world / "lora").modules)
    cfg = _config(world)
    logs: list[str] = []
    res = run_experiment(cfg, tmp_path / "out", backend=_factory(modules), log=logs.append, progress=False)
    out = tmp_path / "out"
    for f in (
        "report.md",
        "report.html",
        "analysis.json",
        "variants.json",
        "latency.json",
        "eval/results.json",
        "scores/lora/ddi.json",
    ):
        assert (out / f).is_file(), f
    a = res.analysis["adapters"]["lora"]
    names = [r["variant"]["name"] for r in a["rows"]]
    assert names[0] == "lora" and "lora:ddi@2" in names and "lora:ddi@4" in names
    # the random control: 3 seeds at every τ the methods used, nested prefixes of one permutation per seed
    rnd = {r["variant"]["name"]: r["variant"] for r in a["rows"] if r["variant"]["method"] == "random"}
    assert set(rnd) == {f"lora:random-s{s}@{t}" for s in (0, 1, 2) for t in (2, 4)}
    for s in (0, 1, 2):
        assert rnd[f"lora:random-s{s}@4"]["selected"][:2] == rnd[f"lora:random-s{s}@2"]["selected"]
    assert rnd["lora:random-s0@4"]["selected"] != rnd["lora:random-s1@4"]["selected"]

    # every ASR equals the fake rule computed directly
    def asr(pruned: set[str]) -> float:
        return 100 * np.mean([modules[i % len(modules)] not in pruned for i in range(24)])

    for r in a["rows"]:
        v = r["variant"]
        assert r["metrics"]["advbench/asr"]["value"] == pytest.approx(asr(set(v["selected"])))
        lo, hi = r["metrics"]["advbench/asr"]["lo"], r["metrics"]["advbench/asr"]["hi"]
        assert lo <= r["metrics"]["advbench/asr"]["value"] <= hi
    ddi2 = next(r for r in a["rows"] if r["variant"]["name"] == "lora:ddi@2")
    rmean = np.mean([asr(set(rnd[f"lora:random-s{s}@2"]["selected"])) for s in (0, 1, 2)])
    assert ddi2["vs_random"]["advbench/asr"]["delta"] == pytest.approx(asr(set(ddi2["variant"]["selected"])) - rmean)
    assert ddi2["vs_random"]["advbench/asr"]["n_random"] == 3
    assert ddi2["vs_ref"]["advbench/asr"]["delta"] == pytest.approx(asr(set(ddi2["variant"]["selected"])) - 100.0)
    # flips: every pruned module's prompts flipped to refused
    assert len(a["flips"]["lora:ddi@2"]["now_refused"]) == sum(
        modules[i % len(modules)] in ddi2["variant"]["selected"] for i in range(24)
    )
    # report content
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Does the score beat chance?" in md and "random τ=2 (mean of 3)" in md
    # the second refusal judge: its own column beside the 29-string ASR, never averaged
    assert "ASR % (broad judge)" in md and "advbench/asr_broad" in a["rows"][0]["metrics"]
    # one name per variant in every table ("ddi τ=2"); the results' key only in its own column, as code
    assert "ddi τ=2" in md and md.count("lora:ddi@2") == md.count("`lora:ddi@2`") >= 1
    assert "data:image/png;base64," in html and "<table>" in html
    assert list((out / "plots").glob("*.png"))
    # params kept: removal of τ modules of equal shape-class
    assert 0 < ddi2["variant"]["params_kept"] < 1

    # rerun: everything cached — no scoring, no editing, no generation
    logs.clear()
    res2 = run_experiment(cfg, tmp_path / "out", backend=_factory(modules), log=logs.append, progress=False)
    text = "\n".join(logs)
    assert "score lora × ddi: up to date" in text and "0 generations made now" in text
    assert "latency: up to date" in text
    assert res2.analysis["adapters"]["lora"]["rows"][1]["metrics"] == a["rows"][1]["metrics"]

    # a new τ: only the new variants are edited and generated (one DDI, three random)
    cfg3 = _config(world, methods=[{"name": "ddi", "taus": [2, 4, 6]}])
    logs.clear()
    run_experiment(cfg3, tmp_path / "out", backend=_factory(modules), log=logs.append, progress=False)
    text = "\n".join(logs)
    assert "score lora × ddi: up to date" in text
    made = int(text.split(" generations made now")[0].split()[-1])
    assert made == 4 * (24 + 10 + 6)


def test_output_inside_an_input_is_refused(world):
    from safeprune.errors import OutputError

    with pytest.raises(OutputError, match="inside an input"):
        run_experiment(
            _config(world), world / "lora" / "out", backend=_factory(["x"]), progress=False, log=lambda m: None
        )
    assert not (world / "lora" / "out").exists()


def test_unset_environment_variable_is_an_error(world, monkeypatch):
    monkeypatch.delenv("SAFEPRUNE_SURELY_UNSET", raising=False)
    p = _config(world, base="${SAFEPRUNE_SURELY_UNSET}/base")
    with pytest.raises(InputError, match=r"exp_\d+\.yaml.*SAFEPRUNE_SURELY_UNSET is not set"):
        load_config(p)
    monkeypatch.setenv("SAFEPRUNE_SURELY_UNSET", str(world))
    assert load_config(p).base == str((world / "base").resolve())
    p = _config(world, base="${SAFEPRUNE_SURELY_UNSET_2:-" + str(world) + "}/base")
    assert load_config(p).base == str((world / "base").resolve())


def test_risk_coverage_curve():
    items = [{"mean_nll": u, "rouge1": a} for u, a in [(0.1, 1.0), (0.2, 0.5), (0.9, 0.0), (0.5, 0.2)]]
    rc = risk_coverage(items, points=4)
    assert rc["refer"][0] == 0.0 and rc["accuracy"][0] == pytest.approx(100 * 1.7 / 4)
    rc = risk_coverage(items, threshold=0.15, points=2)
    assert rc["accuracy"][-1] == pytest.approx(100.0)  # only the most confident one left


def test_cli_check_only_and_errors(world):
    from typer.testing import CliRunner

    from safeprune.cli import app

    runner = CliRunner()
    cfg = _config(world)
    r = runner.invoke(app, ["run", str(cfg), "-o", str(world / "o"), "--check"])
    assert r.exit_code == 0 and '"name": "tiny"' in r.output
    r = runner.invoke(app, ["run", str(cfg), "-o", str(world / "o"), "--check", "--only", "lora"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["run", str(cfg), "-o", str(world / "o"), "--only", "nope"])
    assert r.exit_code == 2 and "unknown adapter" in r.output
    bad = world / "bad2.yaml"
    bad.write_text("name: x\n")
    r = runner.invoke(app, ["run", str(bad), "-o", str(world / "o")])
    assert r.exit_code == 2 and "bad2.yaml" in r.output and not (world / "o").exists()


def test_random_controls_on_some_kinds_only(world, tmp_path):
    from safeprune.adapter import load_adapter

    modules = sorted(load_adapter(world / "lora").modules)
    cfg = _config(
        world,
        random={"seeds": [0, 1], "kinds": ["safety"]},
        methods=[{"name": "ddi", "taus": [2]}],
        latency={"enabled": False},
    )
    logs: list[str] = []
    res = run_experiment(cfg, tmp_path / "o", backend=_factory(modules), log=logs.append, progress=False)
    a = res.analysis["adapters"]["lora"]
    rows = {r["variant"]["name"]: r for r in a["rows"]}
    assert "dialogsum_test/rouge1" not in rows["lora:random-s0@2"]["metrics"]
    assert "advbench/asr" in rows["lora:random-s0@2"]["metrics"]
    assert "dialogsum_test/rouge1" in rows["lora:ddi@2"]["metrics"]
    assert set(rows["lora:ddi@2"]["vs_random"]) == {"advbench/asr", "advbench/asr_broad"}
    # 3 main variants (base, lora, ddi@2) × 40 prompts + 2 controls × 24 safety prompts
    assert "168 generations made now" in "\n".join(logs)
    results = json.loads((tmp_path / "o" / "eval" / "results.json").read_text())
    assert results["controls_sets"]["sets"] == ["advbench"]
    assert (tmp_path / "o" / "report.html").is_file()


def test_automatic_tau_variants(world, tmp_path):
    from safeprune.adapter import load_adapter
    from safeprune.scoring.table import ScoreTable
    from safeprune.selection.autotau import auto_tau

    modules = sorted(load_adapter(world / "lora").modules)
    cfg = _config(
        world,
        random={"seeds": [0], "kinds": ["safety"]},
        methods=[{"name": "ddi", "taus": ["knee", "mad", 3], "mad_k": 1.0}],
        latency={"enabled": False},
    )
    res = run_experiment(cfg, tmp_path / "o", backend=_factory(modules), log=lambda m: None, progress=False)
    table = ScoreTable.from_dict(json.loads((tmp_path / "o" / "scores" / "lora" / "ddi.json").read_text()))
    want = {r: auto_tau(table.column("ddi"), True, r, 1.0).tau for r in ("knee", "mad")}
    auto = res.analysis["auto_tau"]["lora"]["ddi"]
    assert {r: d["tau"] for r, d in auto.items()} == want
    rows = [r["variant"] for r in res.analysis["adapters"]["lora"]["rows"] if r["variant"]["method"] == "ddi"]
    for rule, tau in want.items():
        v = next(v for v in rows if v["tau"] == tau)
        assert rule in v["auto"] and len(v["selected"]) == tau
    assert (tmp_path / "o" / "plots" / "lora_ddi_auto_tau.png").is_file()
    assert "Automatic τ" in (tmp_path / "o" / "report.md").read_text()


def test_finetune_stage_trains_once_then_reuses(tmp_path):
    from tests.test_finetune import KW, WORDS, make_tokenizer

    d = tmp_path
    make_model(d / "base", "llama", layers=2, hidden=32)
    make_tokenizer(d / "base")
    rows = [
        {"fname": f"train_{i}", "dialogue": " ".join(WORDS[i % 7 : i % 7 + 4]), "summary": WORDS[i % 11]}
        for i in range(8)
    ]
    (d / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _csv(
        d / "harmful_behaviors.csv",
        ["orig_idx", "goal", "target", "in_jbb_harmful_ft"],
        [[i, f"harmful request {i}", "Sure", 0] for i in range(6)],
    )
    opts = {k: v for k, v in KW.items() if k not in ("progress",)}
    cfg = {
        "name": "ft",
        "base": "base",
        "finetune": [{"name": "ft1", "data": "task.jsonl", "options": {**opts, "epochs": 1, "seed": 3}}],
        "methods": [{"name": "ddi", "taus": [1]}],
        "random": {"seeds": [0]},
        "evaluation": {"safety": [{"path": "harmful_behaviors.csv"}], "meteor": False, "bootstrap": 100},
        "latency": {"enabled": False},
    }
    p = d / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    logs: list[str] = []

    def fake(base, adapters):
        return FakeBackend("fake-base", adapters, {n: (lambda q: "Sure") for n in adapters})

    res = run_experiment(p, d / "out", backend=fake, log=logs.append, progress=False)
    assert (d / "out" / "adapters" / "ft1" / "adapter_model.safetensors").is_file()
    assert any(line.startswith("finetune ft1: done") for line in logs)
    assert [r["variant"]["name"] for r in res.analysis["adapters"]["ft1"]["rows"]][:2] == ["ft1", "ft1:ddi@1"]
    logs.clear()
    run_experiment(p, d / "out", backend=fake, log=logs.append, progress=False)
    assert "finetune ft1: up to date" in logs


def test_qa_column_and_sampled_uncertainty_in_the_report(world, tmp_path):
    from safeprune.adapter import load_adapter

    modules = sorted(load_adapter(world / "lora").modules)
    ev = yaml.safe_load(_config(world).read_text())["evaluation"]
    ev["qa"] = [{"path": "hotpot.jsonl"}]
    ev["uncertainty"] = "sampled"
    ev["uq_samples"] = 2
    cfg = _config(
        world, evaluation=ev, methods=[{"name": "ddi", "taus": [2]}], random={"seeds": [0]}, latency={"enabled": False}
    )
    logs: list[str] = []
    res = run_experiment(cfg, tmp_path / "o", backend=_factory(modules), log=logs.append, progress=False)
    a = res.analysis["adapters"]["lora"]
    rows = {r["variant"]["name"]: r for r in a["rows"]}
    m = rows["lora"]["metrics"]
    assert m["hotpotqa/em"]["value"] == pytest.approx(400 / 6) and m["hotpotqa/f1"]["value"] == pytest.approx(400 / 6)
    assert m["hotpotqa/em"]["lo"] <= m["hotpotqa/em"]["value"] <= m["hotpotqa/em"]["hi"]
    assert "hotpotqa/auarc" in m and "dialogsum_test/bleu_corpus" in m and "dialogsum_test/bleu" in m
    pruned_first = modules[0] in rows["lora:ddi@2"]["variant"]["selected"]
    assert rows["lora:ddi@2"]["vs_ref"]["hotpotqa/em"]["delta"] == pytest.approx(-200 / 6 if pruned_first else 0.0)
    assert "hotpotqa/f1" in rows["lora:ddi@2"]["vs_random"]
    # the cost of the sampled uncertainty is logged before the evaluation runs
    text = "\n".join(logs)
    assert "sampled uncertainty: 2 samples × 12 items × 4 variants = 96 extra generations" in text
    assert text.index("sampled uncertainty") < text.index("evaluate:")
    report = (tmp_path / "o" / "report.md").read_text()
    for col in ("hotpotqa SR (EM) %", "hotpotqa F1", "| BLEU |", "ΔQA F1 vs adapter", "entropy over clusters"):
        assert col in report, col
    # the second refusal judge's column and the results-key column sit beside the QA/BLEU columns
    assert "ASR % (broad judge)" in report and "name in the results files" in report
    # every table row has as many cells as its header
    tables = [[ln for ln in b.splitlines() if ln.startswith("|")] for b in report.split("\n\n")]
    tables = [t for t in tables if t]
    assert len(tables) >= 3
    for t in tables:
        assert len({ln.count("|") for ln in t}) == 1, t[0]


def test_estimate_counts_generations_and_times_a_warm_up(world):
    from typer.testing import CliRunner

    from safeprune.cli import app
    from safeprune.workflows.experiment import estimate_experiment

    over = dict(
        random={"seeds": [0, 1], "kinds": ["safety"]},
        methods=[{"name": "ddi", "taus": [2]}],
        latency={"enabled": False},
    )
    cfg = _config(world, **over)
    be = FakeBackend("fake-base", {}, {None: lambda p: "I cannot help" if p.startswith("harmful") else "ok"})
    res = estimate_experiment(load_config(cfg), backend=be)
    # the same count the run itself logs (test above): 3 main variants × 40 prompts + 2 controls × 24
    assert res["generations"] == 168
    assert res["variants"] == {
        "base": 1,
        "adapters": 1,
        "edited": 1,
        "random_controls": 2,
        "repaired": 0,
        "repair_controls": 0,
    }
    assert {r["kind"]: r["generations"] for r in res["kinds"]} == {"safety": 120, "over_refusal": 30, "utility": 18}
    assert res["early_stop"].startswith("on") and be.calls  # the warm-up generated on the base
    # the command line: a fake backend in the experiment file, nothing else run
    cfg2 = _config(world, **over, evaluation={**yaml.safe_load(cfg.read_text())["evaluation"], "backend": "fake"})
    r = CliRunner().invoke(app, ["run", str(cfg2), "-o", str(world / "est"), "--estimate"])
    assert r.exit_code == 0, r.output
    assert "168 generations" in r.output and "min" in r.output and not (world / "est").exists()


def test_run_evaluate_stage_reports_generation_progress(world, tmp_path, monkeypatch, capsys):
    """`run`'s evaluate stage draws the same per-variant, per-set bar as `eval` (off a terminal: a plain line
    with the counts); progress=False draws nothing."""
    import safeprune.io.progress as pg
    from safeprune.adapter import load_adapter

    monkeypatch.setattr(pg, "LOG_EVERY", 0.0)  # off a terminal: a line at every update
    modules = sorted(load_adapter(world / "lora").modules)
    for progress in (True, False):
        run_experiment(
            _config(world),
            tmp_path / f"out-{progress}",
            backend=_factory(modules),
            log=lambda s: None,
            progress=progress,
            stop_after="evaluate",
        )
        err = capsys.readouterr().err
        if progress:
            assert "generating: " in err and "/" in err.split("generating: ", 1)[1].splitlines()[0]
        else:
            assert "generating: " not in err
