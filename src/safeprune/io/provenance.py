"""Provenance recorded in every output: versions, input checksums, command line, time."""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("safeprune", "torch", "safetensors", "peft", "transformers", "gguf", "numpy")
# files larger than this are identified by size + a hash of their first and last MiB (bases are GBs)
FULL_HASH_LIMIT = 512 * 1024 * 1024


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def sha256_file(path: Path, limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"file": str(path), "bytes": size, "sha256": h.hexdigest()}
        h.update(f.read(1 << 20))
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
        return {"file": str(path), "bytes": size, "sha256_head_tail_1MiB": h.hexdigest()}


def describe_dir(path: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    files = [path / n for n in names] if names else sorted(p for p in path.iterdir() if p.is_file())
    return [sha256_file(f) for f in files if f.is_file()]


def command_line() -> str:
    import shlex

    argv = list(sys.argv)
    if argv and argv[0].endswith(("safeprune", "__main__.py")):
        argv[0] = "safeprune"
    return " ".join(shlex.quote(a) for a in argv)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
