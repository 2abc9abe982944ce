"""Per-module scorers and their registry.

A scorer turns one :class:`~safeprune.adapter.LoraModule` (plus the weights it needs, read lazily through
a :class:`ModuleContext`) into a dict of named numbers. Each scorer names its *primary* column, the one
selection ranks by, and whether a high value means "prune first" (``descending``).

New methods register with :func:`register` and are then available to ``safeprune scan --method NAME``.
"""

from .base import REGISTRY, ModuleContext, Scorer, get_scorer, register  # noqa: F401
from . import ddi  # noqa: F401  (registers "ddi")
from . import safelora  # noqa: F401,E402  (registers "safelora")
from . import splora  # noqa: F401,E402  (registers "splora")
