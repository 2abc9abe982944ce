"""Where the evaluation and probe data live: one resolver for the whole project.

Order: an explicit path; else ``$SAFEPRUNE_DATA``; else the first ``shared/data`` folder found beside the
repository checkout (``../shared/data``), above it, or beside the working directory. No absolute machine
path is ever assumed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

ENV_VAR = "SAFEPRUNE_DATA"


def data_candidates() -> list[Path]:
    root = Path(__file__).resolve().parents[3]  # src/safeprune/io/ -> the checkout
    return [a / "shared" / "data" for a in (root.parent, root.parent.parent, Path.cwd().parent)]


def data_root(path: str | Path | None = None) -> Path:
    """The data folder (see the module docstring); an InputError if it does not exist."""
    if path is not None:
        p = Path(path)
    elif os.environ.get(ENV_VAR):
        p = Path(os.environ[ENV_VAR])
    else:
        cands = data_candidates()
        p = next((c for c in cands if c.is_dir()), cands[0])
    if not p.is_dir():
        raise InputError(f"no data folder (give a data path or set {ENV_VAR})", p)
    return p
