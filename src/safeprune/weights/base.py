"""The weight-source interface: lazy access to one model's tensors by Hugging Face name.

Every source presents tensors under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) and
returns float32 (or the requested dtype, or the stored dtype with ``dtype=None``) tensors on the CPU.
Nothing loads the whole model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..errors import InputError


class WeightSource(ABC):
    """Lazy access to a model's weights by Hugging Face tensor name."""

    description: str = ""

    @abstractmethod
    def keys(self) -> set[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def _read(self, key: str) -> torch.Tensor: ...

    def get(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if key not in self.keys():
            raise InputError(f"no tensor named {key!r}", self.description)
        t = self._read(key)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def file_of(self, key: str) -> str:
        return self.description

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:  # noqa: B027  (optional hook: most sources hold nothing to release)  # pragma: no cover
        pass

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"
