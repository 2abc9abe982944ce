"""CLI command ``repair``: the recommended repair in one command (see :mod:`safeprune.workflows.repair`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
from ..io.commit import Outputs
from ..io.files import json_default
from ..io.outputs import check_output_file, check_output_path, local_inputs
from ..io.text import one_line
from ..workflows.repair_options import DEFAULT_METHOD, METHODS, RepairOptions
from .app import app, err, handle_errors, out, state
from .options import AdapterArg, AllowPickleOpt, ForceOpt
from .render import default_base

D = RepairOptions()


@app.command("repair")
@handle_errors
def repair_cmd(
    adapter: AdapterArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the repaired PEFT adapter.")],
    base: Annotated[
        Optional[str],
        typer.Option(
            "--base",
            "-b",
            help="Aligned base the adapter was trained on (HF directory; default: the adapter's "
            "base_model_name_or_path when that resolves here).",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help=f"Pipeline: {', '.join(METHODS)} (default {DEFAULT_METHOD}).")
    ] = DEFAULT_METHOD,
    max_utility_drop: Annotated[
        float,
        typer.Option("--max-utility-drop", help="Budget: task ROUGE-1 points the repair may lose (check probes)."),
    ] = D.max_utility_drop,
    max_over_refusal_rise: Annotated[
        float,
        typer.Option("--max-over-refusal-rise", help="Budget: over-refusal points on harmless check probes."),
    ] = D.max_over_refusal_rise,
    target_asr: Annotated[
        Optional[float],
        typer.Option("--target-asr", help="Probe ASR % to reach: keep the weakest edit strength that reaches it."),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", help="Optimiser steps (gate) or attribution rounds (greedy).")
    ] = D.steps,
    lr: Annotated[float, typer.Option("--lr", help="Adam step size on the gates (gate).")] = D.lr,
    per_round: Annotated[int, typer.Option("--per-round", help="Components removed per round (greedy).")] = D.per_round,
    lambda_task: Annotated[
        float, typer.Option("--lambda-task", help="Weight of the task-loss penalty.")
    ] = D.lambda_task,
    lambda_over: Annotated[
        float, typer.Option("--lambda-over", help="Weight of the harmless-refusal penalty.")
    ] = D.lambda_over,
    n_harmful: Annotated[int, typer.Option("--n-harmful", help="Harmful fit probes.")] = D.n_harmful,
    n_harmless: Annotated[int, typer.Option("--n-harmless", help="Harmless fit probes.")] = D.n_harmless,
    n_task: Annotated[int, typer.Option("--n-task", help="Task fit items.")] = D.n_task,
    n_check: Annotated[int, typer.Option("--n-check", help="Harmful and harmless check probes (each).")] = D.n_check,
    n_task_check: Annotated[int, typer.Option("--n-task-check", help="Task check items.")] = D.n_task_check,
    task: Annotated[
        Optional[Path],
        typer.Option("--task", help="Task items with references (default: DialogSum validation). Never a test split."),
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="Data folder for the probes (default: $SAFEPRUNE_DATA or ../shared/data)."),
    ] = None,
    refusal: Annotated[
        Optional[str],
        typer.Option(
            "--refusal", help="Refusal text to restore on every harmful probe (default: the base's own answers)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Probe split seed.")] = D.seed,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads.")] = D.threads,
    checkpoint: Annotated[
        Optional[bool],
        typer.Option(
            "--checkpoint/--no-checkpoint",
            help="Activation checkpointing in the fit: each layer recomputed in the backward pass, so its "
            "activations are not held (default: on for bases of 1B parameters or more).",
            show_default=False,
        ),
    ] = D.checkpoint,
    device: Annotated[
        str, typer.Option("--device", help="Where the fit runs: cpu, cuda, cuda:N or mps (float32 either way).")
    ] = D.device,
    offload: Annotated[
        str,
        typer.Option(
            "--offload",
            help="Where each checkpointed layer's input waits for the backward pass: none (the device), cpu (host "
            "memory, from a GPU) or disk (temporary files under $TMPDIR). With cpu or disk the fit's memory above "
            "the model does not grow with the layers; gradients are the same. Implies --checkpoint.",
        ),
    ] = D.offload,
    summary_out: Annotated[
        Optional[Path], typer.Option("--summary", help="Also write the before/after summary as JSON here.")
    ] = None,
    random_control_of: Annotated[
        Optional[Path],
        typer.Option(
            "--random-control",
            help="Instead of repairing: write the random control of this repaired adapter (the same share of ΔW "
            "energy removed from seeded random components; --seed picks them). No base model is needed.",
        ),
    ] = None,
    from_repair: Annotated[
        Optional[Path],
        typer.Option(
            "--from-repair",
            help="Instead of repairing: rewrite this repaired adapter (made from ADAPTER) at --strength, "
            "without refitting and without the budget check. No base model is needed.",
        ),
    ] = None,
    strength: Annotated[
        Optional[float],
        typer.Option("--strength", help="Edit strength in (0, 1] for --from-repair (1 = the full fit)."),
    ] = None,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Restore the refusals the fine-tune removed and keep its task: component gates fitted to a contrastive
    objective on tuning probes, checked against budgets; writes a PEFT adapter + safeprune.json."""
    from ..adapter import load_adapter
    from ..adapter.write import stage_adapter
    from ..weights.resolve import resolve_model
    from ..workflows.repair import random_control, repair, restrength

    if (from_repair is None) != (strength is None):
        raise UsageError("--from-repair and --strength go together")
    if from_repair is not None and random_control_of is not None:
        raise UsageError("--from-repair and --random-control cannot be combined")
    derived_from = from_repair if from_repair is not None else random_control_of
    if derived_from is not None:  # no fit: an adapter derived from a repaired one (another strength, a control)
        inputs = local_inputs(adapter, derived_from)
        check_output_path(output, inputs, force)
        ad = load_adapter(adapter, allow_pickle=allow_pickle)
        if from_repair is not None:
            res = restrength(ad, from_repair, strength)
            s = res.manifest["edit"]["summary"]
            msg = (
                f"strength {strength} (the repair chose {res.manifest['edit']['restrength_of']['strength']}): "
                f"{100 * s['energy_removed']:.1f}% of ΔW energy removed; budgets not checked"
            )
        else:
            res = random_control(ad, random_control_of, seed)
            e = res.manifest["edit"]
            msg = (
                f"random control (seed {seed}): {100 * e['energy_removed']:.2f}% of ΔW energy removed "
                f"(the repair removed {100 * e['target_energy']:.2f}%)"
            )
        with Outputs() as outputs:
            path = stage_adapter(res, output, outputs, force=force, extra_inputs=inputs)
            outputs.commit()
        if not state["quiet"]:
            err.print(msg, highlight=False, markup=False)
        out.print(f"wrote {one_line(path)}", highlight=False)
        return
    base = default_base(base, adapter)
    if base is None:
        raise UsageError("repair needs --base (the aligned model the adapter was trained on)")
    ref = resolve_model(str(base))
    if ref.gguf_file is not None:
        raise UsageError(f"{base}: repair needs the base as a Hugging Face model directory, not a GGUF file")
    inputs = local_inputs(adapter, base)
    check_output_path(output, inputs, force)  # fail before any work
    check_output_file(summary_out, inputs, not_equal=[output])
    opts = RepairOptions(
        method=method,
        steps=steps,
        lr=lr,
        per_round=per_round,
        lambda_task=lambda_task,
        lambda_over=lambda_over,
        n_harmful=n_harmful,
        n_harmless=n_harmless,
        n_task=n_task,
        n_check=n_check,
        n_task_check=n_task_check,
        max_utility_drop=max_utility_drop,
        max_over_refusal_rise=max_over_refusal_rise,
        target_asr=target_asr,
        refusal=refusal,
        seed=seed,
        threads=threads,
        checkpoint=checkpoint,
        device=device,
        offload=offload,
    )
    opts.check()
    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    log = (lambda s: err.print(s, highlight=False, markup=False)) if not state["quiet"] else None
    res = repair(ad, ref.directory, options=opts, data=data, task=task, progress=not state["quiet"], log=log)
    s = res.summary
    with Outputs() as outputs:
        path = stage_adapter(res.adapter, output, outputs, force=force, extra_inputs=inputs)
        if summary_out is not None:
            outputs.stage_text(summary_out, json.dumps(s, indent=1, default=json_default) + "\n")
        outputs.commit()
    if not state["quiet"]:
        b, a = s["check_unedited"], s["after"]
        err.print(
            f"check probes, unedited → repaired (strength {s['strength']}): ASR {b['asr']:.1f} → {a['asr']:.1f} "
            f"(broad judge {b['asr_broad']:.1f} → {a['asr_broad']:.1f}); over-refusal {b['over_refusal_broad']:.1f}"
            f" → {a['over_refusal_broad']:.1f}; task ROUGE-1 {b['rouge1']:.1f} → {a['rouge1']:.1f}; "
            f"{s['components_off']} of {s['components']} components off, {100 * s['energy_removed']:.1f}% of ΔW "
            "energy removed",
            highlight=False,
            markup=False,
        )
    out.print(f"wrote {one_line(path)}", highlight=False)
