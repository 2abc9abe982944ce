"""Hub ids (``org/name``), resolved through huggingface_hub's local cache (downloaded only when the
network is allowed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import OfflineError

_PATTERNS = ["*.safetensors", "*.json", "*.gguf", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` that is not a relative or absolute path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/"))


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot of ``repo_id``, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, not cached, malformed id: all mean "not here"
        return None


def resolve_hub_id(repo_id: str) -> Path:
    """Local snapshot directory for a hub id: the cache first; the network only if allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise OfflineError("resolving hub ids needs huggingface_hub", repo_id) from None
    patterns = _PATTERNS
    cached = cached_hub_snapshot(repo_id)
    if cached is not None:
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise OfflineError(
            "not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it "
            "first (`huggingface-cli download " + repo_id + "`) or pass a local directory",
            repo_id,
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise OfflineError(
            f"not a local path, not in the Hugging Face cache, and downloading failed ({str(e)[:160]}); "
            "pass a local directory",
            repo_id,
        ) from None
