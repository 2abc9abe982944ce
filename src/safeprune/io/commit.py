"""All-or-nothing outputs: stage every file and directory a command writes, then make them visible together.

A command's outputs (an adapter directory plus ``--json``/``--csv``/``--plot`` side files) are first written
completely under hidden temporary names beside their destinations; a full disk or a bad path fails there,
before anything is visible. :meth:`Outputs.commit` then renames them into place with SIGINT/SIGTERM deferred
until it is done, and undoes the renames already made if one fails, so afterwards either every output is
complete or none has changed. A new output directory is claimed with ``renameat2(RENAME_NOREPLACE)`` (no
check-then-rename window): of two processes writing the same ``-o`` without ``--force``, one wins and the
other is refused. ``-`` as a side-file destination means standard output (printed after the commit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputError, OutputExistsError
from .files import fsync_dir, temp_beside, umask_modes
from .text import one_line

_COMMITTED: list[Path] = []  # outputs this process has completed (what an interrupt message must mention)


def forget_committed() -> None:
    """A new command starts: what an earlier command in this process completed is not its output."""
    _COMMITTED.clear()


_SIGINT: list[bool] = []  # a SIGINT arrived in this process (see note_sigint)


def note_sigint(signum: int, frame) -> None:
    """SIGINT handler: remember the interrupt, then raise ``KeyboardInterrupt`` as Python's default handler
    does. A Ctrl-C that lands inside a C extension's module initialisation (torch and its dependencies load
    for seconds) comes back as ``ImportError: initialization failed``, not ``KeyboardInterrupt``; the command
    line asks :func:`is_interrupt` and ends that case like any other Ctrl-C (exit 130, nothing written)."""
    _SIGINT.append(True)
    signal.default_int_handler(signum, frame)


def sigint_seen() -> bool:
    return bool(_SIGINT)


def is_interrupt(e: BaseException) -> bool:
    """Whether ``e`` is a Ctrl-C: ``KeyboardInterrupt``, or the ImportError one becomes inside a C extension's
    module initialisation (see :func:`note_sigint`)."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, ImportError) and sigint_seen())


def interrupted_message() -> str:
    if not _COMMITTED:
        return "no output was written"
    return "the output was already complete: " + ", ".join(one_line(p) for p in _COMMITTED)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT / SIGTERM arriving inside the block take effect when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda s, f: received.append(s))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if signal.SIGINT in received:
            raise KeyboardInterrupt
        if received:
            os.kill(os.getpid(), received[0])


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists, atomically where the kernel
    supports it (Linux renameat2); elsewhere a check then ``os.rename`` (which never replaces a non-empty
    directory)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: the file system lacks the flag
            raise OSError(e, os.strerror(e), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _replace_dir(new: Path, dest: Path) -> Path | None:
    """Rename ``new`` to ``dest``, an existing ``dest`` first moved aside (and put back if the rename fails).
    Returns where the old one went (the caller deletes it once everything is in place), or None."""
    old = None
    if os.path.lexists(dest):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.safeprune-old-", dir=dest.parent))
        os.rmdir(old)
        os.replace(dest, old)
    try:
        rename_noreplace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    return old


def swap_dir_into_place(new: Path, dest: Path) -> Path:
    """Make the finished directory ``new`` the directory ``dest`` (an existing one is replaced, and put back
    if that fails), with the umask's file modes. For a single directory output whose temporary must survive
    a failed rename (a fine-tuning run with its checkpoints); a command's outputs go through :class:`Outputs`."""
    umask_modes(new)
    with deferred_signals():
        old = _replace_dir(new, dest)
        if old is not None:
            _remove(old)
        fsync_dir(dest.parent)
    _COMMITTED.append(dest)
    return dest


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class Outputs:
    """The outputs of one command, staged then committed together (use as a context manager: leaving the
    block with an exception removes everything staged)."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, bool]] = []  # (temporary, destination, may replace)
        self._stdout: list[str] = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def temp_file(self, dest: Path) -> Path:
        """A new empty temporary file beside ``dest`` (same suffix, the umask's mode), to be staged."""
        try:
            return temp_beside(dest)
        except OSError as e:
            raise OutputError(f"cannot write ({e.strerror or e}); nothing was written", dest) from None

    def stage_text(self, dest: Path | str, text: str) -> None:
        if str(dest) == "-":
            self._stdout.append(text)
            return
        self.stage_file(Path(dest), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def stage_file(self, dest: Path, write: Callable[[Path], object]) -> None:
        """``write(tmp)`` fills a temporary file that becomes ``dest`` at commit (replacing a regular file)."""
        tmp = self.temp_file(dest)
        self._staged.append((tmp, dest, True))
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as e:
            raise OutputError(f"cannot write ({e.strerror or e}); nothing was written", dest) from None

    def stage_dir(self, tmp_dir: Path, dest: Path, *, replace: bool) -> None:
        """A finished temporary directory that becomes ``dest``; an existing ``dest`` only with ``replace``."""
        self._staged.append((tmp_dir, dest, replace))

    def commit(self) -> list[Path]:
        """Make every staged output visible, all or none; then print what goes to standard output."""
        done: list[tuple[Path, Path | None]] = []  # (destination, the previous version moved aside)
        with deferred_signals():
            try:
                for tmp, dest, replace in self._staged:
                    done.append((dest, self._place(tmp, dest, replace)))
            except BaseException as e:
                for dest, old in reversed(done):
                    _remove(dest)
                    if old is not None:
                        os.replace(old, dest)
                if isinstance(e, FileExistsError):
                    raise OutputExistsError(
                        f"output {e.filename} appeared while this command ran (another process?); nothing was written"
                    ) from None
                if isinstance(e, OSError):
                    raise OutputError(
                        f"cannot write ({e.strerror or e}); nothing was written", e.filename or "output"
                    ) from None
                raise
            finally:
                self.abort()
            for _, old in done:
                if old is not None:
                    _remove(old)
            for dest, _ in done:
                fsync_dir(dest.parent)
            _COMMITTED.extend(dest for dest, _ in done)
        for text in self._stdout:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return [dest for dest, _ in done]

    @staticmethod
    def _place(tmp: Path, dest: Path, replace: bool) -> Path | None:
        if tmp.is_dir():
            if not replace:
                rename_noreplace(tmp, dest)
                return None
            return _replace_dir(tmp, dest)
        old = None
        if os.path.lexists(dest):
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent)
            os.close(fd)
            old = Path(name)
            os.replace(dest, old)
        os.replace(tmp, dest)
        return old

    def abort(self) -> None:
        """Remove every temporary that is still staged (after a commit: nothing)."""
        for tmp, _, _ in self._staged:
            if os.path.lexists(tmp):
                _remove(tmp)
        self._staged = [(t, d, r) for t, d, r in self._staged if os.path.lexists(t)]
