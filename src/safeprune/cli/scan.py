"""``safeprune scan``: score every LoRA module with one or more methods."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..io.outputs import check_output_file, local_inputs
from ..io.text import one_line
from .app import app, err, handle_errors, state
from .options import (
    AdapterArg,
    AlignedOpt,
    AllowPickleOpt,
    BaseOpt,
    DeviceOpt,
    MethodOpt,
    MethodOptions,
    TypesOpt,
    UnalignedOpt,
    with_method_options,
)
from .render import default_base, print_agreement, print_table, write_side_outputs


@app.command("scan")
@handle_errors
@with_method_options
def scan_cmd(
    adapter: AdapterArg,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    method: MethodOpt = "ddi",
    device: DeviceOpt = "cpu",
    types: TypesOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the score table as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write the score table as CSV.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a layer × module heatmap (PNG).")] = None,
    sort: Annotated[str, typer.Option("--sort", help="Table order: 'rank' or 'module'.")] = "rank",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Print only the first N rows.")] = None,
    allow_pickle: AllowPickleOpt = False,
    method_options: MethodOptions = None,
) -> None:
    """Score every LoRA module (S, O, M, M_norm, DDI, DDI_norm and rank for DDI)."""
    from ..adapter import load_adapter
    from ..scoring import method_names, scan

    methods = method_names(method)
    base = default_base(base, adapter, methods)
    for side in (json_out, csv_out, plot):
        check_output_file(side, local_inputs(adapter, base, aligned, unaligned))
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    table = scan(
        ad,
        base,
        methods,
        aligned=aligned,
        unaligned=unaligned,
        device=device,
        module_types=types,
        options=method_options.for_methods(methods),
        progress=not state["quiet"],
    )
    print_table(table, sort=sort, limit=limit)
    if len(table.methods) > 1:
        print_agreement(table)
    write_side_outputs(table, json_out, csv_out, plot)
    if not state["quiet"]:
        err.print(f"scored {len(table)} modules in {table.meta['seconds']:.2f}s", highlight=False)
        for p in (json_out, csv_out, plot):
            if p is not None and str(p) != "-":
                err.print(f"wrote {one_line(p)}", highlight=False)
