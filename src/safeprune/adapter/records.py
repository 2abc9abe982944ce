"""The in-memory LoRA adapter: one record per adapted module, in PEFT conventions.

Conventions (PEFT, see ../shared/design/methods.md §1):

* ``lora_A.weight`` has shape ``(r, in_features)``, ``lora_B.weight`` has shape ``(out_features, r)``;
* ``ΔW = s · B @ A`` in the ``(out, in)`` orientation, with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with
  ``use_rslora``), where ``r`` and ``alpha`` are resolved per module through ``rank_pattern`` /
  ``alpha_pattern`` with PEFT's suffix-regex rule;
* ``fan_in_fan_out`` (GPT-2 ``Conv1D``) only changes how the *base* weight is stored (``(in, out)``); the
  LoRA tensors keep the Linear shapes, so safeprune always works in ``(out, in)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .names import PEFT_PREFIX
from .write import write_adapter

# <prefix?><module path>.lora_A|lora_B[.<adapter name>].weight|bias
_LORA_KEY = re.compile(r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_LAYER_IDX = re.compile(r"\.(\d+)(?:\.|$)")


# short names for module types, accepted wherever a user lists types (--types, --targets)
MODULE_TYPE_ALIASES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def parse_module_types(types: Iterable[str] | str | None) -> list[str] | None:
    """``"q,v"`` / ``["q_proj", "v"]`` -> ``["q_proj", "v_proj"]``; None or empty -> None (all types)."""
    if types is None:
        return None
    if isinstance(types, str):
        types = types.split(",")
    out = [t.strip() for t in types if t and t.strip()]
    return [MODULE_TYPE_ALIASES.get(t, t) for t in out] or None


@dataclass
class LoraModule:
    """One LoRA-adapted linear module, in PEFT conventions (``A``: (r, in), ``B``: (out, r))."""

    name: str  # module path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    lora_B_bias: torch.Tensor | None = None
    key_A: str = ""
    key_B: str = ""
    key_B_bias: str | None = None

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def layer(self) -> int | None:
        """The first numbered path segment (transformer block index), or None."""
        m = _LAYER_IDX.search("." + self.name)
        return int(m.group(1)) if m else None

    @property
    def module_type(self) -> str:
        """The last path segment, e.g. ``q_proj``."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def num_params(self) -> int:
        n = self.lora_A.numel() + self.lora_B.numel()
        return n + (self.lora_B_bias.numel() if self.lora_B_bias is not None else 0)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``ΔW = s·B@A`` in (out, in) orientation. For tests and small modules only."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter held in memory: its config, its LoRA modules and any other tensors."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # set by edits (prune/project): written next to the weights as safeprune.json
    manifest: dict[str, Any] | None = None
    # set by safeprune.prune()/project(): the scores and the selection that produced this adapter
    scores: Any = None
    selection: Any = None

    # -- views ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors as PEFT saves them (keys unchanged from the input)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            out[m.key_A] = m.lora_A
            out[m.key_B] = m.lora_B
            if m.lora_B_bias is not None and m.key_B_bias:
                out[m.key_B_bias] = m.lora_B_bias
        out.update(self.extra_tensors)
        return out

    def with_modules(self, modules: dict[str, LoraModule], **changes: Any) -> LoraAdapter:
        return replace(self, modules=modules, **changes)

    def save(self, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write a loadable PEFT adapter directory atomically (see :mod:`safeprune.writer`)."""
        return write_adapter(self, out_dir, force=force)


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    """``base_model.model.X.lora_A.weight`` -> ("X", "lora_A", "weight"); None for other keys."""
    m = _LORA_KEY.match(key)
    if not m:
        return None
    path = m.group("path")
    if path.startswith(PEFT_PREFIX):
        path = path[len(PEFT_PREFIX) :]
    return path, m.group("kind"), m.group("param")


def iter_module_types(modules: Iterable[LoraModule]) -> list[str]:
    seen: dict[str, None] = {}
    for m in modules:
        seen.setdefault(m.module_type, None)
    return list(seen)
