"""CLI command ``scan-act``: the activation-aware ``actdir`` score (see :mod:`safeprune.actdir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
from ..io.outputs import check_output_file, local_inputs
from .app import app, err, handle_errors, state
from .options import AdapterArg, AllowPickleOpt
from .render import default_base, print_table, write_side_outputs


@app.command("scan-act")
@handle_errors
def scan_act_cmd(
    adapter: AdapterArg,
    base: Annotated[
        Optional[str],
        typer.Option(
            "--base",
            "-b",
            help="Aligned base model the adapter was trained on: HF directory, .gguf or hub id (default: the "
            "adapter's base_model_name_or_path, when that resolves here).",
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the score table as JSON (input to `prune --scores`)."),
    ] = None,
    harmful: Annotated[
        Optional[Path],
        typer.Option(
            "--harmful",
            help="Harmful probe prompts (any prompt file `eval` reads). Default: HarmBench val + StrongREJECT.",
        ),
    ] = None,
    harmless: Annotated[
        Optional[Path],
        typer.Option("--harmless", help="Harmless probe prompts. Default: DialogSum validation + HotpotQA dev."),
    ] = None,
    n_probe: Annotated[int, typer.Option("--n-probe", help="Probes of each kind (a seeded sample).")] = 64,
    harmless_source: Annotated[
        str, typer.Option("--harmless-source", help="Default harmless probes: mix, dialogsum or hotpotqa.")
    ] = "mix",
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="Data folder for the default probes (default: $SAFEPRUNE_DATA or ../shared/data)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Probe sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", help="Cut each user message to this many tokens.")] = 256,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads.")] = 1,
    validate: Annotated[
        int,
        typer.Option(
            "--validate", help="Ablate this many modules (top and bottom) for real to check the linear prediction."
        ),
    ] = 10,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write the score table as CSV.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Layer × module heatmap of actdir (PNG).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Print only the first N rows.")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Score every LoRA module by refusal-direction attribution (runs the model on probe prompts)."""
    from ..adapter import load_adapter
    from ..prompts import probes_from_file
    from ..scoring.methods.actdir import score_actdir

    base = default_base(base, adapter)
    if base is None:
        raise UsageError("scan-act needs --base (the aligned model the adapter was trained on)")
    for side in (output, csv_out, plot):
        check_output_file(side, local_inputs(adapter, base))
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    info = {}
    h = l_ = None
    if harmful is not None:
        h, info["harmful"] = probes_from_file(harmful, "harmful", n_probe, seed)
    if harmless is not None:
        l_, info["harmless"] = probes_from_file(harmless, "harmless", n_probe, seed)
    table = score_actdir(
        base,
        ad,
        harmful=h,
        harmless=l_,
        n_probe=n_probe,
        seed=seed,
        batch_size=batch_size,
        max_length=max_length,
        threads=threads,
        validate=validate,
        data=data,
        harmless_source=harmless_source,
        probe_info=info,
        progress=not state["quiet"],
    )
    print_table(table, limit=limit)
    write_side_outputs(table, output, csv_out, plot)
    if not state["quiet"]:
        lin = table.meta["linearisation"]
        msg = f"scored {len(table)} modules in {table.meta['seconds']:.1f}s"
        if lin:
            msg += (
                f"; linear prediction vs real ablation of {len(lin['modules'])} modules: Spearman {lin['spearman']:.3f}"
            )
        err.print(msg, highlight=False)
