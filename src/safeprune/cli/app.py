"""The Typer application, the shared console state and the error boundary every command runs inside.

Errors a user can cause print one line (``error: <file>: <problem>``) and exit with status 2; no
traceback unless ``--debug``. Ctrl-C exits 130 and leaves no partial output.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from typing import Any, Callable, List

import click
import typer
from rich.console import Console
from rich.text import Text
from typing_extensions import Annotated

from ..errors import SafepruneError, SafepruneWarning, UsageError
from ..io.commit import interrupted_message
from ..io.text import one_line
from ..version import __version__

app = typer.Typer(
    name="safeprune",
    help="Find and remove the parts of a LoRA adapter that break a model's safety alignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# markup is never parsed from what is printed: module names and paths come from files strangers wrote (a name
# holding "[/]" must print as itself); control characters in them are escaped by one_line / the renderers
out = Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)
state: dict[str, Any] = {"debug": False, "quiet": False}


def report(label: str, style: str, message: object) -> None:
    """Print ``label: message`` on stderr as plain text: no rich markup or emoji codes are parsed from it."""
    err.print(Text.assemble((f"{label}:", style), " ", one_line(message)), soft_wrap=True)


def _warning_printer(previous: Callable) -> Callable:
    """showwarning that prints a SafepruneWarning as one ``warning: <file>: <problem>`` line."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SafepruneWarning):
            report("warning", "bold yellow", message)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def _check_finite_options(kwargs: dict[str, Any]) -> None:
    """One validator for every float option of every command: NaN and ±inf are refused, naming the flag."""
    for name, v in kwargs.items():
        if isinstance(v, float) and not math.isfinite(v):
            flag = "--" + name.replace("_", "-")
            ctx = click.get_current_context(silent=True)
            for p in ctx.command.params if ctx is not None else ():
                if p.name == name and getattr(p, "opts", None):
                    flag = max(p.opts, key=len)
            raise UsageError(f"{flag} must be a finite number, got {v}")


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_finite_options(kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("always", SafepruneWarning)
                warnings.showwarning = _warning_printer(warnings.showwarning)
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SafepruneError as e:
            if state["debug"]:
                raise
            report("error", "bold red", e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if state["debug"]:
                raise
            report("interrupted", "bold red", interrupted_message())
            raise typer.Exit(130) from None
        except OSError as e:  # a file-system refusal on a path the user gave (name too long, permission, ...)
            if state["debug"]:
                raise
            report("error", "bold red", f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}")
            raise typer.Exit(2) from None
        except Exception as e:  # a bug: say so in one line, details with --debug
            if state["debug"]:
                raise
            report("internal error", "bold red", f"{type(e).__name__}: {e} (rerun with --debug for a traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        out.print(f"safeprune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
) -> None:
    state["debug"] = debug
    state["quiet"] = quiet


def main(argv: List[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="safeprune")
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(e.code)
