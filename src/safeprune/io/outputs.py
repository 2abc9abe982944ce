"""Where an output may go: never into, over or around an input; an existing output only with ``force``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputExistsError, UsageError
from .files import is_within


def check_output_path(out_dir: Path, inputs: list[Path], force: bool) -> None:
    out = Path(os.path.realpath(out_dir))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if is_within(out, real_in):
            raise UsageError(f"output {out_dir} is inside the input {inp}; choose another output directory")
        if is_within(real_in, out):
            raise UsageError(f"output {out_dir} contains the input {inp}; choose another output directory")
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise OutputExistsError(f"output {out_dir} already exists; pass --force to replace it")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise UsageError(f"output {out_dir} exists and is not a directory; refusing to replace it")


def local_inputs(*specs) -> list[Path]:
    """The inputs given as local paths (hub ids and None are skipped): what outputs must stay clear of."""
    out = []
    for s in specs:
        if isinstance(s, (str, Path)) and Path(s).exists():
            out.append(Path(s))
    return out


def check_output_file(path: Path | None, inputs: list[Path], *, not_equal: list[Path] = ()) -> None:
    """A side output (--json/--csv/--plot) may replace a file of its own, but never an input, a file inside
    an input directory, a directory, or the adapter output itself."""
    if path is None:
        return
    real = Path(os.path.realpath(path))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if is_within(real, real_in) or is_within(real_in, real):
            raise UsageError(f"output {path} would write into or over the input {inp}; choose another path")
    for other in not_equal:
        if other is not None and real == Path(os.path.realpath(other)):
            raise UsageError(f"output {path} is also the adapter output directory; choose another path")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name")
