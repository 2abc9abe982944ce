"""Stage 1a — the adapter: a PEFT LoRA directory read into per-module records (:class:`LoraModule`), its
config validated, and written back atomically."""

from .config import pattern_value, scaling_for, validate_config
from .digest import adapter_fingerprint, fingerprint_dir
from .load import build_modules, load_adapter
from .names import (
    ADAPTER_FILES,
    CONFIG_NAME,
    MANIFEST_NAME,
    PEFT_PREFIX,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
)
from .records import (
    MODULE_TYPE_ALIASES,
    LoraAdapter,
    LoraModule,
    iter_module_types,
    parse_lora_key,
    parse_module_types,
)
from .write import COPY_FILES, stage_adapter, write_adapter

__all__ = [
    "LoraAdapter",
    "LoraModule",
    "load_adapter",
    "write_adapter",
    "stage_adapter",
    "build_modules",
    "validate_config",
    "pattern_value",
    "scaling_for",
    "parse_lora_key",
    "parse_module_types",
    "iter_module_types",
    "MODULE_TYPE_ALIASES",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "MANIFEST_NAME",
    "ADAPTER_FILES",
    "COPY_FILES",
    "adapter_fingerprint",
    "fingerprint_dir",
]
