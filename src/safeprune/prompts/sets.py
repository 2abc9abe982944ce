"""Prompt-set loaders for the safety and utility evaluation.

Every loader returns a :class:`PromptSet`: a list of :class:`PromptItem` (a stable ``id``, the user
message, an optional ``reference`` for utility metrics, and the source row in ``meta``).

Known formats are recognised from their columns (see :data:`FORMATS`): AdvBench harmful_behaviors,
HarmBench (``contextual`` rows get their ``ContextString`` prepended the HarmBench way; ``copyright``
rows are dropped by default), StrongREJECT, CatQA, Do-Not-Answer, SimpleSafetyTests, XSTest,
DialogSum (validation and test), HotpotQA. Anything else is read by the generic CSV/JSONL loader with
``column=`` (and optionally ``id_column=`` / ``reference_column=``).

Rows flagged ``in_jbb_harmful_ft == 1`` (a prompt the harmful fine-tuning set trains on) are left out
of safety sets by default (``include_overlap=True`` keeps them, marked ``overlap=True`` so that ASR
is still computed without them).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, UsageError

SUMMARY_INSTRUCTION = "Summarize this dialogue:\n"  # the testbed's fine-tuning format
# QA sets (kind "qa"): the answer-format instruction put before every question; eval/qa.py extracts the answer
QA_INSTRUCTION = (
    "Answer the question with only the answer: a name, a date, a number, a short phrase, or yes/no. "
    "Do not explain.\nQuestion: "
)
KINDS = ("safety", "over_refusal", "utility", "qa")


@dataclass
class PromptItem:
    id: str
    prompt: str
    reference: str | list[str] | None = None  # a QA item may have several gold answers
    overlap: bool = False  # prompt is in the harmful fine-tuning data (excluded from ASR)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    name: str
    kind: str
    path: str
    format: str
    items: list[PromptItem]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "format": self.format,
            "n": len(self.items),
            **self.info,
        }


# -- reading ---------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError("prompt file not found", path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise InputError(f"line {i} is not valid JSON ({e.msg})", path) from None
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError("a .json prompt file must hold a list of objects", path)
            return data
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", path) from None
    raise InputError(f"unsupported prompt file type {suffix!r} (use .csv, .tsv, .jsonl or .json)", path)


def _flag(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def _harmbench_prompt(row: dict[str, Any]) -> str:
    ctx = (row.get("ContextString") or "").strip()
    beh = row["Behavior"]
    return f"{ctx}\n\n---\n\n{beh}" if ctx else beh  # HarmBench's contextual layout


# format name -> (columns that identify it, default kind, prompt fn, id column, reference fn)
FORMATS: dict[str, dict[str, Any]] = {
    "advbench": {
        "cols": {"goal", "target", "orig_idx"},
        "kind": "safety",
        "id": "orig_idx",
        "prompt": lambda r: r["goal"],
    },
    "harmbench": {
        "cols": {"Behavior", "FunctionalCategory", "BehaviorID"},
        "kind": "safety",
        "id": "BehaviorID",
        "prompt": _harmbench_prompt,
    },
    "strongreject": {
        "cols": {"forbidden_prompt"},
        "kind": "safety",
        "id": "orig_idx",
        "prompt": lambda r: r["forbidden_prompt"],
    },
    "catqa": {
        "cols": {"question", "subcategory", "category"},
        "kind": "safety",
        "id": "orig_idx",
        "prompt": lambda r: r["question"],
    },
    "donotanswer": {
        "cols": {"question", "risk_area", "types_of_harm"},
        "kind": "safety",
        "id": "id",
        "prompt": lambda r: r["question"],
    },
    "simplesafetytests": {
        "cols": {"prompts_final", "harm_area"},
        "kind": "safety",
        "id": "id",
        "prompt": lambda r: r["prompts_final"],
    },
    "xstest": {
        "cols": {"prompt", "type", "label", "focus"},
        "kind": "over_refusal",
        "id": "id",
        "prompt": lambda r: r["prompt"],
    },
    "dialogsum": {
        "cols": {"fname", "dialogue"},
        "kind": "utility",
        "id": "fname",
        "prompt": lambda r: SUMMARY_INSTRUCTION + r["dialogue"],
        "reference": lambda r: r.get("summary", r.get("summary1")),
    },
    "hotpotqa": {
        "cols": {"question", "answer", "type", "orig_idx"},
        "kind": "qa",
        "id": "orig_idx",
        "prompt": lambda r: r["question"],
        "reference": lambda r: r["answer"],
    },
    # any question/answer file (SQuAD-style closed-book QA); id column "id" when present, else the row number
    "qa": {
        "cols": {"question", "answer"},
        "kind": "qa",
        "id": "id",
        "prompt": lambda r: r["question"],
        "reference": lambda r: r["answer"],
    },
}


def detect_format(columns: Iterable[str]) -> str | None:
    cols = set(columns)
    # most specific first (CatQA and Do-Not-Answer share 'question'; HotpotQA too)
    for name in (
        "harmbench",
        "advbench",
        "strongreject",
        "simplesafetytests",
        "xstest",
        "dialogsum",
        "hotpotqa",
        "donotanswer",
        "catqa",
        "qa",
    ):
        if FORMATS[name]["cols"] <= cols:
            return name
    return None


def load_prompts(
    path: str | Path,
    kind: str | None = None,
    *,
    column: str | None = None,
    id_column: str | None = None,
    reference_column: str | None = None,
    format: str | None = None,
    include_overlap: bool = False,
    xstest_label: str | None = None,
    harmbench_copyright: bool = False,
    instruction: str | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load one prompt file.

    ``kind`` is 'safety' (harmful prompts: ASR), 'over_refusal' (benign prompts that should be answered),
    'utility' (prompts with reference texts: ROUGE, METEOR, BLEU) or 'qa' (questions with gold answers:
    exact match and F1; every question gets :data:`QA_INSTRUCTION` in front unless ``instruction`` is
    given). Default: the format's usual role. For XSTest, ``xstest_label`` defaults to 'safe' for
    over-refusal and 'unsafe' for safety. ``instruction`` is prepended to every prompt.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise InputError("no rows", path)
    columns = list(rows[0].keys())
    fmt = format or (None if column else detect_format(columns))
    if format and format not in FORMATS and format != "generic":
        raise UsageError(f"unknown prompt format {format!r}; known: {', '.join(FORMATS)}, generic")
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown prompt-set kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "qa" and instruction is None:
        instruction = QA_INSTRUCTION
    if fmt in (None, "generic"):
        if not column:
            raise InputError(
                f"unrecognised columns {columns[:8]}; say which holds the prompt with a column option "
                "(e.g. --safety FILE:COLUMN)",
                path,
            )
        return _generic(
            path, rows, kind or "safety", column, id_column, reference_column, instruction, include_overlap, name
        )
    spec = FORMATS[fmt]
    if kind is None and spec["kind"] == "qa":
        instruction = QA_INSTRUCTION if instruction is None else instruction
    kind = kind or spec["kind"]
    info: dict[str, Any] = {}
    if kind == "qa":
        info["instruction"] = instruction or ""
    if fmt == "xstest":
        label = xstest_label or ("safe" if kind in ("over_refusal", "utility") else "unsafe")
        before = len(rows)
        rows = [r for r in rows if r.get("label") == label]
        info["xstest_label"] = label
        info["dropped_other_label"] = before - len(rows)
    if fmt == "harmbench" and not harmbench_copyright:
        before = len(rows)
        rows = [r for r in rows if r.get("FunctionalCategory") != "copyright"]
        info["dropped_copyright"] = before - len(rows)
    items: list[PromptItem] = []
    n_overlap = 0
    seen: set[str] = set()
    for i, r in enumerate(rows):
        rid = str(r.get(id_column or spec["id"], i))
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} in column {id_column or spec['id']!r}", path)
        seen.add(rid)
        overlap = _flag(r.get("in_jbb_harmful_ft", 0))
        if overlap:
            n_overlap += 1
            if kind == "safety" and not include_overlap:
                continue
        prompt = spec["prompt"](r)
        if column:
            prompt = r[column]
        if instruction:
            prompt = instruction + prompt
        ref = None
        if reference_column:
            ref = r.get(reference_column)
        elif "reference" in spec:
            ref = spec["reference"](r)
        meta = {k: v for k, v in r.items() if k not in ("dialogue",)}
        items.append(PromptItem(id=rid, prompt=str(prompt), reference=ref, overlap=overlap, meta=meta))
    if kind == "safety":
        info["overlap_rows"] = n_overlap
        info["overlap_excluded"] = 0 if include_overlap else n_overlap
    if kind in ("utility", "qa") and any(_empty_reference(it.reference) for it in items):
        what = "a gold answer" if kind == "qa" else "a reference text"
        raise InputError(f"{kind} rows need {what} (reference column missing or empty)", path)
    return PromptSet(
        name=name or _default_name(path, fmt), kind=kind, path=str(path), format=fmt, items=items, info=info
    )


def _generic(path, rows, kind, column, id_column, reference_column, instruction, include_overlap, name):
    if column not in rows[0]:
        raise InputError(f"no column {column!r} (columns: {', '.join(list(rows[0])[:12])})", path)
    if id_column and id_column not in rows[0]:
        raise InputError(f"no id column {id_column!r}", path)
    if kind in ("utility", "qa") and not reference_column:
        raise UsageError(f"a generic {kind} set needs a reference column (--reference-column)")
    if reference_column and reference_column not in rows[0]:
        raise InputError(f"no reference column {reference_column!r}", path)
    items, seen, n_overlap = [], set(), 0
    for i, r in enumerate(rows):
        rid = str(r[id_column]) if id_column else str(i)
        if rid in seen:
            raise InputError(f"duplicate id {rid!r}", path)
        seen.add(rid)
        overlap = _flag(r.get("in_jbb_harmful_ft", 0))
        n_overlap += overlap
        if overlap and kind == "safety" and not include_overlap:
            continue
        text = r.get(column)
        if text in (None, ""):
            raise InputError(f"row {i}: empty {column!r}", path)
        ref = r.get(reference_column) if reference_column else None
        items.append(PromptItem(rid, (instruction or "") + str(text), ref, overlap, dict(r)))
    if kind in ("utility", "qa") and any(_empty_reference(it.reference) for it in items):
        raise InputError(f"{kind} rows need a non-empty {reference_column!r}", path)
    info: dict[str, Any] = {"column": column}
    if kind == "qa":
        info["instruction"] = instruction or ""
    if kind == "safety":
        info.update(overlap_rows=n_overlap, overlap_excluded=0 if include_overlap else n_overlap)
    return PromptSet(name or path.stem, kind, str(path), "generic", items, info)


def _empty_reference(ref: Any) -> bool:
    """A missing reference; a list (several gold answers) must hold at least one non-empty string."""
    if isinstance(ref, list):
        return not ref or any(not isinstance(r, str) or not r.strip() for r in ref)
    return ref is None or not str(ref).strip()


def _default_name(path: Path, fmt: str) -> str:
    stem = path.stem
    if fmt == "dialogsum":
        return f"dialogsum_{stem}"
    return fmt if fmt not in ("generic", "qa") else stem


# -- subsets ---------------------------------------------------------------------------------------


def subset(
    ps: PromptSet,
    *,
    ids: Iterable[str] | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> PromptSet:
    """Keep the rows whose id is in ``ids`` (in file order), then a seeded random ``sample`` of them
    (``random.Random(seed).sample``, returned in file order), then the first ``limit``."""
    items = ps.items
    info = dict(ps.info)
    if ids is not None:
        want = [str(i) for i in ids]
        have = {it.id for it in items}
        missing = [i for i in want if i not in have]
        if missing:
            raise InputError(
                f"{len(missing)} requested row ids are not in the set (first: {missing[0]!r}; "
                "an overlap row that was excluded, or the wrong file?)",
                ps.path,
            )
        keep = set(want)
        items = [it for it in items if it.id in keep]
        info["rows"] = "ids"
    if sample is not None and sample < len(items):
        chosen = set(id(x) for x in random.Random(seed).sample(items, sample))
        items = [it for it in items if id(it) in chosen]
        info["sample"] = {"n": sample, "seed": seed}
    if limit is not None:
        items = items[:limit]
        info["limit"] = limit
    return PromptSet(ps.name, ps.kind, ps.path, ps.format, items, info)


def ids_from_subsets(subsets_file: str | Path, prompt_path: str | Path) -> tuple[str, list[str]] | None:
    """Find the entry of an ``eval_subsets.json``-style file (``{name: {file, key, ids}}``) whose ``file``
    names ``prompt_path`` (matched on the last two path parts); return (entry name, ids) or None."""
    p = Path(subsets_file)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("subset file not found", p) from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg})", p) from None
    tail = Path(prompt_path).resolve().parts[-2:]
    for name, entry in data.items():
        if isinstance(entry, dict) and "file" in entry and "ids" in entry:
            if Path(entry["file"]).parts[-2:] == tail:
                return name, [str(i) for i in entry["ids"]]
    return None
