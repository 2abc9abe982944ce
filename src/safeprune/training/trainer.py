"""``safeprune finetune``: the papers' LoRA recipe on transformers' Trainer (works under ``accelerate
launch``; only process 0 writes the output), with checkpoints, resume, a progress bar and a training record."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..errors import InputError, UsageError
from ..io.commit import swap_dir_into_place
from ..io.devices import resolve_device
from ..io.hashing import sha256_hex
from ..weights.resolve import resolve_model
from .callbacks import progress_callback
from .checks import check_finetune, partial_dir
from .data import (
    IGNORE,
    ListDataset,
    build_training_data,
    encode_chat,
    load_id_list,
    pad_collator,
    parse_targets,
)


def _id_source(spec: Iterable[str] | str | Path | None) -> tuple[Path | None, list[str] | None]:
    """(file, ids) of an id list given as a file path or as the ids themselves."""
    if spec is None:
        return None, None
    if isinstance(spec, (str, Path)):
        return Path(spec), load_id_list(spec)
    return None, [str(x) for x in spec]


def _id_record(key: str, file: Path | None, ids: list[str] | None) -> dict[str, Any]:
    given = str(file) if file else (None if ids is None else f"{len(ids)} ids given in the call")
    return {key: given, f"{key}_sha256": sha256_hex(file) if file else None}


def _chat_tokenizer(base: Path):
    try:
        ref = resolve_model(str(base))
        tok = AutoTokenizer.from_pretrained(ref.directory, **ref.kwargs())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer ({e})", base) from None
    if not getattr(tok, "chat_template", None):
        raise InputError("the tokenizer has no chat template", base)
    return tok


def _encode(tok, examples: list[dict], max_length: int, truncated: str, data) -> tuple[list[dict], dict[str, int]]:
    """Token ids and labels of every example, cut at ``max_length``; an example whose answer was cut away
    is dropped, or kept with no loss (``truncated="keep"``)."""
    encoded, counts = [], {"dropped": 0, "no_answer": 0, "cut": 0}
    for ex in examples:
        ids, labels = encode_chat(tok, ex["messages"], max_length)
        counts["cut"] += len(encode_chat(tok, ex["messages"], 1 << 30)[0]) > len(ids)
        if any(lab != IGNORE for lab in labels):
            encoded.append({"input_ids": ids, "labels": labels})
        elif truncated == "keep":  # in the batches, no loss: the step count of a keep-everything recipe
            encoded.append({"input_ids": ids, "labels": labels})
            counts["no_answer"] += 1
        else:
            counts["dropped"] += 1
    if not any(any(lab != IGNORE for lab in e["labels"]) for e in encoded):
        raise InputError(f"every training example lost its answer to truncation at max_length {max_length}", data)
    return encoded, counts


def _placement(device: str, bf16: bool | None) -> tuple[bool, bool]:
    """(use the CPU, bf16 autocast): bf16 by default only on a CUDA GPU that supports it."""
    if device not in ("auto", "cpu", "cuda"):  # the Trainer places the model itself: cpu or its GPU(s)
        raise UsageError(f"--device must be auto, cpu or cuda for finetune (got {device!r})")
    use_cpu = resolve_device(device).type == "cpu"  # the shared rule and its messages
    if bf16 is None:
        bf16 = (not use_cpu) and torch.cuda.is_bf16_supported()
    return use_cpu, bool(bf16)


def _training_arguments(
    work: Path,
    *,
    epochs,
    max_steps,
    batch_size,
    grad_accum,
    lr,
    weight_decay,
    warmup_steps,
    lr_scheduler,
    seed,
    bf16,
    use_cpu,
    save_steps,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        num_train_epochs=epochs if max_steps is None else 1,
        max_steps=-1 if max_steps is None else max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        bf16=bool(bf16),
        use_cpu=use_cpu,
        logging_steps=1,
        logging_strategy="steps",
        save_strategy="no" if save_steps is None else "steps",
        save_steps=save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def _outcome(trainer, result, train_seconds: float) -> dict[str, Any]:
    """What the run did: steps, loss, time, library versions and the loss curve."""
    return {
        "steps": trainer.state.global_step,
        "epochs_done": round(trainer.state.epoch or 0.0, 4),
        "train_seconds": round(train_seconds, 1),
        "train_loss": result.training_loss,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
        },
        "loss_history": [
            {
                "step": r["step"],
                "epoch": round(r.get("epoch", 0.0), 4),
                "loss": r["loss"],
                "grad_norm": r.get("grad_norm"),
                "learning_rate": r.get("learning_rate"),
            }
            for r in trainer.state.log_history
            if "loss" in r
        ],
    }


def _lora_model(base: Path, seed: int, cfg: LoraConfig, tlist: list[str]):
    set_seed(seed)  # LoRA initialisation (the Trainer reseeds for the data order and dropout)
    try:
        ref = resolve_model(str(base))
        model = AutoModelForCausalLM.from_pretrained(ref.directory, dtype=torch.float32, **ref.kwargs())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the model ({e})", base) from None
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise UsageError(f"LoRA targets {','.join(tlist)}: {e}") from None


# finetune() is the recipe's one sequence (check → data → model → train → record); each step is a helper
# above, and what stays inline is the training settings written once into TrainingArguments and the record.
def finetune(
    base: str | Path,
    data: str | Path,
    *,
    out: str | Path,
    mix: Iterable[str | Path] | str | Path | None = None,
    template: str | None = None,
    response_field: str | None = None,
    sample: int | None = None,
    sample_seed: int | None = None,
    exclude_ids: Iterable[str] | str | Path | None = None,
    id_field: str | None = None,
    ids: Iterable[str] | str | Path | None = None,
    targets: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    epochs: float = 1,
    max_steps: int | None = None,
    lr: float = 2e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 320,
    truncated: str = "drop",
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    lr_scheduler: str = "constant_with_warmup",
    seed: int = 0,
    save_steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    bf16: bool | None = None,
    threads: int | None = None,
    progress: bool = True,
    callbacks: list | None = None,
    command: str | None = None,
) -> Path:
    """Train a fresh LoRA adapter on ``base`` and write it to ``out`` (a standard PEFT adapter directory plus
    ``training_args.json``). Returns ``out``.

    Data: chat JSONL (``messages``), or task rows (JSONL/CSV) turned into chats by ``template`` (a
    ``str.format`` pattern over the row's fields, the user turn) and ``response_field`` (the assistant turn);
    ``truncated="drop-long"`` (the testbed recipe) drops every conversation longer than ``max_length`` tokens
    before anything else (before ``sample``, so ``sample`` N gives N whole examples; mix rows too). Otherwise
    conversations are cut at ``max_length`` tokens and one whose answer is cut away entirely is dropped
    (``"drop"``) or kept in the batches with no loss (``"keep"``); a partly cut answer is trained on as cut.
    ``ids`` (ids, or a file of them such as a ``train_data_ids.json``) keeps only those rows of ``data``, in
    that order; ``exclude_ids`` (ids, or a file of them) drops rows, ``sample`` then takes a
    ``sample_seed``-seeded random sample (default ``seed``); every ``mix`` chat JSONL is appended in full. The
    loss covers the final assistant turn only: its content tokens + the closing eos (``<|im_end|>``), nothing
    after it; the Trainer's seeded sampler shuffles the examples every epoch.

    Defaults are the testbed's mix_s0 recipe (shared/testbed/README.md): AdamW lr 2e-4, 1 epoch, batch 8,
    max length 320, 10 warm-up steps then a constant lr (``lr_scheduler`` is any transformers scheduler
    name; ``"linear"`` decays to 0), grad-norm clip 1.0 (the Trainer's). ``bf16=None`` means bf16 autocast
    on a CUDA GPU that supports it and fp32 elsewhere; ``bf16=True`` on CPU is torch's CPU bf16 autocast
    (the recipe's; fp32 master weights either way).

    The run lives in ``OUT.partial/`` (checkpoints every ``save_steps`` in ``OUT.partial/checkpoints/``) and is
    renamed to ``out`` when it finishes; ``resume=True`` continues an interrupted run from its latest
    checkpoint. An existing ``out`` is replaced only with ``force=True``.
    """
    out, base = Path(out), Path(base)
    work = partial_dir(out)
    resume_from = check_finetune(
        base,
        out,
        work,
        resume,
        force,
        rank=rank,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        warmup_steps=warmup_steps,
        save_steps=save_steps,
        dropout=dropout,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        lr_scheduler=lr_scheduler,
        truncated=truncated,
    )
    tlist = parse_targets(targets)
    if threads:
        torch.set_num_threads(threads)
    exclude_file, exclude_list = _id_source(exclude_ids)
    ids_file, ids_list = _id_source(ids)
    tok = _chat_tokenizer(base)

    def fits(ex: dict) -> bool:
        return len(encode_chat(tok, ex["messages"], max_length + 1)[0]) <= max_length

    examples, data_info = build_training_data(
        data,
        mix=mix,
        template=template,
        response_field=response_field,
        sample=sample,
        sample_seed=seed if sample_seed is None else sample_seed,
        exclude_ids=exclude_list,
        id_field=id_field,
        ids=ids_list,
        fits=fits if truncated == "drop-long" else None,
    )
    if not examples:
        raise InputError(f"no training example fits in max_length {max_length} tokens", data)
    encoded, counts = _encode(tok, examples, max_length, truncated, data)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    use_cpu, bf16 = _placement(device, bf16)
    args = _training_arguments(
        work,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        lr_scheduler=lr_scheduler,
        seed=seed,
        bf16=bf16,
        use_cpu=use_cpu,
        save_steps=save_steps,
    )
    main = args.process_index == 0
    if main:
        if work.exists() and not resume:
            shutil.rmtree(work)  # force: start over
        work.mkdir(parents=True, exist_ok=True)

    pm = _lora_model(
        base,
        seed,
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=tlist, task_type="CAUSAL_LM"),
        tlist,
    )
    trainer = Trainer(
        model=pm,
        args=args,
        train_dataset=ListDataset(encoded),
        data_collator=pad_collator(pad),
        callbacks=list(callbacks or []),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_callback(progress))
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - t0
    trainer.accelerator.wait_for_everyone()
    if not main:
        return out

    for rec in trainer.state.log_history:
        if "loss" in rec and not math.isfinite(rec["loss"]):
            raise InputError(f"training diverged at step {rec.get('step')} (loss {rec['loss']})")
    ckpt_dir = work / "checkpoints"
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    trainer.model.save_pretrained(str(work), safe_serialization=True)
    files = [{"role": "data", **data_info["data"], "sha256": sha256_hex(Path(data))}]
    files += [{"role": "mix", **m, "sha256": sha256_hex(Path(m["path"]))} for m in data_info["mix"]]
    record = {
        "tool": "safeprune finetune",
        "command": command,
        "base": str(base.resolve()),
        "data_files": files,
        "template": template,
        "response_field": response_field,
        **_id_record("exclude_ids", exclude_file, exclude_list),
        **_id_record("ids", ids_file, ids_list),
        "r": rank,
        "alpha": float(alpha),
        "dropout": dropout,
        "targets": ",".join(tlist),
        "lr": lr,
        "epochs": epochs,
        "max_steps": max_steps,
        "bs": batch_size,
        "grad_accum": grad_accum,
        "max_len": max_length,
        "warmup": warmup_steps,
        "weight_decay": weight_decay,
        "lr_scheduler": lr_scheduler,
        "optimizer": "adamw_torch",
        "seed": seed,
        "data_seed": seed,
        "bf16": bool(bf16),
        "device": "cpu" if use_cpu else "cuda",
        "world_size": args.world_size,
        "threads": torch.get_num_threads(),
        "save_steps": save_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "n_examples": len(encoded),
        "truncated": truncated,
        "n_truncated": counts["cut"],
        "n_dropped_too_long": data_info["data"].get("n_too_long", 0)
        + sum(m.get("n_too_long", 0) for m in data_info["mix"]),
        "n_dropped_truncated": counts["dropped"],
        "n_kept_without_answer": counts["no_answer"],
        **_outcome(trainer, result, train_seconds),
    }
    (work / "training_args.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    swap_dir_into_place(work, out)  # force: the finished run replaces the old output
    return out
