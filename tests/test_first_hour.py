"""Issue 14, the first hour of a user: what a newcomer meets at the command line, each with the test that
would have caught it."""

from __future__ import annotations

import json

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
