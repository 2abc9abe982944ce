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
