"""The Python API. The CLI (:mod:`safeprune.cli`) is a thin layer over these functions.

import safeprune
adapter = safeprune.load_adapter("my_adapter")
table = safeprune.scan(adapter, base="path/to/base")          # per-module DDI records
pruned = safeprune.prune(adapter, base="path/to/base", top=10)  # edited adapter (+ manifest)
pruned.save("my_adapter-pruned")
"""

from __future__ import annotations

from .adapter import LoraAdapter, load_adapter
from .edit import project, prune, prune_modules
from .scoring import ScoreTable, scan
from .selection import Selection, select
from .workflows.repair import RepairOptions, RepairResult, repair

__all__ = [
    "load_adapter",
    "scan",
    "select",
    "prune",
    "prune_modules",
    "ScoreTable",
    "Selection",
    "LoraAdapter",
    "project",
    "repair",
    "RepairOptions",
    "RepairResult",
]
