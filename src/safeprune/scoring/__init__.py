"""Stage 2 — scoring: every LoRA module of an adapter → one row of a :class:`ScoreTable`.

``scanner`` walks the modules (reading each weight once, in bounded memory; :func:`scan`); each method in
``methods/`` scores one module; ``params`` declares the methods' options; ``table`` holds, exports and reads
the result; ``linalg`` is the low-rank maths the methods share; ``agreement`` compares the rankings of several
methods.

Importing this package is cheap: ``params`` (what ``--help`` needs) is loaded at once, the rest (torch, the
methods, which register themselves) the first time one of its names is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .params import PARAMETERS, Param

# name -> the submodule that defines it; any of them loads every one of them, methods included (so REGISTRY is
# complete whichever name comes first)
_LAZY = {
    "REGISTRY": ".base",
    "ModuleContext": ".base",
    "Scorer": ".base",
    "get_scorer": ".base",
    "method_names": ".base",
    "register": ".base",
    "scan": ".scanner",
    "resolve_device": ".scanner",
    "scan_threads": ".scanner",
    "ScoreTable": ".table",
    "MethodInfo": ".table",
    "read_score_table": ".table",
    "DEFAULT_TOP": ".table",
}

__all__ = ["PARAMETERS", "Param", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".methods", __name__)  # registers every method
    for attr, module in _LAZY.items():
        globals()[attr] = getattr(importlib.import_module(module, __name__), attr)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(__all__)
