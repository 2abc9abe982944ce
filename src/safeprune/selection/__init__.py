"""Stage 3 — selection: which modules to act on, from a score table (top τ, a threshold, or an automatic
τ from the shape of the scores), recorded as a :class:`Selection` with a reason per module."""

from .autotau import RULES, AutoTau, auto_tau, knee, mad
from .random_control import RULE as RANDOM_RULE
from .random_control import random_order
from .rules import DEFAULT_TOP, Selection, SelectionRule, select

__all__ = [
    "select",
    "Selection",
    "SelectionRule",
    "DEFAULT_TOP",
    "auto_tau",
    "AutoTau",
    "knee",
    "mad",
    "RULES",
    "random_order",
    "RANDOM_RULE",
]
