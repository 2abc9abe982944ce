"""`safeprune run` on the real testbed (slow): a few prompts per set, DDI τ = 10 against 2 random seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.helpers import TESTBED_MODELS

SHARED = Path(__file__).resolve().parents[2] / "shared"
pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    not (TESTBED_MODELS / "aligned").is_dir() or not (SHARED / "testbed").is_dir(),
    reason="needs the testbed models (SAFEPRUNE_TESTBED_MODELS) and ../shared",
)
def test_run_on_the_testbed(tmp_path):
    from safeprune.workflows.experiment import run_experiment

    data = SHARED / "data"
    cfg = {
        "name": "testbed smoke",
        "base": str(TESTBED_MODELS / "aligned"),
        "unaligned": str(TESTBED_MODELS / "unaligned"),
        "adapters": {"mix_s0": str(SHARED / "testbed" / "adapters" / "mix_s0")},
        "methods": [{"name": "ddi", "taus": [10]}, {"name": "safelora", "taus": [10]}],
        "random": {"seeds": [0, 1], "kinds": ["safety"]},
        "evaluation": {
            "safety": [{"path": str(data / "advbench" / "harmful_behaviors.csv"), "limit": 6}],
            "over_refusal": [{"path": str(data / "xstest" / "xstest_prompts.csv"), "limit": 3}],
            "utility": [{"path": str(data / "dialogsum" / "test.jsonl"), "limit": 2}],
            "safety_max_new_tokens": 16,
            "utility_max_new_tokens": 16,
            "batch_size": 8,
            "threads": 1,
            "bootstrap": 200,
        },
        "latency": {"n_prompts": 1, "max_new_tokens": 4},
    }
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    res = run_experiment(p, tmp_path / "out", progress=False, log=lambda m: None)
    a = res.analysis["adapters"]["mix_s0"]
    names = [r["variant"]["name"] for r in a["rows"]]
    assert names[:3] == ["mix_s0", "mix_s0:ddi@10", "mix_s0:safelora@10"]
    ddi = a["rows"][1]["variant"]
    assert ddi["selected"][:2] == ["model.layers.0.self_attn.o_proj", "model.layers.27.self_attn.o_proj"]
    assert a["rows"][2]["variant"]["params_kept"] == 1.0  # SafeLoRA projects, keeps every module
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
