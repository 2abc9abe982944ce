"""Edits of an adapter held in memory. Each returns a *new* LoraAdapter; nothing is written here.

* :func:`prune_modules` ``mode="remove"`` (default): drop the modules' tensors and rewrite
  ``target_modules`` as the explicit list of the kept module paths, so PEFT does not re-create the pruned
  layers (and serving does less work); vLLM takes the safetensors keys as its source of truth.
* :func:`prune_modules` ``mode="zero"``: keep every tensor, set ``lora_B`` (and its bias) to zero — the
  DDI/SPLoRA papers' "prune", bit-compatible with the original layout.
* :func:`replace_lora_B`: swap in new ``lora_B`` factors (used by projection methods such as SafeLoRA).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Iterable

import torch

from ..adapter import LoraAdapter, LoraModule
from ..errors import UsageError

PRUNE_MODES = ("remove", "zero")


def _check_names(adapter: LoraAdapter, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in adapter.modules]
    if missing:
        raise UsageError(f"not LoRA modules of this adapter: {', '.join(missing[:5])}")
    return names


def prune_modules(adapter: LoraAdapter, names: Iterable[str], mode: str = "remove") -> LoraAdapter:
    if mode not in PRUNE_MODES:
        raise UsageError(f"--mode must be one of {', '.join(PRUNE_MODES)}, got {mode!r}")
    names = _check_names(adapter, names)
    drop = set(names)
    cfg = copy.deepcopy(adapter.config)
    if mode == "zero":
        modules = {}
        for n, m in adapter.modules.items():
            if n in drop:
                m = replace(
                    m,
                    lora_B=torch.zeros_like(m.lora_B),
                    lora_B_bias=None if m.lora_B_bias is None else torch.zeros_like(m.lora_B_bias),
                )
            modules[n] = m
        return adapter.with_modules(modules, config=cfg, manifest=None)
    kept = {n: m for n, m in adapter.modules.items() if n not in drop}
    if not kept:
        raise UsageError(
            f"pruning would remove all {len(adapter.modules)} LoRA modules, leaving an empty adapter; "
            "use the base model alone, or --mode zero"
        )
    if drop:
        cfg["target_modules"] = list(kept)
    return adapter.with_modules(kept, config=cfg, manifest=None)


def replace_lora_B(
    adapter: LoraAdapter, new_B: dict[str, torch.Tensor], new_bias: dict[str, torch.Tensor] | None = None
) -> LoraAdapter:
    """Return a copy whose listed modules use the given lora_B (and lora_B bias), cast to the stored dtype."""
    _check_names(adapter, new_B)
    new_bias = new_bias or {}
    modules: dict[str, LoraModule] = {}
    for n, m in adapter.modules.items():
        if n in new_B:
            B = new_B[n]
            if tuple(B.shape) != tuple(m.lora_B.shape):
                raise UsageError(f"new lora_B for {n!r} has shape {tuple(B.shape)}, expected {tuple(m.lora_B.shape)}")
            m = replace(m, lora_B=B.detach().to(device="cpu", dtype=m.lora_B.dtype).contiguous())
        if n in new_bias:
            b = new_bias[n]
            if m.lora_B_bias is None or tuple(b.shape) != tuple(m.lora_B_bias.shape):
                raise UsageError(f"new lora_B bias for {n!r} does not match the module's bias")
            m = replace(m, lora_B_bias=b.detach().to(device="cpu", dtype=m.lora_B_bias.dtype).contiguous())
        modules[n] = m
    return adapter.with_modules(modules, config=copy.deepcopy(adapter.config), manifest=None)
