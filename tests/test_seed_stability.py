"""Seed stability of the DDI ranking on the testbed adapter (slow: real SmolLM2-135M weights).

The base ($SAFEPRUNE_TESTBED_MODELS/aligned) is built by ../shared/testbed/build_models.py; the test is skipped where it
or ../shared is absent. Measured figures: benchmarks/results/seed_stability.md.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from helpers import TESTBED

ADAPTER = TESTBED / "adapters" / "mix_s0"  # ../shared beside the checkout
from helpers import TESTBED_MODELS  # noqa: E402

BASE = Path(os.environ.get("SAFEPRUNE_TESTBED_ALIGNED", TESTBED_MODELS / "aligned"))
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_stability.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ADAPTER / "adapter_config.json").is_file() or not (BASE / "config.json").is_file(),
        reason="needs ../shared/testbed/adapters/mix_s0 and the built aligned model",
    ),
]


def _bench():
    spec = importlib.util.spec_from_file_location("seed_stability", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ddi_ranking_is_seed_stable_on_testbed():
    import safeprune

    bench = _bench()
    adapter = safeprune.load_adapter(ADAPTER)
    tables = {s: safeprune.scoring.scan(adapter, BASE, "ddi", seed=s) for s in range(5)}
    res = bench.compare(tables, top=10)
    assert res["modules"] == 120
    assert res["kendall_tau_min"] >= 0.95, res["pairs"]
    assert res["top10_identical_for_all_seeds"], res["top10_by_seed"]
    again = safeprune.scoring.scan(adapter, BASE, "ddi", seed=0)
    assert bench.table_fingerprint(again) == bench.table_fingerprint(tables[0])
