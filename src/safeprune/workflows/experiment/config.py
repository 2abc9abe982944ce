"""The experiment file of ``safeprune run``: a validated (pydantic) description of one study.

    name: testbed-reproduction
    base: ../models/aligned            # the model the adapters were trained on (DDI's W0)
    aligned: ../models/aligned         # SafeLoRA / SPLoRA pair (default: base)
    unaligned: ../models/unaligned
    adapters: {lora: ../shared/testbed/adapters/mix_s0}
    finetune: []                       # optional: adapters trained first (safeprune finetune options)
    methods:
      - {name: ddi, taus: [5, 10, 15, 20, knee]}
      - {name: safelora, taus: [10]}   # action defaults to "project" for safelora, "prune" otherwise
      - {name: splora-official, method: splora, options: {mode: official}, taus: [10]}
    random: {seeds: [0, 1, 2, 3, 4]}   # the seeded random-pruning control, always run
    repairs:                           # optional: safeprune repair, its strength curve, energy-matched controls
      - {name: repair, options: {max_utility_drop: 5}, strengths: [0.5, 1.0], seeds: [1, 2, 3, 4, 5]}
    evaluation:
      safety: [{path: ../shared/data/advbench/harmful_behaviors.csv, sample: 150, seed: 20251122}]
      over_refusal: [{path: ../shared/data/xstest/xstest_prompts.csv, sample: 100, seed: 20251122}]
      utility: [{path: ../shared/data/dialogsum/test.jsonl, limit: 100}]
      qa: [{path: ../shared/data/hotpotqa/hotpot_dev_v1_simplified.jsonl, sample: 100, seed: 0}]   # optional

Relative paths are resolved against the directory of the experiment file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ...edit import default_edit
from ...errors import InputError, UsageError
from ...scoring import REGISTRY
from ...weights import looks_like_hub_id

AUTO_TAUS = ("knee", "mad")


def needs_pair(method: str) -> bool:
    """Whether a scoring method reads an aligned/unaligned pair (as its declaration says: SafeLoRA, SPLoRA)."""
    cls = REGISTRY.get(method)
    return cls is not None and "unaligned" in cls.requires


DATA_METHODS = ("actdir",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

Tau = Union[int, Literal["knee", "mad"]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_name(v: str, what: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{what} {v!r}: use letters, digits, '.', '_' or '-' (no spaces, no '/' or ':')")
    return v


class FinetuneSpec(_Strict):
    """One adapter trained before scoring; ``options`` are :func:`safeprune.training.finetune` keywords."""

    name: str
    data: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "finetune name")


class MethodSpec(_Strict):
    name: str  # the label in tables ("ddi", "splora-official", ...)
    method: str | None = None  # the scorer (default: name)
    action: Literal["prune", "project"] | None = None  # default: project for safelora, prune otherwise
    taus: list[Tau] = Field(default_factory=lambda: [10])
    options: dict[str, Any] = Field(default_factory=dict)  # scorer options
    module_types: list[str] | None = None
    mad_k: float = 3.0  # k of the "mad" automatic τ (median + k·MAD)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "method name")

    @field_validator("taus")
    @classmethod
    def _taus(cls, v: list) -> list:
        if not v:
            raise ValueError("give at least one tau")
        for t in v:
            if isinstance(t, int) and t < 0:
                raise ValueError(f"tau must be >= 0, got {t}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _defaults(self) -> MethodSpec:
        if self.method is None:
            self.method = self.name
        if self.action is None:
            self.action = default_edit(self.method)  # what the method declares (SafeLoRA: project)
        if self.action == "project" and default_edit(self.method) != "project":
            raise ValueError(f"method {self.name!r}: action 'project' is SafeLoRA's projection (method safelora)")
        return self


class RandomSpec(_Strict):
    """The random-pruning control: seed s prunes the first τ modules of a seeded permutation."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    taus: list[int] | None = None  # default: every integer τ the methods use (auto τ resolved)
    # which kinds of prompt sets the controls are evaluated on (default: all). The selection question
    # compares ASR with the controls; their utility can be skipped when generation time is short.
    kinds: list[Literal["safety", "over_refusal", "utility", "qa"]] | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("the random control needs at least one seed (it is always run)")
        return list(dict.fromkeys(v))


class RepairSpec(_Strict):
    """``safeprune repair`` on every adapter (:mod:`safeprune.workflows.repair`): one fit with ``options``
    (:class:`~safeprune.workflows.repair_options.RepairOptions` fields; its budgets choose the strength), the
    same fit rewritten at each of ``strengths`` without refitting, and for every strength written the
    energy-matched random controls (the same share of ΔW energy removed from seeded random components)."""

    name: str = "repair"
    options: dict[str, Any] = Field(default_factory=dict)
    strengths: list[float] = Field(default_factory=list)  # besides the one the fit chose
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])  # random controls at every strength
    data: str | None = None  # the probe data folder (default: $SAFEPRUNE_DATA or ../shared/data)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "repair name")

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from ..repair_options import RepairOptions

        known = {f.name for f in fields(RepairOptions)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown repair option(s) {unknown}; known: {', '.join(sorted(known))}")
        try:
            RepairOptions(**v).check()
        except UsageError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        for t in v:
            if not (0.0 < t <= 1.0):
                raise ValueError(f"a strength is in (0, 1], got {t}")
        return list(dict.fromkeys(float(t) for t in v))


class PromptSetSpec(_Strict):
    path: str
    name: str | None = None
    sample: int | None = None  # seeded random sample (random.Random(seed).sample, file order kept)
    seed: int = 0
    limit: int | None = None  # first N rows (after sampling)
    rows_from: str | None = None  # an eval_subsets.json-style file listing the row ids
    column: str | None = None
    reference_column: str | None = None
    include_overlap: bool = False


class JudgeSpec(_Strict):
    kind: Literal["hf_classifier", "openai"]
    options: dict[str, Any] = Field(default_factory=dict)


class EvalSpec(_Strict):
    safety: list[PromptSetSpec] = Field(default_factory=list)
    over_refusal: list[PromptSetSpec] = Field(default_factory=list)
    utility: list[PromptSetSpec] = Field(default_factory=list)
    qa: list[PromptSetSpec] = Field(default_factory=list)  # question/answer sets: exact match (SR) and F1
    safety_max_new_tokens: int = 64
    utility_max_new_tokens: int = 96
    qa_max_new_tokens: int = Field(32, ge=1)
    # AUARC's uncertainty: nll (default) or sampled (see safeprune.eval.uncertainty; costs uq.samples ×
    # items × variants extra generations, announced in the log before they run)
    uncertainty: Literal["nll", "sampled"] = "nll"
    uq_samples: int = Field(5, ge=2)
    uq_temperature: float = Field(1.0, gt=0)
    uq_equivalence: str = "rougeL:0.5"
    # rows in flight; auto: as many as fit a quarter of the free memory (the longest prompt's keys/values),
    # at most 256 (safeprune.eval.backends.continuous.auto_rows)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    sort_by_length: bool = True  # batch prompts of similar length together (less padding)
    utility_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None  # None: batch_size
    backend: Literal["hf", "vllm", "fake"] = "hf"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    loop: Literal["continuous", "generate"] = "continuous"  # hf: continuous batching, or HF generate
    # stop safety/over-refusal generations at the first refusal keyword (None: when no model judge is set)
    early_stop: bool | None = None
    system_prompt: str | None = None
    judges: list[JudgeSpec] = Field(default_factory=list)
    refusal_keywords: str | None = None  # a keywords JSON (default: the 29-string list)
    meteor: bool = True
    bootstrap: int = 10000
    cache: str | None = None  # generation cache (JSONL); default OUT/cache/generations.jsonl. Share one
    # between experiments to reuse generations of identical variants.
    include_base: bool = True

    @model_validator(mode="after")
    def _some(self) -> EvalSpec:
        if not (self.safety or self.over_refusal or self.utility or self.qa):
            raise ValueError("evaluation needs at least one prompt set (safety, over_refusal, utility or qa)")
        return self


class LatencySpec(_Strict):
    enabled: bool = True
    n_prompts: int = 8
    max_new_tokens: int = 32
    variants: list[str] | None = None  # default: base, each adapter, and every pruned τ of the first method


class PaperRef(_Strict):
    """Numbers from a paper to compare directions with (e.g. DDI Table 2)."""

    source: str
    lora_asr: float | None = None
    method_asr: float | None = None
    lora_rouge1: float | None = None
    method_rouge1: float | None = None
    method: str = "ddi"
    tau: int = 10


class ExperimentConfig(_Strict):
    name: str
    base: str
    aligned: str | None = None
    unaligned: str | None = None
    adapters: dict[str, str] = Field(default_factory=dict)
    finetune: list[FinetuneSpec] = Field(default_factory=list)
    methods: list[MethodSpec] = Field(default_factory=list)
    random: RandomSpec = Field(default_factory=RandomSpec)
    repairs: list[RepairSpec] = Field(default_factory=list)  # safeprune repair pipelines + their controls
    evaluation: EvalSpec
    latency: LatencySpec = Field(default_factory=LatencySpec)
    paper: PaperRef | None = None
    seed: int = 0
    threads: int | None = None  # scoring threads (default: see safeprune.scoring.scan_threads)
    source: str | None = None  # the experiment file (filled in by load_config)

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            _check_name(k, "adapter name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = list(self.adapters) + [f.name for f in self.finetune]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique (adapters + finetune): {names}")
        if not names:
            raise ValueError("give at least one adapter (adapters: or finetune:)")
        if "base" in names:
            raise ValueError("'base' is reserved for the base model")
        labels = [m.name for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method names must be unique: {labels}")
        if "random" in labels:
            raise ValueError("'random' is the built-in control; configure it under random:")
        rnames = [r.name for r in self.repairs]
        if len(set(rnames)) != len(rnames) or set(rnames) & set(labels):
            raise ValueError(f"repair names must be unique and differ from the method names: {rnames}")
        if not self.methods and not self.repairs:
            raise ValueError("give at least one method (methods:) or repair (repairs:)")
        if any(needs_pair(m.method) for m in self.methods) and not self.unaligned:
            raise ValueError("safelora/splora need `unaligned:` (and `aligned:`, default base)")
        return self

    def restrict(self, names: list[str]) -> ExperimentConfig:
        """The same experiment on a subset of its adapters (``--only``)."""
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown or not names:
            raise UsageError(
                f"--only: unknown adapter(s) {unknown or names}; the experiment has {', '.join(self.adapter_names)}"
            )
        d = self.model_copy(deep=True)
        d.adapters = {k: v for k, v in d.adapters.items() if k in names}
        d.finetune = [f for f in d.finetune if f.name in names]
        return d

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters) + [f.name for f in self.finetune]

    def resolve_paths(self, root: Path) -> ExperimentConfig:
        def r(p: str | None) -> str | None:
            if p is None:
                return None
            p = expand_vars(p)
            q = Path(p).expanduser()
            if not q.is_absolute() and (root / q).exists():
                return str((root / q).resolve())
            if not q.is_absolute() and not looks_like_hub_id(p):
                return str((root / q).resolve())
            return str(q) if q.is_absolute() else p

        d = self.model_copy(deep=True)
        d.base = r(d.base)
        d.aligned = r(d.aligned) or d.base
        d.unaligned = r(d.unaligned)
        d.adapters = {k: r(v) for k, v in d.adapters.items()}
        for f in d.finetune:
            f.data = r(f.data)
            for key in ("mix", "exclude_ids"):
                if isinstance(f.options.get(key), str):
                    f.options[key] = r(f.options[key])
        for group in (d.evaluation.safety, d.evaluation.over_refusal, d.evaluation.utility, d.evaluation.qa):
            for s in group:
                s.path = r(s.path)
                s.rows_from = r(s.rows_from)
        for rp in d.repairs:
            rp.data = r(rp.data)
        d.evaluation.refusal_keywords = r(d.evaluation.refusal_keywords)
        d.evaluation.cache = r(d.evaluation.cache)
        return d


def expand_vars(text: str) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` from the environment (an unset VAR without a default is
    an error, so a typo never silently points at the wrong model)."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set (in {text!r})")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, text)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read, validate and resolve an experiment file (YAML or JSON). Errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise InputError("experiment file not found", p)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}", p) from None
    except UnicodeDecodeError:
        raise InputError("not a text file", p) from None
    if not isinstance(raw, dict):
        raise InputError("the experiment file must be a mapping (name:, base:, adapters:, methods:, evaluation:)", p)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise InputError(f"invalid experiment: {loc}: {first['msg']}{more}", p) from None
    try:
        cfg = cfg.resolve_paths(p.resolve().parent)
    except ValueError as e:
        raise InputError(f"invalid experiment: {e}", p) from None
    cfg.source = str(p.resolve())
    return cfg
