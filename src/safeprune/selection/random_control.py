"""The random-pruning control: the selection every claim is measured against.

Seed ``s`` orders the module names by ``random.Random(f"safeprune-random:{s}").shuffle(sorted(names))``; the
control at budget τ takes the first τ of that order, so controls are nested across τ (a larger budget
removes a superset) and reproducible from the seed alone.
"""

from __future__ import annotations

import random
from typing import Iterable

RULE = "first tau of random.Random(f'safeprune-random:{seed}').shuffle(sorted(module names))"


def random_order(names: Iterable[str], seed: int) -> list[str]:
    order = sorted(names)
    random.Random(f"safeprune-random:{seed}").shuffle(order)
    return order
