"""A deterministic backend with no model, for tests: text from a rule per adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ...errors import UsageError
from .base import Backend, Generation, adapter_fingerprint
from .stopping import SubstringStop


class _Words:
    """A tokenizer stand-in for early stopping: token i is the i-th word."""

    clean_up_tokenization_spaces = False

    def __init__(self, words: list[str]):
        self.words = words

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids)


class FakeBackend(Backend):
    """Deterministic text from a rule; no model. ``responses`` maps adapter name (None = base) to a
    function ``prompt -> text`` or to a dict ``prompt -> text`` (missing prompts echo the prompt).
    ``sampler(adapter, prompt, seed) -> text``, when given, answers sampled decoding (``do_sample``)."""

    name = "fake"

    def __init__(
        self,
        base: str = "fake-base",
        adapters: dict[str, str] | None = None,
        responses: dict[str | None, Any] | None = None,
        sampler: Any = None,
    ):
        super().__init__(base, adapters)
        self.responses = responses or {}
        self.sampler = sampler
        self.calls: list[tuple[str | None, int]] = []

    def model_hash(self) -> str:
        return hashlib.sha256(self.base.encode()).hexdigest()

    def adapter_hash(self, adapter: str | None) -> str:
        if adapter is None:
            return "none"
        p = Path(self.adapters[adapter])
        return adapter_fingerprint(p) if p.exists() else hashlib.sha256(str(p).encode()).hexdigest()

    def _respond(self, adapter: str | None, prompt: str) -> str:
        r = self.responses.get(adapter)
        if r is None:
            return prompt
        if callable(r):
            return r(prompt)
        return r.get(prompt, prompt)

    def generate(self, prompts, adapter, settings, on_batch=None):
        if adapter is not None and adapter not in self.adapters:
            raise UsageError(f"unknown adapter {adapter!r}")
        out: list[Generation] = []
        bs = max(1, settings.batch_size)
        for s in range(0, len(prompts), bs):
            chunk = prompts[s : s + bs]
            self.calls.append((adapter, len(chunk)))
            gens = []
            for p in chunk:
                if settings.do_sample and self.sampler is not None:
                    reply = self.sampler(adapter, p, settings.seed)
                else:
                    reply = self._respond(adapter, p)
                words = reply.split()[: settings.max_new_tokens]
                early = False
                if settings.stop_strings or settings.stop_patterns:  # a "token" is a word
                    stop = SubstringStop(
                        _Words(words), settings.stop_strings, settings.stop_case_sensitive, (), settings.stop_patterns
                    )
                    for k in range(1, len(words)):
                        if stop.decided(range(k)):
                            words, early = words[:k], True
                            break
                text = " ".join(words)
                nll = 0.5 + (int(hashlib.md5(text.encode()).hexdigest()[:6], 16) % 1000) / 1000.0
                gens.append(
                    Generation(
                        text,
                        len(words),
                        0.001 * len(chunk),
                        len(chunk),
                        nll,
                        nll / 2,
                        len(words) < settings.max_new_tokens and not early,
                        early,
                    )
                )
            if on_batch:
                on_batch(list(range(s, s + len(chunk))), gens)
            out.extend(gens)
        return out
