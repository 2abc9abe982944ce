"""Text that reaches a terminal or a table: numbers formatted one way everywhere, and names that strangers
wrote (module names, paths) made safe to print."""

from __future__ import annotations

import re
from typing import Any


def fmt_number(v: Any) -> str:
    """A table cell: 4 decimals for ordinary magnitudes, scientific notation otherwise, '' for None."""
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4f}"
        return f"{v:.3e}"
    return str(v)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: layers.2 before layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def one_line(text: object) -> str:
    """Make a message safe to print as one terminal line: names in it come from files strangers wrote, so
    newlines and control characters (ANSI escapes) are shown escaped, never interpreted."""
    s = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
