"""safeprune: find and remove the parts of a LoRA adapter that break a model's safety alignment."""

from .adapter import LoraAdapter, LoraModule, load_adapter
from .api import project, prune
from .edit import prune_modules, replace_lora_B
from .errors import SafepruneError
from .eval import compare, evaluate
from .scoring import scan
from .scoring.table import ScoreTable
from .selection import Selection, select
from .version import __version__
from .weights import open_weights

__all__ = [
    "LoraAdapter",
    "LoraModule",
    "load_adapter",
    "open_weights",
    "scan",
    "select",
    "prune",
    "project",
    "prune_modules",
    "replace_lora_B",
    "ScoreTable",
    "Selection",
    "SafepruneError",
    "__version__",
    "evaluate",
    "compare",
]
