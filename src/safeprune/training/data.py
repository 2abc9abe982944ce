"""Training data: chat JSONL, or task rows (JSONL/CSV/TSV) turned into chats by a template; id lists,
samples and mixes; the tokenisation with the loss on the final assistant turn only; the padding collator.
Data are ``{"messages": [{"role": ..., "content": ...}, ...]}`` records."""

from __future__ import annotations

import csv
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..adapter import parse_module_types
from ..errors import InputError, UsageError

IGNORE = -100
ID_FIELDS = ("id", "fname", "row_id", "idx")


def load_task_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a task data set: JSONL (one object a line) or CSV (header row)."""
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
    """Row ids (to keep or to exclude): a JSON list, a JSON object (every list of ids in it, e.g. a
    ``train_data_ids.json``), or a text file with one id a line."""
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


def task_rows_to_chats(
    rows: list[dict[str, Any]], template: str, response_field: str, path: str | Path, system: str | None = None
) -> list[dict[str, Any]]:
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
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(resp)},
        ]
        out.append({"messages": msgs})
    return out


def build_training_data(
    data: str | Path,
    *,
    mix: Iterable[str | Path] | str | Path | None = None,
    template: str | None = None,
    response_field: str | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
    exclude_ids: Iterable[str] | None = None,
    id_field: str | None = None,
    ids: Iterable[str] | None = None,
    fits: Callable[[dict], bool] | None = None,
) -> tuple[list[dict], dict]:
    """The chat examples (task data, then every mix row) and a record of where they came from.

    Order of the row selection: ``ids`` (only these rows, in the list's order; every id must exist), then
    ``exclude_ids``, then ``fits`` (a predicate on the chat example, e.g. "fits in max_length tokens": rows
    that fail it are dropped *before* sampling, so ``sample`` N gives N usable rows), then ``sample``."""
    data = Path(data)
    if (template is None) != (response_field is None):
        raise UsageError("--template and --response-field go together (task rows -> user/assistant chats)")
    info: dict[str, Any] = {"data": {"path": str(data)}}
    rows = load_chat_jsonl(data) if template is None else load_task_rows(data)
    if id_field is not None and any(id_field not in r for r in rows):
        bad = next(i for i, r in enumerate(rows, start=1) if id_field not in r)
        raise InputError(f"row {bad}: no id field {id_field!r}", data)
    row_ids = [_row_id(r, i, id_field) for i, r in enumerate(rows)]
    info["data"]["n_rows"] = len(rows)
    keep = list(range(len(rows)))
    if ids is not None:
        want = [str(x) for x in ids]
        where: dict[str, int] = {}
        for i, rid in enumerate(row_ids):
            where.setdefault(rid, i)
        missing = [x for x in want if x not in where]
        if missing:
            raise InputError(
                f"{len(missing)} of the {len(want)} requested row ids are not in the data (first: {missing[0]!r})", data
            )
        if len(set(want)) != len(want):
            raise InputError("the requested row ids contain duplicates", data)
        keep = [where[x] for x in want]
        info["data"]["n_selected_by_id"] = len(keep)
    if exclude_ids is not None:
        excl = set(str(x) for x in exclude_ids)
        n_before = len(keep)
        keep = [i for i in keep if row_ids[i] not in excl]
        info["data"]["n_excluded"] = n_before - len(keep)
    sel = [rows[i] for i in keep]
    chats = dict(zip(keep, task_rows_to_chats(sel, template, response_field, data) if template is not None else sel))
    if fits is not None:
        n_before = len(keep)
        keep = [i for i in keep if fits(chats[i])]
        info["data"]["n_too_long"] = n_before - len(keep)
    if sample is not None:
        if sample < 1:
            raise UsageError("--sample must be at least 1")
        if sample > len(keep):
            raise InputError(f"--sample {sample} asks for more rows than the {len(keep)} available", data)
        keep = random.Random(sample_seed).sample(keep, sample)
        info["data"]["sample"] = sample
        info["data"]["sample_seed"] = sample_seed
    if exclude_ids is not None or sample is not None or ids is not None or fits is not None:
        info["data"]["row_ids"] = [row_ids[i] for i in keep]
    examples = [chats[i] for i in keep]
    info["data"]["n_examples"] = len(examples)
    mixes = [] if mix is None else ([mix] if isinstance(mix, (str, Path)) else list(mix))
    info["mix"] = []
    for m in mixes:
        mrows = load_chat_jsonl(m)
        info["mix"].append({"path": str(m), "n_rows": len(mrows)})
        if fits is not None:
            mrows = [r for r in mrows if fits(r)]
            info["mix"][-1]["n_too_long"] = info["mix"][-1]["n_rows"] - len(mrows)
        examples.extend(mrows)
        info["mix"][-1]["n_examples"] = len(mrows)
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


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """``"q,k,v,o"`` (aliases) or full module names -> a list of module names, order kept, no duplicates."""
    out = [t for t in dict.fromkeys(parse_module_types(spec) or [])]
    if not out:
        raise UsageError("no LoRA target modules given")
    return out


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


def end_of_answer(tail: str, eos: str | None) -> str:
    """What the template puts after the final answer, cut after its end-of-turn token: ``<|im_end|>\\n`` ->
    ``<|im_end|>``. The model should learn to stop, not what follows the stop (a newline, the next turn)."""
    if eos and eos in tail:
        return tail[: tail.index(eos) + len(eos)]
    return tail.rstrip()


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt tokens masked with -100) for one conversation.

    The sequence ends with the answer's end-of-turn token (the tokenizer's eos, e.g. ``<|im_end|>``): what the
    chat template writes after it (SmolLM2/ChatML: a newline) is neither input nor label. Labels are the
    answer's content tokens + that closing token."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    content = messages[-1]["content"]
    if full.startswith(prompt + content):
        full = prompt + content + end_of_answer(full[len(prompt) + len(content) :], tokenizer.eos_token)
    elif not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to plain concatenation
        full = prompt + content + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [IGNORE] * min(len(p_ids), len(f_ids)) + f_ids[len(p_ids) :]
    return f_ids, labels[: len(f_ids)]
