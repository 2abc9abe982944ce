"""safeprune: find and remove the parts of a LoRA adapter that break a model's safety alignment.

The public API (``safeprune.load_adapter``, ``scan``, ``prune``, ``project``, ...) is loaded on first use, so
``import safeprune`` stays cheap (and the executable can answer Ctrl-C during start-up, see ``console.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_API = {
    "LoraAdapter": ".adapter",
    "LoraModule": ".adapter",
    "load_adapter": ".adapter",
    "open_weights": ".weights",
    "scan": ".scoring",
    "ScoreTable": ".scoring",
    "select": ".selection",
    "Selection": ".selection",
    "prune": ".edit",
    "project": ".edit",
    "prune_modules": ".edit",
    "replace_lora_B": ".edit",
    "SafepruneError": ".errors",
    "evaluate": ".eval",
    "compare": ".eval",
    "run_experiment": ".workflows.experiment",
    "budgeted_search": ".workflows.search",
    "prune_order": ".workflows.search",
    "repair": ".workflows.repair",
    "RepairOptions": ".workflows.repair",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'safeprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
