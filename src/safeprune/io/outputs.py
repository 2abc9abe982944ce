"""Where an output may go: never into, over or around an input; an existing output only with ``force``."""

from __future__ import annotations

import os
import stat
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


# files a loader reads next to an input given as a single file (a .safetensors or .gguf base, a score table)
SIBLING_INPUTS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "adapter_config.json",
)


def check_output_file(path: Path | None, inputs: list[Path], *, not_equal: list[Path] = ()) -> None:
    """A side output (--json/--csv/--plot) may replace a regular file of its own, but never an input, a file
    inside an input directory or read beside an input file, a directory, a symbolic link, a device or FIFO,
    or the adapter output itself. ``-`` means standard output."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"output {path} is a symbolic link; refusing to replace it (give the real path)")
    if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        raise UsageError(f"output {path} is a device or FIFO, not a file; refusing to replace it (use - for stdout)")
    real = Path(os.path.realpath(path))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if is_within(real, real_in) or is_within(real_in, real):
            raise UsageError(f"output {path} would write into or over the input {inp}; choose another path")
        if (
            real_in.is_file()
            and real.parent == real_in.parent
            and (real.name in SIBLING_INPUTS or real.suffix in (".safetensors", ".gguf", ".bin"))
        ):
            raise UsageError(f"output {path} would replace a file read with the input {inp}; choose another path")
    for other in not_equal:
        if other is not None and real == Path(os.path.realpath(other)):
            raise UsageError(f"output {path} is also the adapter output directory; choose another path")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name")
