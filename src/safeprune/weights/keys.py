"""From an adapter's LoRA module to the base tensor it adapts: name lookup, shape check, checked read."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import InputError, NonFiniteError, ShapeMismatchError, UnsupportedError
from .base import WeightSource
from .norms import fro_norm64


def name_candidates(module: str) -> Iterable[str]:
    yield module
    parts = module.split(".")
    # checkpoints saved from the bare backbone (no "model." prefix) or wrapped (VLMs). Never drop a level to
    # reach another "model." path: PEFT would not match "model.model.layers.0..." to "model.layers.0...", and an
    # adapter with an extra level is an adapter for another model
    if parts[0] == "model":
        if len(parts) > 1 and parts[1] != "model":
            yield ".".join(parts[1:])
    else:
        yield "model." + module
    for wrapper in ("model.language_model.", "language_model.model.", "language_model."):
        if module.startswith("model."):
            yield wrapper + module[len("model.") :]
        yield wrapper + module


def base_key_for(source: WeightSource, module: str, role: str = "base") -> str:
    keys = source.keys()
    tried = []
    for cand in name_candidates(module):
        k = cand + ".weight"
        tried.append(k)
        if k in keys:
            return k
    raise InputError(
        f"{role} model has no weight for LoRA module {module!r} (looked for {tried[0]!r}); is this the model "
        "the adapter was trained on?",
        source.description,
    )


def module_weight_key(source: WeightSource, module, role: str = "base") -> str:
    """The source's tensor name for a LoraModule's W0, after checking its stored shape (header only).

    ``role`` ("base", "aligned", "unaligned") names the model in error messages."""
    key = base_key_for(source, module.name, role)
    shp = source.shape(key)
    want = (module.out_features, module.in_features)
    stored_want = (want[1], want[0]) if module.fan_in_fan_out else want
    if tuple(shp) != stored_want:
        hint = " (fan_in_fan_out)" if module.fan_in_fan_out else ""
        raise ShapeMismatchError(
            f"{role} tensor {key!r} has shape {tuple(shp)} but the adapter's module {module.name!r} needs "
            f"{stored_want}{hint}",
            source.file_of(key),
        )
    return key


def check_modules_present(source: WeightSource, modules: Iterable, role: str = "base") -> None:
    """Fail fast (before any tensor is read) if the source lacks a module's weight or has the wrong shape."""
    for m in modules:
        module_weight_key(source, m, role)


def read_weight_and_norm(
    source: WeightSource, module, *, dtype: torch.dtype | None = torch.float32, role: str = "base"
) -> tuple[torch.Tensor, float]:
    """Read W0 for a LoraModule in (out, in) orientation (``dtype=None``: the stored dtype, e.g. bfloat16,
    without conversion), checking its shape, and return it with ‖W0‖_F.

    Every scorer gets its weights through here, so a NaN/Inf in a base (or aligned/unaligned) weight is
    reported as an error naming the file and the tensor instead of turning into a NaN score. The check is
    the float64 norm itself (finite for any finite float32/bf16 tensor), so it costs no extra pass.
    """
    key = module_weight_key(source, module, role)
    w = source.get(key, dtype=dtype)
    if not w.is_floating_point():  # e.g. int8 without its dequantisation scales: the numbers are not W0
        raise UnsupportedError(
            f"tensor {key!r} is stored as {str(w.dtype).replace('torch.', '')}: a quantised weight without its "
            "scales cannot be scored; give the unquantised base (safetensors) or a GGUF file",
            source.file_of(key),
        )
    n = fro_norm64(w)
    if not math.isfinite(n):
        bad = "NaN" if bool(torch.isnan(w).any()) else "Inf"
        raise NonFiniteError(f"tensor {key!r} contains {bad}", source.file_of(key))
    return (w.T if module.fan_in_fan_out else w), n


def read_module_weight(
    source: WeightSource, module, *, dtype: torch.dtype | None = torch.float32, role: str = "base"
) -> torch.Tensor:
    """:func:`read_weight_and_norm` without the norm."""
    return read_weight_and_norm(source, module, dtype=dtype, role=role)[0]
