"""The SafeLoRA edit: lora_B ← C·lora_B for selected modules, C = V Vᵀ/‖V‖_F, V = W_aligned − W_unaligned.

The projected update is s·(C·B)·A = C·ΔW, exactly SafeLoRA's (``model.py``: ``param.data = P @ B``); lora_A is
kept and lora_B keeps its stored dtype. C·B is computed as V(VᵀB)/‖V‖_F (:func:`safeprune.weights.pair.apply_alignment`),
reading the pair's weights for the selected modules only, one module at a time.

A ``lora_B`` bias b (PEFT ``lora_bias=True``) is part of the same output-side update: the layer adds
s·(B·A·x + b), and C acts on the output space, so b is projected too (b ← C·b), keeping the whole LoRA
contribution to the output equal to C times the original one. (The official code ignores biases; it
crashes on them.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from ..adapter import LoraAdapter
from ..scoring import resolve_device
from ..weights import WeightSource, open_weights, read_module_weight
from ..weights.pair import apply_alignment, check_pair
from .prune import replace_lora_B


def project_modules(
    adapter: LoraAdapter,
    names: Iterable[str],
    aligned: str | Path | WeightSource,
    unaligned: str | Path | WeightSource,
    *,
    device: str | None = "cpu",
) -> tuple[LoraAdapter, dict[str, Any]]:
    names = list(dict.fromkeys(names))
    dev = resolve_device(device)
    src_a = open_weights(aligned)
    src_u = open_weights(unaligned)
    new_B: dict[str, torch.Tensor] = {}
    new_bias: dict[str, torch.Tensor] = {}
    ratios: dict[str, float] = {}
    try:
        mods = [adapter.modules[n] for n in names if n in adapter.modules]
        check_pair(src_a, src_u, mods)
        for m in mods:
            # stored dtype, as the SafeLoRA scorer does: apply_alignment forms float64 blocks of V itself
            Wa = read_module_weight(src_a, m, dtype=None, role="aligned").to(dev)
            Wu = read_module_weight(src_u, m, dtype=None, role="unaligned").to(dev)
            B = m.lora_B.to(dev, torch.float64)
            Z = B if m.lora_B_bias is None else torch.cat([B, m.lora_B_bias.to(dev, torch.float64)[:, None]], 1)
            CZ, vfro = apply_alignment(
                Wa,
                Wu,
                Z,
                what=f"alignment matrix of module {m.name!r}",
                where=f"{src_a.description} / {src_u.description}",
            )
            del Wa, Wu
            new_B[m.name] = CZ[:, : m.r].cpu()
            if m.lora_B_bias is not None:
                new_bias[m.name] = CZ[:, m.r].cpu()
            ratios[m.name] = (
                float(torch.linalg.norm(CZ[:, : m.r]) / torch.linalg.norm(B))
                if float(torch.linalg.norm(B)) > 0
                else float("nan")
            )
    finally:
        if not isinstance(aligned, WeightSource):
            src_a.close()
        if not isinstance(unaligned, WeightSource):
            src_u.close()
    edited = replace_lora_B(adapter, new_B, new_bias)
    info = {
        "edit": "lora_B <- V (V^T lora_B) / ||V||_F  (C = V V^T/||V||_F, V = aligned - unaligned); lora_A unchanged",
        "bias": "lora_B bias projected too (b <- C b)" if new_bias else "no lora_B bias",
        "lora_B_norm_ratio": ratios,
    }
    return edited, info
