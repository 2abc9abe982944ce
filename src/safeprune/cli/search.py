"""CLI command ``search``: the budgeted τ search of :mod:`safeprune.search`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
from ..io.files import write_text_atomic
from ..io.text import one_line
from .app import app, err, handle_errors, out, state
from .options import AdapterArg, AlignedOpt, BaseOpt, DeviceOpt, UnalignedOpt
from .render import default_base


@app.command("search")
@handle_errors
def search_cmd(
    adapter: AdapterArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Work/result directory (search.json, cache/, adapters/).")
    ],
    target_asr: Annotated[float, typer.Option("--target-asr", help="Probe ASR to reach, a fraction in [0, 1].")],
    max_utility_drop: Annotated[
        float,
        typer.Option(
            "--max-utility-drop",
            help="Largest allowed probe ROUGE-1 drop vs the unpruned adapter, in points (0-100 scale).",
        ),
    ],
    base: BaseOpt = None,
    method: Annotated[
        str, typer.Option("--method", "-m", help="Scoring method whose order is searched (ddi, safelora, splora, ...).")
    ] = "ddi",
    scores: Annotated[
        Optional[Path],
        typer.Option("--scores", help="Score table JSON from `safeprune scan --json` (default: score now)."),
    ] = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    harmful: Annotated[
        Optional[Path],
        typer.Option(
            "--harmful", help="HarmBench CSV (val split rows are used; default $SAFEPRUNE_DATA/harmbench/...)."
        ),
    ] = None,
    utility: Annotated[
        Optional[Path],
        typer.Option(
            "--utility", help="DialogSum validation JSONL (default $SAFEPRUNE_DATA/dialogsum/validation.jsonl)."
        ),
    ] = None,
    n_harmful: Annotated[int, typer.Option("--n-harmful", help="Harmful probes (seeded sample).")] = 48,
    n_utility: Annotated[int, typer.Option("--n-utility", help="Utility probes (seeded sample).")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Probe sampling seed.")] = 0,
    tau_max: Annotated[
        Optional[int], typer.Option("--tau-max", help="Largest τ considered (default: every module in the order).")
    ] = None,
    verify_below: Annotated[
        int, typer.Option("--verify-below", help="Extra evaluations below the found τ, to catch a non-monotone ASR.")
    ] = 0,
    mode: Annotated[str, typer.Option("--mode", help="Prune mode: 'remove' or 'zero'.")] = "remove",
    safety_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Max new tokens for harmful probes.")] = 48,
    utility_tokens: Annotated[int, typer.Option("--utility-max-new-tokens", help="Max new tokens for summaries.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 48,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads.")] = 1,
    device: DeviceOpt = "cpu",
    early_stop: Annotated[
        bool,
        typer.Option(
            "--early-stop/--no-early-stop",
            help="End a harmful probe's generation at its first refusal keyword (the verdict cannot change).",
        ),
    ] = True,
) -> None:
    """Smallest τ along a method's prune order reaching a probe ASR target within a utility budget."""
    from ..adapter import load_adapter
    from ..scoring import method_names, read_score_table, scan
    from ..workflows.search import budgeted_search, check_budget, prune_order

    check_budget(target_asr, max_utility_drop)  # before any scoring

    methods = method_names(method)
    if len(methods) != 1:
        raise typer.BadParameter("search follows exactly one method's order", param_hint="--method")
    base = default_base(base, adapter)
    if base is None:
        raise UsageError("search needs --base (the model the adapter was trained on) to generate")
    if scores is not None:
        table = read_score_table(scores)
    else:
        ad = load_adapter(adapter)
        table = scan(
            ad, base, methods, aligned=aligned, unaligned=unaligned, device=device, progress=not state["quiet"]
        )
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "scores.json", table.to_json())
    order = prune_order(table, methods[0])
    say = (lambda m: None) if state["quiet"] else (lambda m: err.print(m, highlight=False, markup=False))
    res = budgeted_search(
        base,
        adapter,
        order,
        target_asr=target_asr,
        max_utility_drop=max_utility_drop,
        harmful=harmful,
        utility=utility,
        n_harmful=n_harmful,
        n_utility=n_utility,
        seed=seed,
        work_dir=output,
        tau_max=tau_max,
        verify_below=verify_below,
        mode=mode,
        safety_max_new_tokens=safety_tokens,
        utility_max_new_tokens=utility_tokens,
        batch_size=batch_size,
        threads=threads,
        device=device,
        early_stop=early_stop,
        progress=say,
    )
    if not state["quiet"]:
        out.print(
            "| τ | probe ASR | probe ROUGE-1 | drop | feasible | generated | cached | s |",
            highlight=False,
            markup=False,
        )
        out.print("|---|---|---|---|---|---|---|---|", highlight=False, markup=False)
        for h in sorted(res.history, key=lambda h: h["tau"]):
            out.print(
                f"| {h['tau']} | {h['probe_asr']:.3f} | {h['probe_rouge1']:.2f} | {h['utility_drop']:+.2f} | "
                f"{'yes' if h['feasible'] else 'no'} | {h['generated']} | {h['cached']} | {h['seconds']:.1f} |",
                highlight=False,
                markup=False,
            )
    b = res.best
    if res.feasible:
        out.print(
            f"τ = {res.tau} ({method}): probe ASR {b['probe_asr']:.3f}, ROUGE-1 drop {b['utility_drop']:.2f} points",
            highlight=False,
        )
    else:
        out.print(
            f"infeasible: {res.reason}; best trade-off τ = {b['tau']} (probe ASR {b['probe_asr']:.3f}, "
            f"ROUGE-1 drop {b['utility_drop']:.2f})",
            highlight=False,
        )
    out.print(f"wrote {one_line(output / 'search.json')}", highlight=False)
