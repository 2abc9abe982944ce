"""Regular expressions that strangers wrote (PEFT's ``rank_pattern`` / ``alpha_pattern`` keys), matched with a
time bound.

PEFT treats those keys as regexes matched against a dotted suffix of each module path. A pattern with nested
quantifiers (``(x+x+)+y``) can backtrack for minutes on a 32-character name; the ``regex`` package runs the same
syntax with a per-match timeout, so such a config is refused in a fraction of a second instead of hanging.
"""

from __future__ import annotations

from typing import Any

import regex

from ..errors import InputError

MATCH_TIMEOUT_S = 0.25  # a real suffix pattern matches a module path in microseconds


def check_pattern(key: str, where: Any, what: str) -> None:
    """Refuse a key that is not a valid regular expression."""
    try:
        regex.compile(rf"(.*\.)?({key})$")
    except (regex.error, RecursionError, OverflowError):
        raise InputError(f"'{what}' key {key!r} is not a valid regular expression", where) from None


def suffix_match(key: str, name: str, where: Any = "adapter_config.json", what: str = "rank_pattern") -> bool:
    """PEFT's rule: does ``key`` match a dotted suffix of ``name``? Bounded in time."""
    try:
        return regex.match(rf"(.*\.)?({key})$", name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise InputError(
            f"'{what}' key {key!r} takes too long to match a module name (catastrophic backtracking); refusing it",
            where,
        ) from None
    except (regex.error, RecursionError, OverflowError):
        raise InputError(f"'{what}' key {key!r} is not a valid regular expression", where) from None
