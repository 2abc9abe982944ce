"""Real-model checks on ../shared/testbed (slow: needs the aligned model built by build_models.py).

Set SAFEPRUNE_TESTBED_MODELS to the directory given to build_models.py --out (default /work/models).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import safeprune
from safeprune.sources import open_weights

from helpers import TESTBED
from reference import dense_ddi

MODELS = Path(os.environ.get("SAFEPRUNE_TESTBED_MODELS", "/work/models"))
ALIGNED = MODELS / "aligned"
ADAPTER = TESTBED / "adapters" / "mix_s0"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ALIGNED / "config.json").is_file() or not ADAPTER.is_dir(),
                       reason="testbed models not built (python ../shared/testbed/build_models.py --out DIR)"),
]


def test_testbed_scan_matches_dense_reference():
    adapter = safeprune.load_adapter(ADAPTER)
    table = safeprune.scan(adapter, ALIGNED)
    src = open_weights(ALIGNED)
    worst = {k: 0.0 for k in ("S", "O", "M", "ddi")}
    for row in table:
        m = adapter.modules[row["module"]]
        ref = dense_ddi(src.get(row["module"] + ".weight"), m.lora_B, m.lora_A, m.scaling, t=m.r)
        for k in worst:
            worst[k] = max(worst[k], abs(row[k] - ref[k]) / abs(ref[k]))
    assert worst["S"] <= 1e-4 and worst["M"] <= 1e-4
    # O uses a randomized basis of W0's top-8 column space: close to, not equal to, the exact one
    assert worst["O"] <= 1e-2, worst


def test_testbed_prune_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = safeprune.prune(ADAPTER, ALIGNED, top=10).save(tmp_path / "p")
    model = AutoModelForCausalLM.from_pretrained(ALIGNED, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, out)
    n = sum(1 for name, _ in pm.named_modules() if name.endswith("lora_A.default"))
    assert n == 110
    assert len(json.loads((out / "safeprune.json").read_text())["selection"]["selected"]) == 10
