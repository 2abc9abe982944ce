"""Prompt sets — the text a model is asked: evaluation sets (AdvBench, XSTest, DialogSum, HarmBench, any
CSV/JSONL) read into :class:`PromptSet`, and the tuning-only probes (:mod:`.probes`) that scoring and search
use. Sits beside the adapter and weights: both scoring and evaluation read prompts."""

from .probes import (
    default_probes,
    harmbench_val,
    harmful_probes,
    probe_set,
    probes_from_file,
    sample_probes,
    utility_probes,
)
from .sets import (
    KINDS,
    QA_INSTRUCTION,
    SUMMARY_INSTRUCTION,
    PromptItem,
    PromptSet,
    detect_format,
    ids_from_subsets,
    load_prompts,
    subset,
)

__all__ = [
    "PromptItem",
    "PromptSet",
    "load_prompts",
    "subset",
    "ids_from_subsets",
    "detect_format",
    "KINDS",
    "QA_INSTRUCTION",
    "SUMMARY_INSTRUCTION",
    "harmbench_val",
    "harmful_probes",
    "utility_probes",
    "sample_probes",
    "probe_set",
    "default_probes",
    "probes_from_file",
]
