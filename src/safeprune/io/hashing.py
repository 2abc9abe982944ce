"""The project's hashers: file contents (provenance, data records), file sets (cache keys) and JSON values
(stage keys). One place, so a cache key means the same thing wherever it is computed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

# files larger than this are identified by size + a hash of their first and last MiB (bases are GBs)
FULL_HASH_LIMIT = 512 * 1024 * 1024


def sha256_hex(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a whole file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path, limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    """A provenance record of one file: path, size and sha256 (head and tail MiB only past ``limit``)."""
    size = path.stat().st_size
    if size <= limit:
        return {"file": str(path), "bytes": size, "sha256": sha256_hex(path)}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return {"file": str(path), "bytes": size, "sha256_head_tail_1MiB": h.hexdigest()}


def files_digest(files: Iterable[Path], limit: int = 2 * 1024**3) -> str:
    """sha256 over file names, sizes and contents (head and tail 4 MiB of a file past ``limit``)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        size = f.stat().st_size
        h.update(str(size).encode() + b"\0")
        with open(f, "rb") as fh:
            if size <= limit:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:  # very large shards: head and tail
                h.update(fh.read(1 << 22))
                fh.seek(size - (1 << 22))
                h.update(fh.read(1 << 22))
    return h.hexdigest()


def named_contents_digest(files: Iterable[Path]) -> str:
    """sha256 over (file name, sha256 of its content) pairs."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def json_digest(obj: Any, length: int = 16, *, ensure_ascii: bool = True) -> str:
    """Short sha256 of a JSON value with sorted keys (non-JSON values by ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=ensure_ascii)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
