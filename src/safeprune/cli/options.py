"""Options shared by several commands, written once, and the scoring methods' own flags, built from the
methods' declarations (:mod:`safeprune.scoring.params`, which imports no model library) — as mergekit's ``parameters()`` and PEFT's field
metadata do — so a method's option exists in exactly one place."""

from __future__ import annotations

import functools
import inspect
import types
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin

import typer
from typing_extensions import Annotated

from ..scoring.params import PARAMETERS, Param

AdapterArg = Annotated[
    Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False, metavar="ADAPTER_DIR")
]
BaseOpt = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        "-b",
        help="Base model the adapter was trained on: HF directory, .safetensors, .gguf or hub id "
        "(default: the adapter's base_model_name_or_path, when that resolves here).",
    ),
]
AlignedOpt = Annotated[
    Optional[str], typer.Option("--aligned", help="Aligned (chat/safety-tuned) model, for pair methods.")
]
UnalignedOpt = Annotated[
    Optional[str], typer.Option("--unaligned", help="Unaligned counterpart of --aligned, for pair methods.")
]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Scoring method(s), comma-separated, or 'all'.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
TypesOpt = Annotated[
    Optional[str], typer.Option("--types", help="Only these module types, e.g. q_proj,v_proj (or q,k,v,o).")
]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Read adapter_model.bin with torch.load(weights_only=True).")
]
AutoTauOpt = Annotated[
    Optional[str],
    typer.Option(
        "--auto-tau",
        help="Choose τ from the scores: 'knee' (Kneedle on the sorted scores) or 'mad' (outliers beyond median + k·MAD).",
    ),
]
MadKOpt = Annotated[float, typer.Option("--mad-k", help="k for --auto-tau mad.")]
AllowEmptyOpt = Annotated[
    bool,
    typer.Option("--allow-empty", help="Write the adapter even when the rule selects no module (otherwise an error)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]
OutputDirOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Output adapter directory (must not exist unless --force).")
]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the score table as JSON.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Also write the score table as CSV.")]


def _cli_type(t: Any) -> Any:
    """``float | None`` -> ``Optional[float]`` (what Typer understands)."""
    if isinstance(t, types.UnionType) or get_origin(t) is Union:
        args = [a for a in get_args(t) if a is not type(None)]
        return Optional[args[0]] if len(args) == 1 else str
    return t


def method_flags() -> dict[str, Param]:
    """Every CLI flag the methods declare, keyed by its Python parameter name (one entry per flag: methods
    declaring the same flag, like ``--seed``, share it; the first declaration's help wins)."""
    flags: dict[str, Param] = {}
    for params in PARAMETERS.values():
        for p in params:
            if p.cli:
                flags.setdefault(p.cli_flag[2:].replace("-", "_"), p)
    return flags


class MethodOptions:
    """The values of the method flags of one command line, handed out per method."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def for_methods(self, methods: list[str]) -> dict[str, dict[str, Any]]:
        """``{method: {option: value}}`` for each of ``methods`` that declares CLI options."""
        opts: dict[str, dict[str, Any]] = {}
        for m in methods:
            declared = [p for p in PARAMETERS.get(m, ()) if p.cli]
            if declared:
                opts[m] = {p.name: self.values[p.cli_flag[2:].replace("-", "_")] for p in declared}
        return opts


def with_method_options(fn: Callable) -> Callable:
    """Give a command one flag per declared method option; the command receives them bundled as its
    ``method_options: MethodOptions`` argument."""
    flags = method_flags()
    sig = inspect.signature(fn, eval_str=True)  # Typer reads the signature as given: no string annotations
    params = [p for p in sig.parameters.values() if p.name != "method_options"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs["method_options"] = MethodOptions({k: kwargs.pop(k) for k in flags})
        return fn(*args, **kwargs)

    annotations = {k: v for k, v in fn.__annotations__.items() if k != "method_options"}
    for name, p in flags.items():
        ann = Annotated[_cli_type(p.type), typer.Option(p.cli_flag, help=p.help)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=ann))
        annotations[name] = ann
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = annotations
    return wrapper
