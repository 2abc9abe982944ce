"""One resolver for BASE as a model that *runs* (generation, training, activation scores): every command that
loads a model through transformers takes the same spellings that :func:`~safeprune.weights.open_weights`
reads tensors from — a Hugging Face directory (single ``model.safetensors`` or sharded), a ``.safetensors``
file inside such a directory, a ``.gguf`` file (loaded with transformers' ``gguf_file``, dequantised) or a
directory holding exactly one, or a hub id from the local cache — and :func:`base_from_adapter` gives the
adapter's own ``base_model_name_or_path`` when ``--base`` is left out and that resolves here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError
from .hub import cached_hub_snapshot, looks_like_hub_id, resolve_hub_id

_CONFIG = "config.json"


@dataclass(frozen=True)
class ModelRef:
    """A model transformers can load: ``from_pretrained(directory, **kwargs())``."""

    spec: str
    directory: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        """The file or directory that holds the model (its fingerprint keys caches)."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(spec: str | Path) -> ModelRef:
    """``spec`` as a loadable model, or a one-line :class:`InputError` that says what was found instead."""
    p = Path(spec)
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelRef(str(spec), p.parent, p.name)
        if p.suffix == ".safetensors":
            if (p.parent / _CONFIG).is_file():
                return ModelRef(str(spec), p.parent)
            raise InputError(
                "a .safetensors file without a config.json beside it can be scored but not run; give the Hugging "
                "Face model directory (config.json, tokenizer and weights)",
                p,
            )
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UnsupportedError("pickled weights are refused; use safetensors or GGUF", p)
        raise InputError("unrecognised model file (expected a directory, .safetensors or .gguf)", p)
    if p.is_dir():
        if (p / _CONFIG).is_file():
            return ModelRef(str(spec), p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(str(spec), p, ggufs[0].name)
        if ggufs:
            raise InputError(f"several GGUF files; name one of them: {', '.join(g.name for g in ggufs)}", p)
        raise InputError("neither a config.json nor a .gguf here: not a model directory", p)
    if isinstance(spec, str) and looks_like_hub_id(spec):
        ref = resolve_model(resolve_hub_id(spec))
        return ModelRef(spec, ref.directory, ref.gguf_file)
    raise InputError("does not exist (expected a model directory, a .safetensors/.gguf file or a hub id)", spec)


def base_from_adapter(adapter_dir: str | Path) -> str | None:
    """The adapter's ``base_model_name_or_path`` when it names a local model (absolute, or relative to the
    working directory or to the adapter) or a hub id already in the local cache; None otherwise. Nothing is
    downloaded."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(name, str) or not name.strip() or len(name) > 4096:
        return None
    for cand in (Path(name), Path(adapter_dir) / name):
        try:
            if cand.exists():
                resolve_model(cand)
                return str(cand)
        except (InputError, OSError):
            continue
    if looks_like_hub_id(name) and cached_hub_snapshot(name) is not None:
        return name
    return None
