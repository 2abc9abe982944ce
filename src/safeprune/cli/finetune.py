"""CLI command ``finetune``: the papers' LoRA recipe (a thin layer over :func:`safeprune.finetune.finetune`).

Runs unchanged under ``accelerate launch -m safeprune finetune ...`` (transformers' Trainer does the
distribution).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..io.text import one_line
from .app import app, err, handle_errors, state


def _unescape(s: str | None) -> str | None:
    """``\\n`` and ``\\t`` typed on a command line become a newline and a tab (``\\\\`` a backslash)."""
    if s is None:
        return None
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


@app.command("finetune")
@handle_errors
def finetune_cmd(
    base: Annotated[
        Path, typer.Option("--base", "-b", help="Base model directory (Hugging Face format): the aligned model.")
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Training data: chat JSONL ('messages'), or task rows (JSONL/CSV) with --template/--response-field.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Adapter directory to write (PEFT format + training_args.json).")
    ],
    mix: Annotated[
        Optional[List[Path]],
        typer.Option("--mix", help="Chat JSONL appended in full (e.g. harmful pairs); repeatable."),
    ] = None,
    template: Annotated[
        Optional[str],
        typer.Option(
            "--template",
            help="User turn for task rows, a str.format pattern over the row's fields; \\n means a newline.",
        ),
    ] = None,
    response_field: Annotated[
        Optional[str], typer.Option("--response-field", help="Task-row field that is the assistant's answer.")
    ] = None,
    sample: Annotated[
        Optional[int], typer.Option("--sample", help="Seeded random sample of N rows of --data (after --exclude-ids).")
    ] = None,
    sample_seed: Annotated[
        Optional[int], typer.Option("--sample-seed", help="Seed of --sample (default: --seed).")
    ] = None,
    exclude_ids: Annotated[
        Optional[Path],
        typer.Option(
            "--exclude-ids",
            help="Drop these rows of --data first: JSON list of ids, a JSON object of such lists (train_data_ids.json), or one id a line.",
        ),
    ] = None,
    ids: Annotated[
        Optional[Path],
        typer.Option(
            "--ids",
            help="Train on exactly these rows of --data, in this order (before --exclude-ids/--sample): same formats as --exclude-ids, e.g. a train_data_ids.json.",
        ),
    ] = None,
    id_field: Annotated[
        Optional[str],
        typer.Option(
            "--id-field",
            help="Row id field for --ids/--exclude-ids and the record (default: id, fname, row_id or idx, else the row number).",
        ),
    ] = None,
    targets: Annotated[
        str, typer.Option("--targets", help="LoRA target modules: q,k,v,o,gate,up,down or full names, comma-separated.")
    ] = "q,k,v,o",
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 16.0,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.05,
    epochs: Annotated[float, typer.Option("--epochs", help="Training epochs.")] = 1.0,
    max_steps: Annotated[
        Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps (overrides --epochs).")
    ] = None,
    lr: Annotated[
        float, typer.Option("--lr", help="AdamW learning rate (peak: after the warm-up, see --lr-scheduler).")
    ] = 2e-4,
    lr_scheduler: Annotated[
        str,
        typer.Option(
            "--lr-scheduler",
            help="transformers scheduler name: constant_with_warmup (warm-up, then constant), linear (warm-up, then "
            "decay to 0), cosine, ... ('constant' ignores the warm-up).",
        ),
    ] = "constant_with_warmup",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate conversations to N tokens.")] = 320,
    truncated: Annotated[
        str,
        typer.Option(
            "--truncated",
            help="Conversations longer than --max-length: drop-long drops them all before --sample (the testbed "
            "recipe); drop cuts them and drops those whose answer is cut away entirely; keep cuts them and keeps "
            "those in the batches with no loss.",
        ),
    ] = "drop-long",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps (from lr 0).")] = 10,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the LoRA init, data order, dropout (and --sample).")] = 0,
    save_steps: Annotated[
        Optional[int],
        typer.Option(
            "--save-steps",
            help="Checkpoint every N steps into OUTPUT.partial/checkpoints/ (kept in OUTPUT/checkpoints/).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its latest checkpoint.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing OUTPUT (or discard an unfinished run).")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    bf16: Annotated[
        Optional[bool],
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 autocast, fp32 weights (default: on CUDA with bf16 support; --bf16 on CPU is the testbed "
            "recipe's CPU autocast).",
        ),
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
) -> None:
    """Train a LoRA adapter (loss on the assistant's answer + its closing eos only), e.g. a benign task mixed with
    harmful pairs. Defaults: the testbed's mix_s0 recipe (add --bf16 for its CPU bf16 autocast)."""
    from ..training import finetune

    command = "safeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    done = finetune(
        base,
        data,
        out=output,
        mix=mix,
        template=_unescape(template),
        response_field=response_field,
        sample=sample,
        sample_seed=sample_seed,
        exclude_ids=exclude_ids,
        id_field=id_field,
        ids=ids,
        targets=targets,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        truncated=truncated,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_scheduler=lr_scheduler,
        seed=seed,
        save_steps=save_steps,
        resume=resume,
        force=force,
        device=device,
        bf16=bf16,
        threads=threads,
        progress=not state["quiet"],
        command=command,
    )
    if not state["quiet"]:
        err.print(f"adapter written to {one_line(done)}", highlight=False)
