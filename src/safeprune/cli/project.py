"""``safeprune project``: SafeLoRA's projection of the least-aligned modules."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
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
    DeviceOpt,
    MadKOpt,
    TypesOpt,
    UnalignedOpt,
)
from .render import check_selection, print_table, stage_side_outputs


@app.command("project")
@handle_errors
def project_cmd(
    adapter: AdapterArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output adapter directory (must not exist unless --force).")
    ],
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    method: Annotated[
        str, typer.Option("--method", "-m", help="Ranking method; the projection is SafeLoRA's.")
    ] = "safelora",
    top: Annotated[
        Optional[int], typer.Option("--top", help="Project the K modules with the lowest cosine (default 10).")
    ] = None,
    threshold: Annotated[
        Optional[float], typer.Option("--threshold", help="Project every module with cos <= τ (paper: 0.5).")
    ] = None,
    auto_tau: AutoTauOpt = None,
    mad_k: MadKOpt = 3.0,
    device: DeviceOpt = "cpu",
    types: TypesOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the score table as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write the score table as CSV.")] = None,
    allow_pickle: AllowPickleOpt = False,
    allow_empty: AllowEmptyOpt = False,
) -> None:
    """SafeLoRA: replace lora_B of the least-aligned modules by C·lora_B (C = VVᵀ/‖V‖_F); write a PEFT adapter + safeprune.json."""
    from ..adapter import load_adapter, stage_adapter
    from ..api import project

    if aligned is None or unaligned is None:
        raise UsageError("project needs --aligned (the aligned/chat model) and --unaligned (its base counterpart)")
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    inputs = local_inputs(adapter, aligned, unaligned)
    check_output_path(output, inputs, force)  # fail before the (slow) scan
    for side in (json_out, csv_out):
        check_output_file(side, inputs, not_equal=[output])
    edited = project(
        ad,
        aligned,
        unaligned,
        method=method,
        top=top,
        threshold=threshold,
        auto=auto_tau,
        mad_k=mad_k,
        module_types=types,
        device=device,
        progress=not state["quiet"],
    )
    marked = set(edited.selection.selected)
    print_table(edited.scores, marked=marked)
    check_selection(edited, "projects", allow_empty)
    with Outputs() as outputs:  # the adapter and the side files: all or none
        path = stage_adapter(edited, output, outputs, force=force, extra_inputs=inputs)
        stage_side_outputs(outputs, edited.scores, json_out, csv_out, None, marked=marked)
        outputs.commit()
    if not state["quiet"]:
        err.print(f"projected {len(marked)} of {len(ad)} modules ({edited.selection.rule.describe()})", highlight=False)
    out.print(f"wrote {one_line(path)}", highlight=False)
