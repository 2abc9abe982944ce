"""Generation cache: an append-only JSONL file keyed by (backend, model hash, adapter hash, rendered
prompt, generation settings).

Each finished batch is appended and flushed at once, so an interrupted run loses at most the batch in
flight, and a rerun generates only what is missing. A torn last line (the process was killed while
writing) is ignored on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import OutputError


def cache_key(backend: str, model_hash: str, adapter_hash: str, rendered_prompt: str, settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {
            "backend": backend,
            "model": model_hash,
            "adapter": adapter_hash,
            "prompt": rendered_prompt,
            "settings": settings,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class GenerationCache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # torn write from an interrupted run
                    if isinstance(rec, dict) and "key" in rec:
                        self.entries[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        recs = list(records)
        for r in recs:
            self.entries[r["key"]] = r
        if not self.path or not recs:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as fb:
                    fb.seek(-1, os.SEEK_END)
                    torn = fb.read(1) != b"\n"
            data = ("\n" if torn else "") + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            # one write() on an O_APPEND descriptor per batch: processes sharing a cache file do not interleave
            # their lines (an interrupted write left half a line: the leading newline ends it)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                buf = data.encode("utf-8")
                while buf:
                    n = os.write(fd, buf)
                    buf = buf[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot append to the generation cache ({e.strerror})", self.path) from None
