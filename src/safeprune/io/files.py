"""File-system primitives every stage uses: input checks (regular file, no escape through symlinks) and the
two atomic writes (a small text file; a whole directory swapped into place).

A crash, a full disk or Ctrl-C never leaves a half-written output: everything is written next to its
destination under a hidden temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, OutputError, UnsupportedError


def is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_inside(file: Path, root: Path) -> None:
    """Refuse a file that is (or resolves through a symlink to) a place outside ``root``."""
    real = Path(os.path.realpath(file))
    real_root = Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        how = "is a symbolic link to" if Path(file).is_symlink() else "resolves to"
        raise UnsupportedError(f"{how} {real}, outside the input directory; refusing to follow it", file)


def check_regular_file(file: Path) -> None:
    """Refuse anything but a regular file (a FIFO or a device would block or never end)."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", file) from None
    if not stat.S_ISREG(mode):
        raise InputError("not a regular file (a FIFO, device or directory); refusing to read it", file)


def current_umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for the values safeprune records: paths and numpy/torch scalars."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def temp_beside(dest: Path) -> Path:
    """A new empty hidden file beside ``dest`` (same suffix, so writers that look at it pick the format), with
    the mode the umask asks for (mkstemp makes 0600). OSError propagates."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix, dir=dest.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~current_umask())
    return Path(name)


@contextmanager
def atomic_path(path: str | Path, what: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that look at it pick the format);
    when the block ends it is fsynced and renamed to ``path``; on any error it is removed and ``path`` is
    left as it was. OS errors become one-line OutputErrors."""
    p = Path(path)
    label = f"the {what}" if what else ""
    try:
        tmp = temp_beside(p)
    except OSError as e:
        raise OutputError(
            f"cannot write{' ' + label if label else ''} ({e.strerror or e}); nothing was written", p
        ) from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write{' ' + label if label else ''} ({e.strerror or e}); nothing was written", p
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (temp file in the same directory + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def umask_modes(d: Path) -> None:
    """Give the files directly inside ``d`` the mode the umask asks for (some writers, e.g. safetensors'
    ``save_file``, create 0600 files that a server running as another user could not read)."""
    mode = 0o666 & ~current_umask()
    for f in d.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def fsync_tree_files(d: Path) -> None:
    """fsync every file directly inside ``d``, then ``d`` itself."""
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(d)


def make_temp_dir(dest: Path, what: str = "output directory") -> Path:
    """A hidden temporary directory beside ``dest``, to assemble an output in before
    :func:`safeprune.io.commit.swap_dir_into_place` or :class:`safeprune.io.commit.Outputs`."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.safeprune-tmp-", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: the output gets the usual mode
        return tmp
    except OSError as e:
        raise OutputError(f"cannot create the {what} ({e.strerror or e}); nothing was written", dest) from None
