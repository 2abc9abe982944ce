"""Real-model run of the pair methods on the testbed (SmolLM2-135M aligned/unaligned pair, mix_s0 adapter):
every method scores all modules and writes an adapter that PEFT loads. Slow: `make test-slow`."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    TESTBED,
    TESTBED_MODELS,  # noqa: E402
)

ALIGNED = TESTBED_MODELS / "aligned"
UNALIGNED = TESTBED_MODELS / "unaligned"
_TB = TESTBED
ADAPTER = _TB / "adapters" / "mix_s0"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ALIGNED.is_dir() and UNALIGNED.is_dir() and ADAPTER.is_dir()), reason="testbed models not built"
    ),
]


@pytest.fixture(scope="module")
def table():
    import safeprune

    return safeprune.scoring.scan(ADAPTER, ALIGNED, "all", aligned=ALIGNED, unaligned=UNALIGNED)


def test_all_methods_score_every_module(table):
    assert len(table) == 120 and set(table.methods) == {"ddi", "safelora", "splora"}
    for col in ("ddi", "cos", "ediem"):
        vals = table.column(col)
        assert all(v == v for v in vals), col  # no NaN
    assert all(0.0 <= c <= 1.0 for c in table.column("cos"))
    assert len(table.meta["agreement"]) == 3


@pytest.mark.parametrize("method", ["safelora", "splora", "ddi"])
def test_edited_adapter_loads_in_peft(tmp_path, table, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import safeprune

    if method == "safelora":
        edited = safeprune.project(ADAPTER, ALIGNED, UNALIGNED, table=table, top=10)
    else:
        edited = safeprune.prune(
            ADAPTER, ALIGNED, method=method, table=table, top=10, aligned=ALIGNED, unaligned=UNALIGNED
        )
    out = edited.save(tmp_path / method)
    man = json.loads((out / "safeprune.json").read_text())
    assert len(man["edit"]["modules"]) == 10
    model = AutoModelForCausalLM.from_pretrained(ALIGNED, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(out))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(pm(input_ids=ids).logits).all()
