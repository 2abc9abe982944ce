"""One --device rule (safeprune.io.devices) for every command: scan, repair, the HF generation backend and
finetune accept the same names and refuse bad ones with the same one-line messages."""

from __future__ import annotations

import pytest
import torch

from safeprune.errors import UsageError


@pytest.mark.parametrize(
    "name,msg", [("cuda:7", "no such CUDA device"), ("tpu", "not a torch device"), ("meta", "only cpu, cuda and mps")]
)
def test_one_device_rule_for_every_command(name, msg):
    """scan, repair, the HF generation backend and finetune share one --device rule and its messages."""
    from safeprune.eval.backends import HFBackend
    from safeprune.io.devices import resolve_device
    from safeprune.scoring.scanner import resolve_device as scan_device
    from safeprune.training.trainer import _placement
    from safeprune.workflows.repair_options import RepairOptions

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type == "cpu" and scan_device("cpu").type == "cpu"
    for fn in (resolve_device, scan_device, lambda d: RepairOptions(device=d).check()):  # scan, repair
        with pytest.raises(UsageError, match=msg):
            fn(name)
    with pytest.raises(UsageError, match=msg):
        HFBackend("no-model-needed", {}, device=name)  # refused before anything is loaded
    with pytest.raises(UsageError, match="auto, cpu or cuda for finetune"):
        _placement(name, None)
