"""The generation-backend interface: settings, one generation's record, the Backend base class and
the fingerprints that key cached generations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ...adapter import ADAPTER_FILES, adapter_fingerprint, fingerprint_dir  # noqa: F401  (re-exported)
from ...errors import UsageError

# an automatic batch size (``GenSettings.batch_size`` 0) where prompts go in fixed batches (HF generate,
# backends batched by calls): at most this many a batch, ``safeprune run``'s default before it was automatic
CALL_ROWS = 50


@dataclass
class GenSettings:
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None  # None: the chat template's own default
    chat_template: bool = True
    batch_size: int = 16  # rows in flight (continuous batching) or prompts per call; 0: automatic (memory-bounded)
    sort_by_length: bool = False  # batch prompts of similar length together (less padding, faster)
    # verdict-aware early stopping: end a generation once one of these strings is in its decoded text
    # (the keyword judge's list; empty: off). See ``stopping.py``.
    stop_strings: tuple[str, ...] = ()
    stop_case_sensitive: bool = True
    # and, when given, one of these case-insensitive regular expressions (the broad pattern judge) must match
    stop_patterns: tuple[str, ...] = ()

    def key(self) -> dict[str, Any]:
        """The settings that change a generation (batch size, batch composition and the generation loop do
        not, up to float rounding). Early stopping is part of the key when on (the text is truncated);
        when off the key is what it was before early stopping existed, so older caches stay valid."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("sort_by_length")
        strings, cs, patterns = d.pop("stop_strings"), d.pop("stop_case_sensitive"), d.pop("stop_patterns")
        if strings or patterns:
            d["early_stop"] = {"strings": list(strings), "case_sensitive": cs}
            if patterns:
                d["early_stop"]["patterns"] = list(patterns)
                # where a pattern match counts as decided: 2 = each pattern's own lookahead reach (stopping.py
                # STOP_RULE; the first rule, a fixed 12-character margin, cut later: other texts, same verdicts)
                d["early_stop"]["pattern_rule"] = 2
        if not self.do_sample:
            d.pop("temperature"), d.pop("top_p"), d.pop("seed")
        return d


@dataclass
class Generation:
    """One prompt's generation. ``batch_seconds`` / ``batch_size``: the wall time of the batch it was made
    in and that batch's size; with continuous batching (no fixed batches) ``batch_seconds`` is the time
    attributed to this generation (each step's time shared among the rows in it) and ``batch_size`` is 1,
    so summed ``batch_seconds / batch_size`` is the generation time either way."""

    text: str
    new_tokens: int
    batch_seconds: float  # wall time of the batch this sample was generated in
    batch_size: int
    mean_nll: float | None = None
    mean_entropy: float | None = None
    finished: bool = True  # ended with EOS (False: cut at max_new_tokens, or stopped early)
    stopped_early: bool = False  # cut once a refusal keyword was in the text (the verdict was decided)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        return d


class Backend:
    """Interface. ``generate(prompts, adapter, settings)`` -> one Generation per prompt."""

    name = "abstract"

    def __init__(self, base: str, adapters: dict[str, str] | None = None):
        self.base = str(base)
        self.adapters = dict(adapters or {})

    @property
    def model_id(self) -> str:
        return self.base

    def model_hash(self) -> str:
        """sha256 of the base model's files (computed once per backend)."""
        h = getattr(self, "_hash", None)
        if h is None:
            h = self._hash = fingerprint_dir(self.base)
        return h

    def adapter_hash(self, adapter: str | None) -> str:
        if adapter is None:
            return "none"
        return adapter_fingerprint(self.adapters[adapter])

    def render(self, prompt: str, settings: GenSettings) -> str:
        return prompt

    def schedules_itself(self, settings: GenSettings) -> bool:
        """True when the backend wants every prompt in one ``generate`` call (it schedules them, e.g. by
        continuous batching) and reports finished generations through ``on_batch`` as they end."""
        return False

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Attach one more adapter to the loaded base (e.g. a pruned variant written during a search)."""
        if name in self.adapters:
            if Path(self.adapters[name]) == Path(path):
                return
            raise UsageError(f"adapter name {name!r} is already loaded from {self.adapters[name]}")
        self.adapters[name] = str(path)

    def generate(
        self,
        prompts: Sequence[str],
        adapter: str | None,
        settings: GenSettings,
        on_batch: Callable[[list[int], list[Generation]], None] | None = None,
    ) -> list[Generation]:
        """One Generation per prompt, in order. ``on_batch(indices, generations)`` is called as
        generations finish (indices into ``prompts``). Honour ``settings.stop_strings`` or generate in
        full (the verdict is the same; only the time differs)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "base": self.base, "adapters": dict(self.adapters)}


def tokens_per_second(gens: Sequence[Generation]) -> float:
    """Generated tokens over wall time, counting each batch's time once."""
    toks = sum(g.new_tokens for g in gens)
    secs = sum(g.batch_seconds / max(1, g.batch_size) for g in gens)
    return toks / secs if secs > 0 else math.nan
