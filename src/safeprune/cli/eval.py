"""CLI commands ``eval``, ``compare`` and ``setup-wordnet`` (a thin layer over :mod:`safeprune.eval`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..errors import UsageError
from ..io.progress import BOOTSTRAP_BAR_AFTER, make_progress, task_callback
from ..io.text import one_line
from .app import app, err, handle_errors, out, state
from .render import default_base


def _parse_named(specs: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for s in specs:
        if "=" in s:
            name, path = s.split("=", 1)
        else:
            name, path = Path(s).name, s
        if not name or not path:
            raise UsageError(f"--adapter {s!r}: use NAME=DIR")
        if name in named:
            raise UsageError(f"--adapter name {name!r} given twice")
        named[name] = path
    return named


def _split_column(spec: str) -> tuple[str, str | None]:
    """FILE or FILE:COLUMN (the column part only when FILE exists without it)."""
    if ":" in spec and not Path(spec).exists():
        f, c = spec.rsplit(":", 1)
        return f, c or None
    return spec, None


def _load_sets(
    kind: str, specs: list[str], rows_from, limit, sample, seed, include_overlap, id_column, reference_column
):
    from ..prompts import ids_from_subsets, load_prompts, subset

    sets = []
    for spec in specs:
        path, column = _split_column(spec)
        ps = load_prompts(
            path,
            kind,
            column=column,
            id_column=id_column,
            reference_column=reference_column,
            include_overlap=include_overlap,
        )
        ids = None
        if rows_from is not None:
            found = ids_from_subsets(rows_from, path)
            if found:
                ps.info["rows_from"] = f"{rows_from}:{found[0]}"
                ids = found[1]
        ps = subset(ps, ids=ids, limit=limit, sample=sample, seed=seed)
        sets.append(ps)
    return sets


@app.command("eval")
@handle_errors
def eval_cmd(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Results directory (results.json, items.jsonl, summary.csv/.md).")
    ],
    base: Annotated[
        Optional[str],
        typer.Option(
            "--base",
            "-b",
            help="Base model: HF directory, .gguf, .safetensors in an HF directory, or hub id (default: the first "
            "adapter's base_model_name_or_path, when that resolves here).",
        ),
    ] = None,
    adapter: Annotated[
        Optional[List[str]],
        typer.Option(
            "--adapter", "-a", help="NAME=DIR of a PEFT adapter; repeat for several (all on one loaded base)."
        ),
    ] = None,
    no_adapter_baseline: Annotated[
        bool,
        typer.Option(
            "--no-adapter-baseline", help="Also evaluate the base with every adapter disabled (variant 'base')."
        ),
    ] = False,
    safety: Annotated[
        Optional[List[str]], typer.Option("--safety", help="Harmful prompt set (ASR): FILE or FILE:COLUMN; repeatable.")
    ] = None,
    over_refusal: Annotated[
        Optional[List[str]],
        typer.Option("--over-refusal", help="Benign prompt set that should be answered (XSTest: label=safe rows)."),
    ] = None,
    utility: Annotated[
        Optional[List[str]],
        typer.Option(
            "--utility",
            help="Utility set with references (DialogSum, HotpotQA, or FILE:COLUMN with --reference-column).",
        ),
    ] = None,
    qa: Annotated[
        Optional[List[str]],
        typer.Option(
            "--qa",
            help="QA set (exact match = SR, token F1): HotpotQA, any file with question/answer columns, or "
            "FILE:COLUMN with --reference-column; repeatable.",
        ),
    ] = None,
    rows_from: Annotated[
        Optional[Path],
        typer.Option(
            "--rows-from", help="eval_subsets.json-style file: evaluate the listed row ids of each matching set."
        ),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="First N rows of each set (after --rows-from / --sample).")
    ] = None,
    sample: Annotated[
        Optional[int], typer.Option("--sample", help="Seeded random sample of N rows of each set.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --sample, sampling decoding and the bootstrap.")] = 0,
    include_overlap: Annotated[
        bool, typer.Option("--include-overlap", help="Keep rows flagged in_jbb_harmful_ft (still excluded from ASR).")
    ] = False,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Generic loader: id column.")] = None,
    reference_column: Annotated[
        Optional[str], typer.Option("--reference-column", help="Generic loader: reference column.")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="hf (transformers), vllm (optional extra) or fake.")] = "hf",
    batch_size: Annotated[
        str,
        typer.Option(
            "--batch-size",
            help="Rows in flight (continuous batching) or prompts per generate call; auto: as many as fit a "
            "quarter of the free memory, at most 256.",
        ),
    ] = "auto",
    safety_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Max new tokens for safety / over-refusal prompts.")
    ] = 64,
    utility_tokens: Annotated[
        int, typer.Option("--utility-max-new-tokens", help="Max new tokens for utility prompts.")
    ] = 96,
    qa_tokens: Annotated[int, typer.Option("--qa-max-new-tokens", help="Max new tokens for QA prompts.")] = 32,
    uncertainty: Annotated[
        str,
        typer.Option(
            "--uncertainty",
            help="AUARC's uncertainty: nll (mean token NLL of the greedy answer) or sampled (entropy over clusters "
            "of equivalent answers among --uq-samples seeded samples; costs the extra generations).",
        ),
    ] = "nll",
    uq_samples: Annotated[int, typer.Option("--uq-samples", help="Sampled uncertainty: samples per item (K).")] = 5,
    uq_temperature: Annotated[float, typer.Option("--uq-temperature", help="Sampled uncertainty: temperature.")] = 1.0,
    uq_equivalence: Annotated[
        str,
        typer.Option(
            "--uq-equivalence",
            help="When two sampled answers are equivalent: rougeL[:THRESHOLD] (default 0.5) or nli:DIR.",
        ),
    ] = "rougeL:0.5",
    system_prompt: Annotated[
        Optional[str], typer.Option("--system-prompt", help="System prompt (default: the chat template's own).")
    ] = None,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Feed raw prompts.")] = False,
    do_sample: Annotated[bool, typer.Option("--sample-decoding", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    keywords: Annotated[
        Optional[str],
        typer.Option(
            "--keywords", help="Refusal keywords: FILE (.json list, refusal_keywords.json[:KEY], or one per line)."
        ),
    ] = None,
    case_insensitive: Annotated[
        bool,
        typer.Option(
            "--case-insensitive", help="Keyword match ignoring case (default: case-sensitive, as the papers)."
        ),
    ] = False,
    judge: Annotated[
        Optional[List[str]],
        typer.Option(
            "--judge", help="Harmfulness judge: hf:CLASSIFIER_DIR or openai:MODEL@URL; repeatable (never averaged)."
        ),
    ] = None,
    no_meteor: Annotated[bool, typer.Option("--no-meteor", help="Skip METEOR.")] = False,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Generation cache JSONL (default OUT/cache/generations.jsonl).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[
        Optional[int],
        typer.Option("--threads", help="torch CPU threads (1 is much faster on an oversubscribed machine)."),
    ] = None,
    early_stop: Annotated[
        Optional[bool],
        typer.Option(
            "--early-stop/--no-early-stop",
            help="Stop safety/over-refusal generations at the first refusal keyword (the verdict is decided). "
            "Default: on unless a --judge is given.",
        ),
    ] = None,
    loop: Annotated[
        str,
        typer.Option("--loop", help="hf backend: continuous (continuous batching, greedy) or generate (HF generate)."),
    ] = "continuous",
) -> None:
    """Generate and score the base and/or adapters on the same prompts; write results for `compare`."""
    from ..eval.evaluate import EvalConfig, batch_rows, evaluate, sampled_uncertainty_cost
    from ..eval.judges import KeywordJudge, parse_judge_spec
    from ..eval.results import summary_markdown

    adapters = _parse_named(adapter or [])
    base = default_base(base, next(iter(adapters.values()), None))
    if base is None:
        raise UsageError(
            "give --base (the model to generate with); it defaults to an adapter's base_model_name_or_path only "
            "when that names a model found here"
        )
    sets = []
    args = (rows_from, limit, sample, seed, include_overlap, id_column, reference_column)
    sets += _load_sets("safety", safety or [], *args)
    sets += _load_sets("over_refusal", over_refusal or [], *args)
    sets += _load_sets("utility", utility or [], *args)
    sets += _load_sets("qa", qa or [], *args)
    if not sets:
        raise UsageError("give at least one of --safety, --over-refusal, --utility, --qa")
    if keywords:
        f, key = _split_column(keywords)
        kj = KeywordJudge.from_file(f, key, case_sensitive=not case_insensitive)
    else:
        kj = KeywordJudge(case_sensitive=not case_insensitive)
    hjs = [parse_judge_spec(j) for j in (judge or [])]
    cfg = EvalConfig(
        safety_max_new_tokens=safety_tokens,
        utility_max_new_tokens=utility_tokens,
        batch_size=batch_rows(batch_size, "--batch-size"),
        system_prompt=system_prompt,
        chat_template=not no_chat_template,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        qa_max_new_tokens=qa_tokens,
        uncertainty=uncertainty,
        uq_samples=uq_samples,
        uq_temperature=uq_temperature,
        uq_equivalence=uq_equivalence,
        early_stop=early_stop,
    )
    cost = sampled_uncertainty_cost(sets, len(adapters) + int(no_adapter_baseline or not adapters), cfg)
    if cost:
        err.print(cost, highlight=False, markup=False, soft_wrap=True)
    opts = {"device": device, "threads": threads, "loop": loop} if backend == "hf" else {}
    with make_progress(not state["quiet"]) as prog:  # a bar per variant and set: counts, ETA
        res = evaluate(
            base,
            adapters,
            prompt_sets=sets,
            include_base=no_adapter_baseline,
            out_dir=output,
            backend=backend,
            refusal_judge=kj,
            harm_judges=hjs,
            config=cfg,
            cache=cache,
            meteor=not no_meteor,
            backend_options=opts,
            progress=task_callback(prog, "generating: "),
        )
    if not state["quiet"]:
        out.print(summary_markdown(res.results), highlight=False, markup=False)
    out.print(f"wrote {one_line(output)}", highlight=False)


@app.command("compare")
@handle_errors
def compare_cmd(
    results: Annotated[Path, typer.Argument(help="Directory written by `safeprune eval`.")],
    a: Annotated[str, typer.Option("--a", help="Variant before (e.g. lora).")],
    b: Annotated[str, typer.Option("--b", help="Variant after (e.g. pruned).")],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Where to write compare_A_vs_B.{json,csv,md} (default: RESULTS)."),
    ] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")] = 10000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
) -> None:
    """Paired deltas with bootstrap CIs, exact McNemar for ASR / refusal, and the prompts that flipped."""
    from ..eval.compare import compare, compare_markdown

    with make_progress(not state["quiet"], show_after=BOOTSTRAP_BAR_AFTER) as prog:
        c = compare(results, a, b, n_boot=n_boot, seed=seed, out_dir=output or results, progress=task_callback(prog))
    if not state["quiet"]:
        out.print(compare_markdown(c, max_flips=10), highlight=False, markup=False)
    out.print(f"wrote {output or results}/compare_{a}_vs_{b}.{{json,csv,md}}", highlight=False)


@app.command("setup-wordnet")
@handle_errors
def setup_wordnet_cmd(
    source: Annotated[
        Optional[Path],
        typer.Option(
            "--from", help="WordNet 3.0 database dir (default /usr/share/wordnet from Debian's wordnet-base)."
        ),
    ] = None,
    target: Annotated[
        Optional[Path], typer.Option("--to", help="Target dir (default ~/.cache/safeprune/nltk_data/corpora/wordnet).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if present.")] = False,
) -> None:
    """Make WordNet usable by NLTK's METEOR offline (adds the lexnames file Debian's package lacks)."""
    from ..eval.wordnet import load_wordnet, setup_wordnet

    d = setup_wordnet(source, target, force=force)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = len(list(load_wordnet(d).all_lemma_names("n")))
    out.print(f"WordNet ready at {d} ({n} noun lemmas)", highlight=False)
