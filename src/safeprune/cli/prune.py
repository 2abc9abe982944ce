"""``safeprune prune``: score, select and prune modules; write a new PEFT adapter plus safeprune.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..io.commit import Outputs
from ..io.outputs import check_output_file, check_output_path, local_inputs
from ..io.text import one_line
from .app import app, err, handle_errors, out, state
from .options import (
    AdapterArg,
    AlignedOpt,
    AllowEmptyOpt,
    AllowPickleOpt,
    AutoTauOpt,
    BaseOpt,
    CsvOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    MadKOpt,
    MethodOptions,
    OutputDirOpt,
    TypesOpt,
    UnalignedOpt,
    with_method_options,
)
from .render import check_selection, default_base, print_table, stage_side_outputs


@app.command("prune")
@handle_errors
@with_method_options
def prune_cmd(
    adapter: AdapterArg,
    output: OutputDirOpt,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method that ranks the modules.")] = "ddi",
    top: Annotated[
        Optional[int], typer.Option("--top", help="Prune the τ highest-ranked modules (default 10).")
    ] = None,
    threshold: Annotated[
        Optional[float], typer.Option("--threshold", help="Prune modules whose score is at/over θ.")
    ] = None,
    threshold_norm: Annotated[
        Optional[float], typer.Option("--threshold-norm", help="Same on the bounded score (ddi_norm).")
    ] = None,
    auto_tau: AutoTauOpt = None,
    mad_k: MadKOpt = 3.0,
    scores: Annotated[
        Optional[Path],
        typer.Option(
            "--scores",
            help="Rank with this precomputed score table (JSON from scan --json or scan-act) instead of scoring.",
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="'remove' (drop tensors, rewrite target_modules) or 'zero' (zero lora_B).")
    ] = "remove",
    device: DeviceOpt = "cpu",
    types: TypesOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = None,
    csv_out: CsvOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Heatmap with the pruned modules marked.")] = None,
    allow_pickle: AllowPickleOpt = False,
    allow_empty: AllowEmptyOpt = False,
    method_options: MethodOptions = None,
) -> None:
    """Score, select and prune modules; write a new PEFT adapter plus safeprune.json."""
    from ..adapter import load_adapter, stage_adapter
    from ..edit import prune
    from ..scoring import method_names, read_score_table

    methods = method_names(method)
    if len(methods) != 1:
        raise typer.BadParameter("prune ranks by exactly one method", param_hint="--method")
    if scores is None:
        base = default_base(base, adapter, methods)
    inputs = local_inputs(adapter, base, aligned, unaligned)
    check_output_path(output, inputs, force)  # fail before reading or scoring anything
    for side in (json_out, csv_out, plot):
        check_output_file(side, inputs, not_equal=[output])
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    table = read_score_table(scores, ad) if scores is not None else None
    edited = prune(
        ad,
        base,
        method=methods[0],
        table=table,
        top=top,
        threshold=threshold,
        threshold_norm=threshold_norm,
        auto=auto_tau,
        mad_k=mad_k,
        module_types=types,
        mode=mode,
        aligned=aligned,
        unaligned=unaligned,
        device=device,
        options=method_options.for_methods(methods),
        progress=not state["quiet"],
    )
    marked = set(edited.selection.selected)
    print_table(edited.scores, marked=marked)
    check_selection(edited, "prunes", allow_empty)
    with Outputs() as outputs:  # the adapter and the side files: all or none
        path = stage_adapter(edited, output, outputs, force=force, extra_inputs=inputs)
        stage_side_outputs(outputs, edited.scores, json_out, csv_out, plot, marked=marked)
        outputs.commit()
    ed = edited.manifest["edit"]
    if not state["quiet"]:
        total = ad.num_params
        acting = total - sum(ad.modules[n].num_params for n in marked)  # zeroed tensors are kept but do nothing
        share = (
            f"LoRA parameters kept: {ed['lora_params_kept_pct']:.1f}%"
            if mode == "remove"
            else (f"LoRA parameters still acting: {100.0 * acting / total:.1f}% (the zeroed ones stay in the file)")
        )
        err.print(
            f"{'removed' if mode == 'remove' else 'zeroed'} {len(marked)} of {ed['modules_before']} modules "
            f"({edited.selection.rule.describe()}); {share}",
            highlight=False,
        )
    out.print(f"wrote {one_line(path)}", highlight=False)
