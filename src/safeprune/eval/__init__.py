"""Evaluation: safety (ASR, harmfulness, over-refusal) and utility (ROUGE, METEOR, AUARC, latency) of
a base model and its adapters on the same prompts, and paired before/after comparison."""

from ..prompts import PromptItem, PromptSet, load_prompts, subset
from .compare import compare
from .evaluate import EvalConfig, EvalResult, evaluate
from .judges import HFClassifierJudge, KeywordJudge, OpenAIJudge

__all__ = [
    "evaluate",
    "compare",
    "EvalConfig",
    "EvalResult",
    "KeywordJudge",
    "HFClassifierJudge",
    "OpenAIJudge",
    "load_prompts",
    "subset",
    "PromptSet",
    "PromptItem",
]
