"""The small LoRA training loop behind ``safeprune demo``: a few dozen AdamW steps on a built-in instruction
set, seeded, with a progress bar. (``safeprune finetune`` uses transformers' Trainer: :mod:`.trainer`.)"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from peft import LoraConfig, get_peft_model

from ..errors import InputError
from ..io.progress import make_progress
from .data import IGNORE, encode_chat


@dataclass
class LoraSettings:
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass
class TrainSettings:
    steps: int = 30
    batch_size: int = 4
    lr: float = 5e-4
    max_length: int = 192
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0


def _batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [encoded[j] for j in order[i : i + batch_size]]
            n = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            lab = torch.full((len(chunk), n), IGNORE, dtype=torch.long)
            att = torch.zeros((len(chunk), n), dtype=torch.long)
            for k, (a, b) in enumerate(chunk):
                ids[k, : len(a)] = torch.tensor(a)
                lab[k, : len(b)] = torch.tensor(b)
                att[k, : len(a)] = 1
            yield ids, lab, att


def train_lora(
    model,
    tokenizer,
    examples: Iterable[dict[str, Any]],
    lora: LoraSettings | None = None,
    train: TrainSettings | None = None,
    *,
    progress: bool = True,
    log: list[float] | None = None,
):
    """Attach a fresh LoRA to ``model`` and train it; returns the PeftModel."""
    lora = lora or LoraSettings()
    train = train or TrainSettings()
    torch.manual_seed(train.seed)
    rng = random.Random(train.seed)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, cfg)
    pm.train()
    encoded = [encode_chat(tokenizer, ex["messages"], train.max_length) for ex in examples]
    encoded = [e for e in encoded if any(l != IGNORE for l in e[1])]
    if not encoded:
        raise InputError("every training example was truncated away (increase max_length)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)

    def lr_at(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = _batches(encoded, train.batch_size, pad, rng)
    with make_progress(progress) as prog:
        task = prog.add_task("training LoRA", total=train.steps, module="")
        for step in range(train.steps):
            ids, lab, att = next(batches)
            outp = pm(input_ids=ids, attention_mask=att, labels=lab)
            loss = outp.loss
            lv = loss.item()
            if not math.isfinite(lv):
                raise InputError(f"training diverged at step {step} (loss {lv})")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if log is not None:
                log.append(lv)
            prog.update(task, advance=1, module=f"loss {lv:.3f}")
    pm.eval()
    return pm
