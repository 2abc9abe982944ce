"""Content fingerprints: a model or adapter directory's identity for cache keys and for checking that a
score table was computed for this adapter."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..io.hashing import files_digest, named_contents_digest
from .names import ADAPTER_FILES


def fingerprint_dir(path: str | Path, limit: int = 2 * 1024**3) -> str:
    """sha256 over a model/adapter directory's config and weight files (name + content)."""
    p = Path(path)
    if not p.exists():
        raise InputError("not found", p)
    files = (
        [p]
        if p.is_file()
        else sorted(
            f
            for f in p.iterdir()
            if f.is_file()
            and (f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model") or f.name.endswith(".jinja"))
        )
    )
    return files_digest(files, limit)


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 over the files that change what an adapter generates (config + weights): a manifest or
    training log written next to them (``safeprune.json``, ``training_args.json``) does not change it, so
    two byte-identical edits share their cached generations."""
    p = Path(path)
    if not p.is_dir():
        return fingerprint_dir(p)
    files = [p / f for f in ADAPTER_FILES if (p / f).is_file()]
    if not files:
        raise InputError("no adapter_config.json / adapter_model.* in the adapter directory", p)
    return named_contents_digest(files)
