"""Stage 1b — weight sources: the base (and aligned/unaligned) model's tensors, read lazily one at a time
from safetensors (single, sharded), GGUF or the hub cache, under Hugging Face names."""

from .base import WeightSource
from .gguf import GGUFSource
from .hub import cached_hub_snapshot, looks_like_hub_id, resolve_hub_id
from .keys import (
    base_key_for,
    check_modules_present,
    module_weight_key,
    name_candidates,
    read_module_weight,
    read_weight_and_norm,
)
from .norms import checked_fro_norm, fro_norm64
from .open import open_dir, open_weights
from .resolve import ModelRef, base_from_adapter, resolve_model
from .safetensors import SafetensorsSource

__all__ = [
    "WeightSource",
    "GGUFSource",
    "SafetensorsSource",
    "open_weights",
    "open_dir",
    "looks_like_hub_id",
    "resolve_hub_id",
    "cached_hub_snapshot",
    "ModelRef",
    "resolve_model",
    "base_from_adapter",
    "base_key_for",
    "check_modules_present",
    "module_weight_key",
    "name_candidates",
    "read_module_weight",
    "read_weight_and_norm",
    "checked_fro_norm",
    "fro_norm64",
]
