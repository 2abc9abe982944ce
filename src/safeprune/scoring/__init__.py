"""Stage 2 — scoring: every LoRA module of an adapter → one row of a :class:`ScoreTable`.

``scan`` walks the modules (reading each weight once, in bounded memory); each method in ``methods/``
scores one module; ``table`` holds, exports and reads the result; ``linalg`` is the low-rank maths the
methods share; ``agreement`` compares the rankings of several methods.
"""

from .base import (
    REGISTRY,
    ModuleContext,
    Param,
    Scorer,
    get_scorer,
    method_names,
    register,
)
from .scan import resolve_device, scan, scan_threads
from .table import DEFAULT_TOP, MethodInfo, ScoreTable, read_score_table

__all__ = [
    "REGISTRY",
    "ModuleContext",
    "Param",
    "Scorer",
    "get_scorer",
    "method_names",
    "register",
    "scan",
    "resolve_device",
    "scan_threads",
    "ScoreTable",
    "MethodInfo",
    "read_score_table",
    "DEFAULT_TOP",
]
