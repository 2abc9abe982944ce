"""``safeprune finetune``: the papers' LoRA recipe on transformers' Trainer (works under ``accelerate
launch``; only process 0 writes the output), with checkpoints, resume, a progress bar and a training record."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..errors import InputError, OutputExistsError, UsageError
from ..io.files import swap_dir_into_place
from ..io.hashing import sha256_hex
from ..io.progress import make_progress
from .data import (
    IGNORE,
    ListDataset,
    build_training_data,
    encode_chat,
    load_id_list,
    pad_collator,
    parse_targets,
)


def _progress_callback(enabled: bool):
    """A TrainerCallback that shows a rich bar with the loss on a terminal and prints one line a step to a
    log (a pipe, a file) so ``nohup ... > log`` records the loss curve as it goes."""

    class Progress(TrainerCallback):
        def __init__(self):
            self.prog = None
            self.task = None
            self.t0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            if enabled and state.is_world_process_zero:
                self.prog = make_progress(True)
                self.prog.start()
                self.task = self.prog.add_task(
                    "fine-tuning LoRA", total=state.max_steps, completed=state.global_step, module=""
                )

        def on_log(self, args, state, control, logs=None, **kw):
            if not (enabled and state.is_world_process_zero) or not logs or "loss" not in logs:
                return
            msg = f"loss {logs['loss']:.4f}"
            if self.prog is not None and not self.prog.disable:
                self.prog.update(self.task, completed=state.global_step, module=msg)
            else:
                el = time.monotonic() - self.t0
                print(
                    f"step {state.global_step}/{state.max_steps} epoch {logs.get('epoch', 0):.2f} {msg} "
                    f"grad_norm {logs.get('grad_norm', float('nan')):.3f} lr {logs.get('learning_rate', 0):.3g} "
                    f"elapsed {el:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )

        def on_train_end(self, args, state, control, **kw):
            if self.prog is not None:
                self.prog.stop()

    return Progress()


def _find_checkpoint(ckpt_dir: Path) -> Path | None:
    best = None
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and d.is_dir() and (d / "trainer_state.json").is_file():
                if best is None or int(m.group(1)) > best[0]:
                    best = (int(m.group(1)), d)
    return None if best is None else best[1]


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished run lives (checkpoints included) until it is renamed to ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


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
    targets: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    epochs: float = 5,
    max_steps: int | None = None,
    lr: float = 3e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 320,
    truncated: str = "drop",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    lr_scheduler: str = "linear",
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
    Conversations are cut at ``max_length`` tokens; one whose answer is cut away entirely is dropped
    (``truncated="drop"``) or kept in the batches with no loss (``"keep"``: every row counts toward the steps).
    ``exclude_ids`` (ids, or a file of them) drops rows first, ``sample`` then takes a ``sample_seed``-seeded
    random sample (default ``seed``); every ``mix`` chat JSONL is appended in full. The loss covers the final
    assistant turn only; the Trainer's seeded sampler shuffles the examples every epoch.

    The run lives in ``OUT.partial/`` (checkpoints every ``save_steps`` in ``OUT.partial/checkpoints/``) and is
    renamed to ``out`` when it finishes; ``resume=True`` continues an interrupted run from its latest
    checkpoint. An existing ``out`` is replaced only with ``force=True``.
    """
    out = Path(out)
    base = Path(base)
    work = partial_dir(out)
    ckpt_dir = work / "checkpoints"
    if not (base / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", base)
    for name, v, lo in (
        ("rank", rank, 1),
        ("batch_size", batch_size, 1),
        ("grad_accum", grad_accum, 1),
        ("max_length", max_length, 2),
        ("warmup_steps", warmup_steps, 0),
    ):
        if v < lo:
            raise UsageError(f"{name} must be at least {lo} (got {v})")
    if save_steps is not None and save_steps < 1:
        raise UsageError("save_steps must be at least 1")
    if not (0.0 <= dropout < 1.0):
        raise UsageError(f"dropout must be in [0, 1) (got {dropout})")
    if max_steps is None and not epochs > 0:
        raise UsageError(f"epochs must be positive (got {epochs})")
    if out.exists() and not force:
        raise OutputExistsError("output exists (use --force to replace it)", out)
    resume_from = None
    if resume:
        resume_from = _find_checkpoint(ckpt_dir)
        if resume_from is None:
            raise UsageError(f"--resume: no checkpoint in {ckpt_dir} (run with --save-steps to write some)")
    elif work.exists() and not force:
        raise OutputExistsError(
            f"an unfinished run is in {work}: pass --resume to continue it or --force to start over", out
        )
    tlist = parse_targets(targets)

    if threads:
        torch.set_num_threads(threads)
    if isinstance(exclude_ids, (str, Path)):
        exclude_file = Path(exclude_ids)
        exclude_list = load_id_list(exclude_file)
    else:
        exclude_file = None
        exclude_list = None if exclude_ids is None else [str(x) for x in exclude_ids]
    examples, data_info = build_training_data(
        data,
        mix=mix,
        template=template,
        response_field=response_field,
        sample=sample,
        sample_seed=seed if sample_seed is None else sample_seed,
        exclude_ids=exclude_list,
        id_field=id_field,
    )

    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer ({e})", base) from None
    if not getattr(tok, "chat_template", None):
        raise InputError("the tokenizer has no chat template", base)
    if truncated not in ("drop", "keep"):
        raise UsageError(f"truncated must be 'drop' or 'keep' (got {truncated!r})")
    encoded, dropped, no_answer, cut = [], 0, 0, 0
    for ex in examples:
        ids, labels = encode_chat(tok, ex["messages"], max_length)
        full_len = len(encode_chat(tok, ex["messages"], 1 << 30)[0])
        cut += full_len > len(ids)
        if any(lab != IGNORE for lab in labels):
            encoded.append({"input_ids": ids, "labels": labels})
        elif truncated == "keep":  # in the batches, no loss: the step count of a keep-everything recipe
            encoded.append({"input_ids": ids, "labels": labels})
            no_answer += 1
        else:
            dropped += 1
    if not any(any(lab != IGNORE for lab in e["labels"]) for e in encoded):
        raise InputError(f"every training example lost its answer to truncation at max_length {max_length}", data)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda asked for but no CUDA GPU is available")
    if bf16 is None:
        bf16 = (not use_cpu) and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
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
    main = args.process_index == 0
    if main:
        if work.exists() and not resume:
            shutil.rmtree(work)  # force: start over
        work.mkdir(parents=True, exist_ok=True)

    set_seed(seed)  # LoRA initialisation (the Trainer reseeds for the data order and dropout)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the model ({e})", base) from None
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=tlist, task_type="CAUSAL_LM")
    try:
        pm = get_peft_model(model, cfg)
    except ValueError as e:
        raise UsageError(f"LoRA targets {','.join(tlist)}: {e}") from None

    trainer = Trainer(
        model=pm,
        args=args,
        train_dataset=ListDataset(encoded),
        data_collator=pad_collator(pad),
        callbacks=list(callbacks or []),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(progress))
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - t0
    trainer.accelerator.wait_for_everyone()
    if not main:
        return out

    for rec in trainer.state.log_history:
        if "loss" in rec and not math.isfinite(rec["loss"]):
            raise InputError(f"training diverged at step {rec.get('step')} (loss {rec['loss']})")
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    trainer.model.save_pretrained(str(work), safe_serialization=True)
    loss_history = [
        {
            "step": r["step"],
            "epoch": round(r.get("epoch", 0.0), 4),
            "loss": r["loss"],
            "grad_norm": r.get("grad_norm"),
            "learning_rate": r.get("learning_rate"),
        }
        for r in trainer.state.log_history
        if "loss" in r
    ]
    files = [{"role": "data", **data_info["data"], "sha256": sha256_hex(Path(data))}]
    files += [{"role": "mix", **m, "sha256": sha256_hex(Path(m["path"]))} for m in data_info["mix"]]
    record = {
        "tool": "safeprune finetune",
        "command": command,
        "base": str(base.resolve()),
        "data_files": files,
        "template": template,
        "response_field": response_field,
        "exclude_ids": str(exclude_file)
        if exclude_file
        else (None if exclude_list is None else f"{len(exclude_list)} ids given in the call"),
        "exclude_ids_sha256": sha256_hex(exclude_file) if exclude_file else None,
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
        "n_truncated": cut,
        "n_dropped_truncated": dropped,
        "n_kept_without_answer": no_answer,
        "steps": trainer.state.global_step,
        "epochs_done": round(trainer.state.epoch or 0.0, 4),
        "train_seconds": round(train_seconds, 1),
        "train_loss": result.training_loss,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "python": sys.version.split()[0],
        },
        "loss_history": loss_history,
    }
    (work / "training_args.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    swap_dir_into_place(work, out)  # force: the finished run replaces the old output
    return out
