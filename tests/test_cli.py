"""The CLI end to end (typer's CliRunner), including one-line errors and exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from helpers import tree_checksums
from safeprune.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_scan_writes_table_json_csv_plot(tmp_path, llama_adapter, llama_dir):
    r = run(
        "scan",
        llama_adapter,
        "--base",
        llama_dir,
        "--json",
        tmp_path / "s.json",
        "--csv",
        tmp_path / "s.csv",
        "--plot",
        tmp_path / "h.png",
        "--seed",
        3,
    )
    assert r.exit_code == 0, r.output
    assert "rank ddi" in r.output and "model.layers.1.mlp.down_proj" in r.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["rows"]) == 14 and {"S", "O", "M", "M_norm", "ddi", "ddi_norm", "rank_ddi"} <= set(data["columns"])
    assert data["methods"]["ddi"]["options"]["seed"] == 3
    csv = (tmp_path / "s.csv").read_text().splitlines()
    assert len(csv) == 15 and csv[0].startswith("module,layer,type")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_cli_top_and_threshold(tmp_path, llama_adapter, llama_dir):
    before = tree_checksums(llama_adapter)
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 4, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "out" / "safeprune.json").read_text())
    assert len(man["selection"]["selected"]) == 4
    r = run(
        "prune",
        llama_adapter,
        "--base",
        llama_dir,
        "--threshold-norm",
        0.0001,
        "--mode",
        "zero",
        "-o",
        tmp_path / "out2",
    )
    assert r.exit_code == 0, r.output
    assert tree_checksums(llama_adapter) == before


def test_existing_output_needs_force(tmp_path, llama_adapter, llama_dir):
    (tmp_path / "out").mkdir()
    r = run("prune", llama_adapter, "--base", llama_dir, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 1, "-o", tmp_path / "out", "--force")
    assert r.exit_code == 0


def test_errors_are_one_line_exit_2(tmp_path, llama_adapter, llama_dir):
    r = run("scan", tmp_path / "missing", "--base", llama_dir)
    assert r.exit_code == 2
    assert "missing" in r.output and "does not exist" in r.output and "Traceback" not in r.output
    r = run("scan", llama_adapter)  # --base defaults to the adapter's base_model_name_or_path (test_first_hour.py)
    assert r.exit_code == 0, r.output
    r = run("scan", llama_adapter, "--base", llama_dir, "--subspace-dim", "abc")
    assert r.exit_code == 2 and "subspace-dim" in r.output
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", 2, "--threshold", 0.1, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "only one" in r.output and not (tmp_path / "x").exists()


def test_debug_shows_traceback(tmp_path, llama_dir):
    r = run("--debug", "scan", tmp_path / "missing", "--base", llama_dir)
    assert r.exit_code != 0 and r.exception is not None


def test_inspect(llama_adapter):
    r = run("inspect", llama_adapter)
    assert r.exit_code == 0 and "14 LoRA modules" in r.output


def test_version_flag():
    from safeprune import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"safeprune {__version__}"


def test_inspect_and_module_sort_put_layer_2_before_layer_10(tmp_path):
    import torch

    from helpers import make_adapter, make_model
    from safeprune.adapter import load_adapter

    base = make_model(tmp_path / "base", "llama", layers=11)
    ad = make_adapter(base, tmp_path / "ad", "llama", r=2, alpha=4, targets=["q_proj"])
    r = CliRunner().invoke(app, ["inspect", str(ad)])
    assert r.exit_code == 0, r.output
    layers = [int(ln.split("layers.")[1].split(".")[0]) for ln in r.stdout.splitlines() if "layers." in ln]
    assert layers == sorted(layers) and layers[:3] == [0, 1, 2]
    r = CliRunner().invoke(app, ["scan", str(ad), "--base", str(base), "--sort", "module"])
    assert r.exit_code == 0, r.output
    layers = [int(ln.split("layers.")[1].split(".")[0]) for ln in r.stdout.splitlines() if "layers." in ln]
    assert layers == sorted(layers)
    assert torch.is_tensor(load_adapter(ad).modules["model.layers.10.self_attn.q_proj"].lora_A)


def test_evaluation_metrics_install_with_the_package():
    """`pip install safeprune` must bring what eval/run need (rouge-score, nltk): a study must not die after
    generating because a metric package is missing."""
    from importlib.metadata import requires

    core = [r for r in (requires("safeprune") or []) if "extra ==" not in r]
    for pkg in ("rouge-score", "nltk", "regex"):
        assert any(r.startswith(pkg) for r in core), (pkg, core)


def test_the_python_api_names_the_readme_uses():
    import safeprune
    import safeprune.training

    for name in (
        "load_adapter",
        "open_weights",
        "scan",
        "select",
        "prune",
        "project",
        "prune_modules",
        "evaluate",
        "compare",
        "run_experiment",
        "budgeted_search",
        "prune_order",
        "ScoreTable",
        "SafepruneError",
        "__version__",
    ):
        assert hasattr(safeprune, name), name
    assert callable(safeprune.training.finetune)


def test_first_hour_messages(tmp_path, llama_adapter, llama_dir):
    """zero mode reports what still acts (not "kept 100%"); scan says where it wrote; prune marks its rows."""
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", "3", "--mode", "zero", "-o", tmp_path / "z")
    assert r.exit_code == 0, r.output
    msg = " ".join(r.stderr.split())
    assert "zeroed 3 of" in msg and "still acting" in msg and "kept: 100.0%" not in msg
    r = run("scan", llama_adapter, "--base", llama_dir, "--json", tmp_path / "s.json")
    assert r.exit_code == 0 and f"wrote {tmp_path / 's.json'}" in "".join(r.stderr.splitlines())
    r = run("prune", llama_adapter, "--base", llama_dir, "--top", "2", "-o", tmp_path / "p")
    assert r.exit_code == 0 and "edited" in r.stdout and r.stdout.count("✕") == 2
