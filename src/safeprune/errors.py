"""Errors that safeprune reports to a person.

Every error a user can cause (a missing file, a corrupt tensor, an unsupported adapter type, a shape
mismatch) is a :class:`SafepruneError`. The CLI prints its one-line message (naming the file and the
problem) and exits with :attr:`SafepruneError.exit_code` (2) without a traceback, unless ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class SafepruneError(Exception):
    """Base class: a problem with the user's input or request, reported as one line."""

    exit_code = 2

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(str(self))

    def __str__(self) -> str:  # "path: problem"
        return f"{self.path}: {self.problem}" if self.path else self.problem


class InputError(SafepruneError):
    """A file we were given is missing, unreadable, corrupt or inconsistent."""


class UnsupportedError(InputError):
    """A valid input of a kind safeprune refuses (DoRA, pickles, Conv LoRA, non-LoRA PEFT types...)."""


class ShapeMismatchError(InputError):
    """Adapter and base (or aligned/unaligned pair) disagree on a tensor shape."""


class NonFiniteError(InputError):
    """A tensor contains NaN or Inf."""


class OfflineError(InputError):
    """A hub id was given but cannot be resolved without the network."""


class OutputError(SafepruneError):
    """The output could not be written (disk full, permissions...); nothing was left behind."""


class UsageError(SafepruneError):
    """The request itself is inconsistent (bad option combination, output inside input, ...)."""


class OutputExistsError(UsageError):
    """The output path exists and --force was not given."""


class SafepruneWarning(UserWarning):
    """Something suspicious but harmless (e.g. a rank_pattern entry that matches no module).

    The CLI prints it as one ``warning: <file>: <problem>`` line and carries on."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {problem}" if path else problem)
