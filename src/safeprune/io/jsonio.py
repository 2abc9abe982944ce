"""The one way safeprune parses JSON it did not write: bounded in size and nesting depth.

Python's ``json`` recurses once per nesting level, so a few kilobytes of ``[[[[...`` raise RecursionError (a
crash, not a message). Every untrusted document (safetensors headers, ``adapter_config.json``, a base's
``config.json`` and shard index, score tables, id lists) goes through :func:`loads_bounded`, which measures the
nesting depth with a linear scan first and refuses what is too deep, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

MAX_DEPTH = 64  # real configs, headers and score tables nest 4-6 levels
MAX_JSON_BYTES = 64 * 1024 * 1024  # a JSON side file larger than this is not a config, an index or a score table


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text (brackets inside strings are not counted)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_bounded(
    text: str, where: Any, what: str = "JSON", *, max_depth: int = MAX_DEPTH, object_pairs_hook: Callable | None = None
) -> Any:
    """``json.loads`` that refuses a document nested deeper than ``max_depth`` (or too deep for the parser) with
    an InputError naming ``where``. JSON syntax errors propagate as ``json.JSONDecodeError`` so callers keep
    their own wording."""
    try:  # syntax errors first, so a broken document keeps its "not valid JSON" message
        data = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        data = None
    else:
        if nesting_depth(text) <= max_depth:
            return data
    raise InputError(f"{what} nested more than {max_depth} levels deep; refusing to parse it", where)


def read_text_bounded(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A small UTF-8 side file, refused (not read) when larger than ``max_bytes``."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise InputError(f"implausibly large ({size} bytes) for {what}; the limit is {max_bytes} bytes", path)
    return Path(path).read_text(encoding="utf-8")
