"""safeprune: find and remove the parts of a LoRA adapter that break a model's safety alignment."""

from .adapter import LoraAdapter, LoraModule, load_adapter
from .api import project, prune
from .edits import prune_modules, replace_lora_B
from .eval import compare, evaluate
from .errors import SafepruneError
from .scan import scan
from .selection import Selection, select
from .sources import open_weights
from .table import ScoreTable

__version__ = "0.1.0"

__all__ = [
    "LoraAdapter", "LoraModule", "load_adapter", "open_weights", "scan", "select", "prune", "project",
    "prune_modules", "replace_lora_B", "ScoreTable", "Selection", "SafepruneError", "__version__",
    "evaluate", "compare",
]
