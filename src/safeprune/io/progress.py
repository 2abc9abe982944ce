"""The one progress bar style (rich, on stderr). On a terminal: a live bar with counts and ETA. Not on a
terminal (a log, a pipe, ``nohup``): a line per task every ``LOG_EVERY`` seconds and when it finishes, so a
long phase is never silent in a log; phases shorter than that print nothing. ``show_after`` holds the bar back
until a phase has run that long (a phase that is usually quick, such as a bootstrap, draws nothing then).

:func:`task_callback` turns a bar into the ``progress(label, done, total)`` callback that generation and the
bootstrap call: one task (bar) per label."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_EVERY = 30.0
BOOTSTRAP_BAR_AFTER = 2.0  # seconds: a bootstrap usually takes less; a bar is drawn only when it does not


class _LoggedProgress(Progress):
    """A rich Progress that, where no bar can be drawn, writes one plain line per task now and then."""

    def __init__(self, *columns, log_every: float | None, show_after: float = 0.0, **kw):
        super().__init__(*columns, **kw)
        self._log_every = log_every
        self._logged: dict[TaskID, float] = {}
        self._born: dict[TaskID, float] = {}
        self._show_after = show_after
        self._entered: float | None = None
        self._live_started = False

    def start(self) -> None:
        """Draw the bar now, or (``show_after``) once the phase has lasted that long."""
        self._entered = time.monotonic()
        if self._show_after <= 0:
            self._start_live()

    def _start_live(self) -> None:
        if not self._live_started:
            self._live_started = True
            super().start()

    def stop(self) -> None:
        if self._live_started:
            self._live_started = False
            super().stop()
        self._entered = None

    def _maybe_start(self) -> None:
        if not self._live_started and self._entered is not None:
            if time.monotonic() - self._entered >= self._show_after:
                self._start_live()

    def add_task(self, description, *args, **kw) -> TaskID:
        tid = super().add_task(description, *args, **kw)
        self._born[tid] = time.monotonic()
        return tid

    def _log(self, task_id: TaskID) -> None:
        if self._log_every is None:
            return
        task = next((t for t in self.tasks if t.id == task_id), None)
        if task is None:
            return
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        last = self._logged.get(task_id, self._born.get(task_id, now))
        if now - last < self._log_every and not (finished and task_id in self._logged):
            return
        if finished and task_id not in self._logged and now - self._born.get(task_id, now) < self._log_every:
            return
        self._logged[task_id] = now
        total = "?" if task.total is None else int(task.total)
        extra = f" {task.fields.get('module')}" if task.fields.get("module") else ""
        self.console.print(
            f"{task.description}: {int(task.completed)}/{total}, {now - self._born.get(task_id, now):.0f} s{extra}",
            markup=False,
            highlight=False,
        )

    def update(self, task_id: TaskID, *args, **kw) -> None:
        super().update(task_id, *args, **kw)
        self._maybe_start()
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_start()
        self._log(task_id)


def make_progress(enabled: bool, log_every: float | None = None, show_after: float = 0.0) -> Progress:
    """``log_every``: seconds between plain lines where no bar can be drawn (default :data:`LOG_EVERY`);
    ``show_after``: seconds before the bar is drawn (0: at once)."""
    console = Console(stderr=True)
    log_every = LOG_EVERY if log_every is None else log_every
    return _LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[module]}"),
        # not a terminal (a log, a pipe): a transient bar would only leave a blank line behind; lines instead
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
        log_every=log_every if enabled and not console.is_terminal else None,
        show_after=show_after,
    )


def task_callback(prog: Progress, prefix: str = "") -> Callable[[str, int, int], None]:
    """``progress(label, done, total)`` drawing one bar per label on ``prog`` (``prefix`` before the label):
    counts, elapsed time and ETA."""
    tasks: dict[str, TaskID] = {}

    def on_progress(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = prog.add_task(f"{prefix}{label}", total=total, module="")
        prog.update(tasks[label], completed=done, total=total)

    return on_progress
