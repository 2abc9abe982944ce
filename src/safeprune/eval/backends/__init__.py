"""Generation backends, one file each: ``hf`` (transformers, the default), ``vllm`` (optional extra) and
``fake`` (tests). A new backend is a :class:`Backend` subclass in its own file plus one line in
:data:`BACKENDS`.

A backend loads the base model once and generates for several *variants* of it: ``None`` is the base
itself (PEFT adapters disabled) and every other name is a LoRA adapter attached to the same loaded base.
"""

from __future__ import annotations

from typing import Any

from ...errors import UsageError
from .base import (
    ADAPTER_FILES,
    Backend,
    Generation,
    GenSettings,
    adapter_fingerprint,
    fingerprint_dir,
    tokens_per_second,
)
from .fake import FakeBackend
from .hf import HFBackend
from .vllm import VLLMBackend

BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend, "fake": FakeBackend}


def make_backend(name: str, base: str, adapters: dict[str, str] | None = None, **kw: Any) -> Backend:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](base, adapters, **kw)


__all__ = [
    "Backend",
    "Generation",
    "GenSettings",
    "FakeBackend",
    "HFBackend",
    "VLLMBackend",
    "BACKENDS",
    "make_backend",
    "adapter_fingerprint",
    "fingerprint_dir",
    "tokens_per_second",
    "ADAPTER_FILES",
]
