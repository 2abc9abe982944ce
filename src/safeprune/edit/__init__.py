"""Stage 4 — edits: act on the selected modules (prune: remove or zero them; project: SafeLoRA's
lora_B ← C·lora_B) and record what was done in a ``safeprune.json`` manifest. ``pipeline`` is the one
score → select → edit → manifest path behind ``safeprune.prune`` and ``safeprune.project``."""

from .components import component_energy, component_svd, gate_components, orthogonalise, project_out, remove_components
from .manifest import build_manifest, describe_source
from .pipeline import as_adapter, default_edit, project, prune
from .project import project_modules
from .prune import PRUNE_MODES, prune_modules, replace_lora_B

__all__ = [
    "prune",
    "project",
    "prune_modules",
    "replace_lora_B",
    "project_modules",
    "build_manifest",
    "describe_source",
    "default_edit",
    "as_adapter",
    "PRUNE_MODES",
    "orthogonalise",
    "gate_components",
    "remove_components",
    "project_out",
    "component_svd",
    "component_energy",
]
