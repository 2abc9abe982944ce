"""CLI command ``run`` (a thin layer over :func:`safeprune.experiment.run_experiment`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..io.text import one_line
from .app import app, handle_errors, out, state


@app.command("run")
@handle_errors
def run_cmd(
    config: Annotated[
        Path,
        typer.Argument(
            help="Experiment file (YAML): models, adapters or a finetune stage, "
            "methods and τ values, evaluation sets. See docs/experiments.md.",
            metavar="EXPERIMENT.yaml",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output directory (stages cache their outputs here; a rerun redoes only what changed).",
        ),
    ],
    stop_after: Annotated[
        Optional[str], typer.Option("--stop-after", help="Stop after finetune, score, edit or evaluate.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Validate the experiment file and print the resolved plan; run nothing.")
    ] = False,
    only: Annotated[
        Optional[str],
        typer.Option(
            "--only",
            help="Run only these adapters (comma-separated names), e.g. to split one study over several processes; combine later with one full run that reuses their caches.",
        ),
    ] = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Generation cache file (overrides evaluation.cache).")
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Print the number of generations and the expected generation time (from a short warm-up on "
            "the base model); run nothing else.",
        ),
    ] = False,
) -> None:
    """Finetune? → score (methods + the random control) → edit → evaluate before/after → report.md + report.html."""
    from ..workflows.experiment import estimate_experiment, estimate_lines, load_config, run_experiment

    cfg = load_config(config)
    if only:
        cfg = cfg.restrict(only.split(","))
    if cache:
        cfg.evaluation.cache = str(cache.resolve())
    if check:
        out.print_json(cfg.model_dump_json())
        return
    if estimate:
        for line in estimate_lines(estimate_experiment(cfg)):
            out.print(line, highlight=False, markup=False)
        return
    res = run_experiment(
        cfg,
        output,
        progress=not state["quiet"],
        stop_after=stop_after,
        command="safeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if res.analysis:
        out.print(f"report: {one_line(res.report_md)}  ·  {one_line(res.report_html)}")
