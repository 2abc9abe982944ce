"""Provenance recorded in every output: versions, input checksums, command line, time."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .hashing import sha256_file

PACKAGES = ("safeprune", "torch", "safetensors", "peft", "transformers", "gguf", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def describe_dir(path: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    files = [path / n for n in names] if names else sorted(p for p in path.iterdir() if p.is_file())
    return [sha256_file(f) for f in files if f.is_file()]


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("safeprune", "__main__.py")):
        argv[0] = "safeprune"
    return " ".join(shlex.quote(a) for a in argv)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
