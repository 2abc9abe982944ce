"""LoRA fine-tuning: chat-format data, loss on assistant tokens only, seeded, with a progress bar.

Used by ``safeprune demo`` (a few dozen steps on a built-in instruction set) and meant to back the later
``safeprune finetune`` command. Data are ``{"messages": [{"role": ..., "content": ...}, ...]}`` records; the
loss covers only the final assistant turn.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import InputError

IGNORE = -100


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


def builtin_examples() -> list[dict[str, Any]]:
    """The small benign instruction set that ships with safeprune (used by the demo)."""
    text = resources.files("safeprune").joinpath("data/demo_instructions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_chat_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise InputError("training data file does not exist", p)
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {i} is not valid JSON ({e.msg})", p) from None
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise InputError(f"line {i}: expected a 'messages' list ending with an assistant turn", p)
        out.append(rec)
    if not out:
        raise InputError("no training examples", p)
    return out


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt tokens masked with -100) for one conversation."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to plain concatenation
        full = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [IGNORE] * min(len(p_ids), len(f_ids)) + f_ids[len(p_ids):]
    return f_ids, labels[: len(f_ids)]


def _batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [encoded[j] for j in order[i:i + batch_size]]
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
    from peft import LoraConfig, get_peft_model

    from .scan import make_progress

    lora = lora or LoraSettings()
    train = train or TrainSettings()
    torch.manual_seed(train.seed)
    rng = random.Random(train.seed)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.targets), task_type="CAUSAL_LM")
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


# ---------------------------------------------------------------------------------------------------------
# ``safeprune finetune``: the papers' LoRA recipe on transformers' Trainer (works under ``accelerate launch``)
# ---------------------------------------------------------------------------------------------------------

TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ID_FIELDS = ("id", "fname", "row_id", "idx")


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """``"q,k,v,o"`` (aliases) or full module names -> a list of module names, order kept, no duplicates."""
    from .errors import UsageError

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for it in items:
        it = it.strip()
        if not it:
            continue
        name = TARGET_ALIASES.get(it, it)
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("no LoRA target modules given")
    return out


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_task_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a task data set: JSONL (one object a line) or CSV (header row)."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise InputError("training data file does not exist", p)
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() in (".csv", ".tsv"):
        try:
            with open(p, newline="", encoding="utf-8") as f:
                rows = [dict(r) for r in csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")]
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"cannot read as CSV ({e})", p) from None
    else:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text ({e.reason})", p) from None
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {i} is not valid JSON ({e.msg})", p) from None
            if not isinstance(rec, dict):
                raise InputError(f"line {i}: expected a JSON object", p)
            rows.append(rec)
    if not rows:
        raise InputError("no rows", p)
    return rows


def load_id_list(path: str | Path) -> list[str]:
    """Row ids to exclude: a JSON list, a JSON object (every list of ids in it, e.g. a ``train_data_ids.json``),
    or a text file with one id a line."""
    p = Path(path)
    if not p.is_file():
        raise InputError("id list file does not exist", p)
    text = p.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(obj, list):
        return [str(x) for x in obj]
    if isinstance(obj, dict):
        ids = [str(x) for v in obj.values() if isinstance(v, list) for x in v]
        if ids:
            return ids
    raise InputError("expected a JSON list of row ids (or an object holding such lists)", p)


def _row_id(row: dict[str, Any], index: int, id_field: str | None) -> str:
    if id_field is not None:
        return str(row[id_field])
    for k in ID_FIELDS:
        if k in row:
            return str(row[k])
    return str(index)


def task_rows_to_chats(rows: list[dict[str, Any]], template: str, response_field: str, path: str | Path,
                       system: str | None = None) -> list[dict[str, Any]]:
    """``template.format(**row)`` as the user turn, ``row[response_field]`` as the assistant turn."""
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            user = template.format_map(row)
        except KeyError as e:
            raise InputError(f"row {i}: the template needs field {e.args[0]!r}, which the row lacks", path) from None
        except (ValueError, IndexError) as e:
            raise InputError(f"bad --template ({e})", path) from None
        resp = row.get(response_field)
        if resp is None or (isinstance(resp, str) and not resp.strip()):
            raise InputError(f"row {i}: missing or empty response field {response_field!r}", path)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": str(resp)}]
        out.append({"messages": msgs})
    return out


def build_training_data(data: str | Path, *, mix: Iterable[str | Path] | str | Path | None = None,
                        template: str | None = None, response_field: str | None = None,
                        sample: int | None = None, sample_seed: int = 0,
                        exclude_ids: Iterable[str] | None = None, id_field: str | None = None) -> tuple[list[dict], dict]:
    """The chat examples (task data, then every mix row) and a record of where they came from."""
    from .errors import UsageError

    data = Path(data)
    if (template is None) != (response_field is None):
        raise UsageError("--template and --response-field go together (task rows -> user/assistant chats)")
    info: dict[str, Any] = {"data": {"path": str(data)}}
    rows = load_chat_jsonl(data) if template is None else load_task_rows(data)
    if id_field is not None and any(id_field not in r for r in rows):
        bad = next(i for i, r in enumerate(rows, start=1) if id_field not in r)
        raise InputError(f"row {bad}: no id field {id_field!r}", data)
    ids = [_row_id(r, i, id_field) for i, r in enumerate(rows)]
    info["data"]["n_rows"] = len(rows)
    keep = list(range(len(rows)))
    if exclude_ids is not None:
        excl = set(str(x) for x in exclude_ids)
        keep = [i for i in keep if ids[i] not in excl]
        info["data"]["n_excluded"] = len(rows) - len(keep)
    if sample is not None:
        if sample < 1:
            raise UsageError("--sample must be at least 1")
        if sample > len(keep):
            raise InputError(f"--sample {sample} asks for more rows than the {len(keep)} available", data)
        keep = random.Random(sample_seed).sample(keep, sample)
        info["data"]["sample"] = sample
        info["data"]["sample_seed"] = sample_seed
    if exclude_ids is not None or sample is not None:
        info["data"]["row_ids"] = [ids[i] for i in keep]
    rows = [rows[i] for i in keep]
    examples = task_rows_to_chats(rows, template, response_field, data) if template is not None else list(rows)
    info["data"]["n_examples"] = len(examples)
    mixes = [] if mix is None else ([mix] if isinstance(mix, (str, Path)) else list(mix))
    info["mix"] = []
    for m in mixes:
        mrows = load_chat_jsonl(m)
        examples.extend(mrows)
        info["mix"].append({"path": str(m), "n_examples": len(mrows)})
    return examples, info


def pad_collator(pad_id: int):
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; attention mask 1 on real tokens."""

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), pad_id, dtype=torch.long)
        lab = torch.full((len(features), n), IGNORE, dtype=torch.long)
        att = torch.zeros((len(features), n), dtype=torch.long)
        for k, f in enumerate(features):
            m = len(f["input_ids"])
            ids[k, :m] = torch.tensor(f["input_ids"], dtype=torch.long)
            lab[k, :m] = torch.tensor(f["labels"], dtype=torch.long)
            att[k, :m] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    return collate


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _progress_callback(enabled: bool):
    """A TrainerCallback that shows a rich bar with the loss on a terminal and prints one line a step to a
    log (a pipe, a file) so ``nohup ... > log`` records the loss curve as it goes."""
    import sys
    import time

    from transformers import TrainerCallback

    from .scan import make_progress

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
                self.task = self.prog.add_task("fine-tuning LoRA", total=state.max_steps,
                                               completed=state.global_step, module="")

        def on_log(self, args, state, control, logs=None, **kw):
            if not (enabled and state.is_world_process_zero) or not logs or "loss" not in logs:
                return
            msg = f"loss {logs['loss']:.4f}"
            if self.prog is not None and not self.prog.disable:
                self.prog.update(self.task, completed=state.global_step, module=msg)
            else:
                el = time.monotonic() - self.t0
                print(f"step {state.global_step}/{state.max_steps} epoch {logs.get('epoch', 0):.2f} {msg} "
                      f"grad_norm {logs.get('grad_norm', float('nan')):.3f} lr {logs.get('learning_rate', 0):.3g} "
                      f"elapsed {el:.0f}s", file=sys.stderr, flush=True)

        def on_train_end(self, args, state, control, **kw):
            if self.prog is not None:
                self.prog.stop()

    return Progress()


def _find_checkpoint(ckpt_dir: Path) -> Path | None:
    import re

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
    import os
    import shutil
    import sys
    import time

    from .errors import OutputExistsError, UsageError

    out = Path(out)
    base = Path(base)
    work = partial_dir(out)
    ckpt_dir = work / "checkpoints"
    if not (base / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", base)
    for name, v, lo in (("rank", rank, 1), ("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1),
                        ("max_length", max_length, 2), ("warmup_steps", warmup_steps, 0)):
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
        raise OutputExistsError(f"an unfinished run is in {work}: pass --resume to continue it or --force to "
                                "start over", out)
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
        data, mix=mix, template=template, response_field=response_field, sample=sample,
        sample_seed=seed if sample_seed is None else sample_seed, exclude_ids=exclude_list, id_field=id_field)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

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

    trainer = Trainer(model=pm, args=args, train_dataset=_ListDataset(encoded), data_collator=pad_collator(pad),
                      callbacks=list(callbacks or []))
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
    loss_history = [{"step": r["step"], "epoch": round(r.get("epoch", 0.0), 4), "loss": r["loss"],
                     "grad_norm": r.get("grad_norm"), "learning_rate": r.get("learning_rate")}
                    for r in trainer.state.log_history if "loss" in r]
    files = [{"role": "data", **data_info["data"], "sha256": _sha256(Path(data))}]
    files += [{"role": "mix", **m, "sha256": _sha256(Path(m["path"]))} for m in data_info["mix"]]
    record = {
        "tool": "safeprune finetune",
        "command": command,
        "base": str(base.resolve()),
        "data_files": files,
        "template": template,
        "response_field": response_field,
        "exclude_ids": str(exclude_file) if exclude_file else (None if exclude_list is None else
                                                              f"{len(exclude_list)} ids given in the call"),
        "exclude_ids_sha256": _sha256(exclude_file) if exclude_file else None,
        "r": rank, "alpha": float(alpha), "dropout": dropout, "targets": ",".join(tlist),
        "lr": lr, "epochs": epochs, "max_steps": max_steps, "bs": batch_size, "grad_accum": grad_accum,
        "max_len": max_length, "warmup": warmup_steps, "weight_decay": weight_decay,
        "lr_scheduler": lr_scheduler, "optimizer": "adamw_torch", "seed": seed, "data_seed": seed,
        "bf16": bool(bf16), "device": "cpu" if use_cpu else "cuda", "world_size": args.world_size,
        "threads": torch.get_num_threads(), "save_steps": save_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "n_examples": len(encoded), "truncated": truncated, "n_truncated": cut,
        "n_dropped_truncated": dropped, "n_kept_without_answer": no_answer,
        "steps": trainer.state.global_step, "epochs_done": round(trainer.state.epoch or 0.0, 4),
        "train_seconds": round(train_seconds, 1), "train_loss": result.training_loss,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__, "python": sys.version.split()[0]},
        "loss_history": loss_history,
    }
    (work / "training_args.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if out.exists():  # force: swap the finished run in, then drop the old output
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)
    return out
