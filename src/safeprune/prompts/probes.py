"""Probe prompts: the tuning-only data that scoring (actdir) and the budgeted search look at.

Probes never come from the evaluation sets (AdvBench, XSTest, DialogSum test): every loader here refuses
them. Harmful probes are HarmBench ``official_split == "val"`` standard behaviours (topped up with
StrongREJECT for actdir); harmless/utility probes are DialogSum validation dialogues and HotpotQA
questions. The data folder comes from :func:`safeprune.io.datapaths.data_root`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, UsageError
from ..io.datapaths import data_root
from .sets import PromptSet, load_prompts, subset

HARMBENCH_FILE = Path("harmbench") / "harmbench_behaviors_text_all.csv"
STRONGREJECT_FILE = Path("strongreject") / "strongreject_dataset.csv"
DIALOGSUM_VAL_FILE = Path("dialogsum") / "validation.jsonl"
HOTPOTQA_FILE = Path("hotpotqa") / "hotpot_dev_v1_simplified.jsonl"
EVAL_FORMATS = {"advbench": "AdvBench", "xstest": "XSTest"}  # evaluation sets: never probes
HARMLESS_SOURCES = ("mix", "dialogsum", "hotpotqa")


def harmbench_val(path: str | Path | None = None) -> PromptSet:
    """HarmBench ``official_split == 'val'`` standard behaviours (not contextual, not copyright, not in the
    harmful fine-tuning data), in file order. The one HarmBench probe loader."""
    path = Path(path) if path is not None else data_root() / HARMBENCH_FILE
    ps = load_prompts(path, "safety")  # drops copyright and in_jbb_harmful_ft rows
    if ps.format in EVAL_FORMATS:
        raise UsageError(
            f"{EVAL_FORMATS[ps.format]} is an evaluation set; search probes come from HarmBench's val split ({path})"
        )
    if ps.format != "harmbench":
        raise UsageError(
            f"harmful probes must be a HarmBench file (official_split column); {path} reads as {ps.format!r}"
        )
    if "official_split" not in (ps.items[0].meta if ps.items else {}):
        raise InputError("no official_split column: cannot tell HarmBench val rows from test rows", path)
    before = len(ps.items)
    ps.items = [
        it
        for it in ps.items
        if it.meta.get("official_split") == "val"
        and it.meta.get("FunctionalCategory") not in ("contextual", "copyright")
    ]
    ps.info["rows"] = "official_split=val, standard behaviours"
    ps.info["dropped_not_val_or_contextual"] = before - len(ps.items)
    if not ps.items:
        raise InputError("no HarmBench val standard rows", path)
    return ps


def harmful_probes(path: str | Path | None = None, n: int = 48, seed: int = 0) -> PromptSet:
    """A seeded sample of ``n`` HarmBench val standard behaviours (all of them if fewer)."""
    return sample_probes(harmbench_val(path), n, seed, "harmful")


def utility_probes(path: str | Path | None = None, n: int = 24, seed: int = 0) -> PromptSet:
    """DialogSum ``validation`` dialogues (never test), prompt ``Summarize this dialogue:\\n`` + dialogue;
    a seeded sample of ``n``."""
    path = Path(path) if path is not None else data_root() / DIALOGSUM_VAL_FILE
    if path.stem.lower() == "test":
        raise UsageError(f"{path} is an evaluation split; utility probes come from DialogSum validation")
    ps = load_prompts(path, "utility")
    if ps.format in EVAL_FORMATS:
        raise UsageError(f"{EVAL_FORMATS[ps.format]} is an evaluation set, not a utility probe ({path})")
    return sample_probes(ps, n, seed, "utility")


def sample_probes(ps: PromptSet, n: int, seed: int, what: str) -> PromptSet:
    if n < 1:
        raise UsageError(f"--n-{what} must be >= 1, got {n}")
    avail = len(ps.items)
    out = subset(ps, sample=n, seed=seed)
    out.info["requested"] = n
    out.info["available"] = avail
    return out


def probe_set(
    spec: str | Path | PromptSet | None, loader: Callable[..., PromptSet], n: int, seed: int, kind: str
) -> PromptSet:
    """Probes given as a PromptSet (checked and sampled), or a path / None for ``loader``."""
    if isinstance(spec, PromptSet):
        if spec.kind != kind:
            raise UsageError(f"the {kind} probes are a {spec.kind!r} prompt set")
        if spec.format in EVAL_FORMATS:
            raise UsageError(f"{EVAL_FORMATS[spec.format]} is an evaluation set, not a search probe")
        return sample_probes(spec, n, seed, "harmful" if kind == "safety" else "utility")
    return loader(spec, n, seed)


def default_probes(
    data: str | Path | None = None, n: int = 64, seed: int = 0, harmless_source: str = "mix"
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Seeded harmful and harmless probe prompts for actdir (never AdvBench, XSTest or DialogSum test).

    harmful: HarmBench val standard behaviours (:func:`harmbench_val`), topped up with StrongREJECT prompts
    (not in the fine-tuning set) to ``n``. harmless: ``"dialogsum"`` (validation dialogues, "Summarize this
    dialogue:\\n" + dialogue), ``"hotpotqa"`` (questions) or ``"mix"`` (half each).
    """
    if n < 2:
        raise UsageError(f"need at least 2 probes of each kind, got n={n}")
    d = data_root(data)
    rng = random.Random(seed)
    hb_val = [it.prompt for it in harmbench_val(d / HARMBENCH_FILE).items]
    harmful = rng.sample(hb_val, min(n, len(hb_val)))
    src = {"harmbench_val": len(harmful)}
    if len(harmful) < n:
        sr = [it.prompt for it in load_prompts(d / STRONGREJECT_FILE, "safety").items]
        extra = rng.sample(sr, min(n - len(harmful), len(sr)))
        harmful += extra
        src["strongreject"] = len(extra)
    rng.shuffle(harmful)
    if harmless_source not in HARMLESS_SOURCES:
        raise UsageError(f"unknown harmless probe source {harmless_source!r}; known: {', '.join(HARMLESS_SOURCES)}")
    n_ds = {"mix": n // 2, "dialogsum": n, "hotpotqa": 0}[harmless_source]
    harmless: list[str] = []
    hsrc: dict[str, int] = {}
    if n_ds:
        ds = load_prompts(d / DIALOGSUM_VAL_FILE, "utility")
        harmless += [it.prompt for it in rng.sample(ds.items, min(n_ds, len(ds.items)))]
        hsrc["dialogsum_validation"] = len(harmless)
    if n - len(harmless) > 0 and harmless_source != "dialogsum":
        hq = load_prompts(d / HOTPOTQA_FILE, "utility")
        k = n - len(harmless)
        harmless += [it.prompt for it in rng.sample(hq.items, min(k, len(hq.items)))]
        hsrc["hotpotqa_dev"] = min(k, len(hq.items))
    rng.shuffle(harmless)
    info = {"data_dir": str(d), "seed": seed, "harmful": src, "harmless": hsrc, "harmless_source": harmless_source}
    return harmful, harmless, info


def probes_from_file(path: str | Path, kind: str, n: int | None, seed: int) -> tuple[list[str], dict[str, Any]]:
    """Prompts from one file (any format :func:`load_prompts` reads), a seeded sample of ``n`` (all if
    ``n`` is None or larger). Evaluation sets are refused."""
    if kind not in ("harmful", "harmless"):
        raise UsageError(f"probe kind must be 'harmful' or 'harmless', got {kind!r}")
    # instruction="": a QA file (HotpotQA) gives its bare questions, not the QA answer-format prompt
    ps = load_prompts(path, "safety" if kind == "harmful" else None, instruction="")
    if ps.format in EVAL_FORMATS or (ps.format == "dialogsum" and Path(path).name.startswith("test")):
        raise UsageError(
            f"{path}: {ps.format} {'test ' if ps.format == 'dialogsum' else ''}is an evaluation set; "
            "probes must come from tuning data (HarmBench val, StrongREJECT, DialogSum validation, ...)"
        )
    items = [it.prompt for it in ps.items]
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items, {"path": str(path), "format": ps.format, "n": len(items)}
