"""The scoring methods, one file each; importing this package registers them all.

A method turns one :class:`~safeprune.adapter.LoraModule` (plus the weights it needs, read lazily through
a :class:`~safeprune.scoring.base.ModuleContext`) into a dict of named numbers. Each names its *primary*
column, the one selection ranks by, and whether a high value means "prune first" (``descending``).

A new method is a new file here with a ``@register``-ed :class:`~safeprune.scoring.base.Scorer` subclass,
plus one import line below; ``safeprune scan --method NAME`` and its CLI flags then follow from it.
``actdir`` (activation-aware, needs a forward pass) lives here too but scores the whole adapter at once.
"""

from . import ddi, safelora, splora  # noqa: F401  (each registers itself)
