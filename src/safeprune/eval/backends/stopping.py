"""Verdict-aware early stopping: end a generation once a refusal keyword is in its decoded text.

The keyword judge calls an output refused iff one of its strings is a substring of the output
(``tokenizer.decode(tokens, skip_special_tokens=True).strip()``, cut at the first end-of-sequence token).
Once a keyword is in the text of the first n generated tokens, it is in the text of every longer
continuation, so the verdict is decided and the remaining tokens cannot change it. That holds when the
decoded text of n tokens is a prefix of the decoded text of n + k tokens, which is true of the decoders in
use except at the very end of the text:

* a byte-level token may end inside a multi-byte UTF-8 character, decoded as U+FFFD until the next token
  completes it: trailing U+FFFD are held back;
* ``clean_up_tokenization_spaces`` rewrites " ." → "." and " n't" → "n't" (patterns of at most 4
  characters), so a pattern completed by a later token can delete a space inside the last 3 characters:
  with clean-up on, the last 4 characters are held back.

Only the text before the held-back tail is searched (stripped, as the judge strips the output), so a match
there is in the judge's text of the full generation as well.

A second refusal judge made of regular expressions (the broad pattern judge) is not monotone: a match can
depend on what follows it ("I can't help" is a refusal, "I can't help but" is not). A regex match reads
the characters it consumes, plus those its assertions look at: a lookahead ``(?!...)`` reads up to the
longest string its body can match past its position, a word boundary ``\\b`` reads the next character.
:func:`pattern_reach` bounds, from the parsed pattern, how many characters past the end of a match any
assertion can read (8 for ``\\b(?! (?:but|myself|it)\\b)``: " myself" and the boundary after it; 0 for a
pattern that ends in a consumed ``[,.!]``). When a pattern matches the stable text and the match's end
plus that reach is within the text, every character the match depended on is already there and is the
same in every continuation, so the match exists in the full generation too: the verdict is decided. A
pattern whose reach cannot be bounded (``\\Z``, a lookahead with an unbounded repeat) never decides early.
A generation stops only when every refusal judge has decided, so each judge's verdict is the full
generation's.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch
from transformers import StoppingCriteria

CLEANUP_HOLD_BACK = 4  # longest clean_up_tokenization_spaces pattern (" n't", " 're", " 've")
# version of the stop rule, in the generation cache key: 2 = per-pattern reach (before: a fixed 12-character
# margin after a pattern match; the cut texts differ, the verdicts do not)
STOP_RULE = 2


def pattern_reach(pattern: str, flags: int = re.IGNORECASE | re.MULTILINE) -> int | None:
    """How many characters past the end of a match the pattern's assertions can read, at most (None: no
    bound). Consumed characters are inside the match; an assertion at a position inside the match reads
    forward at most its own reach from there, so the largest one bounds them all."""
    from re import _constants as K  # noqa: PLC0415 - the stdlib regex parser (what re.compile uses)
    from re import _parser as P  # noqa: PLC0415

    inf = float("inf")

    def width(sub: Any) -> float:
        hi = sub.getwidth()[1]
        return inf if hi >= K.MAXREPEAT else hi

    def reach(items: Any) -> float:
        r: float = 0
        for op, av in items:
            if op is K.AT:
                if av in (K.AT_BOUNDARY, K.AT_NON_BOUNDARY):
                    r = max(r, 1)
                elif av is K.AT_END:  # "$": end of a line (MULTILINE) reads the next character; else undecidable
                    r = max(r, 1 if flags & re.MULTILINE else inf)
                elif av is not K.AT_BEGINNING and av is not K.AT_BEGINNING_STRING:  # "\Z" and the like
                    r = inf
            elif op in (K.ASSERT, K.ASSERT_NOT):
                direction, sub = av
                r = max(r, reach(sub) + (width(sub) if direction > 0 else 0))
            elif op is K.SUBPATTERN:
                r = max(r, reach(av[3]))
            elif op is K.BRANCH:
                r = max([r] + [reach(b) for b in av[1]])
            elif op in (K.MAX_REPEAT, K.MIN_REPEAT, K.POSSESSIVE_REPEAT):
                r = max(r, reach(av[2]))
            elif op is K.ATOMIC_GROUP:
                r = max(r, reach(av))
            elif op is K.GROUPREF_EXISTS:
                r = max(r, reach(av[1]), reach(av[2]) if av[2] is not None else 0)
        return r

    r = reach(P.parse(pattern, flags))
    return None if r == inf else int(r)


class SubstringStop:
    """Decides, from a generation's token ids, whether one of ``strings`` is already in its stable text."""

    def __init__(
        self,
        tokenizer: Any,
        strings: Sequence[str],
        case_sensitive: bool,
        eos_ids: Iterable[int],
        patterns: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.case_sensitive = case_sensitive
        self.strings = [s if case_sensitive else s.lower() for s in strings if s]
        self.patterns = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in patterns]
        # per pattern: characters that must follow a match before it decides (None: it never decides early)
        self.reach = [pattern_reach(p) for p in patterns]
        self.eos_ids = set(eos_ids)
        self.hold_back = CLEANUP_HOLD_BACK if getattr(tokenizer, "clean_up_tokenization_spaces", False) else 0

    def stable_text(self, token_ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        if self.hold_back:
            text = text[: max(0, len(text) - self.hold_back)]
        return text.rstrip("\ufffd").strip()

    def decided(self, token_ids: Sequence[int]) -> bool:
        if not self.strings and not self.patterns:
            return False
        text = self.stable_text(token_ids)
        if self.strings:
            t = text if self.case_sensitive else text.lower()
            if not any(s in t for s in self.strings):
                return False
        if self.patterns:
            t = text.replace("\u2019", "'").replace("\u2018", "'")  # as the pattern judge reads it
            n = len(t)
            if not any(
                m.end() + r <= n for rx, r in zip(self.patterns, self.reach) if r is not None for m in rx.finditer(t)
            ):
                return False
        return True


class KeywordStoppingCriteria(StoppingCriteria):
    """For ``model.generate``: a row is done once its generated text holds a keyword. Records, per row, how
    many tokens had been generated when it stopped (``stopped_at``; the pad token that generate appends
    afterwards may equal the EOS token, so the caller needs this to cut the row)."""

    def __init__(self, stop: SubstringStop, prompt_len: int, batch: int):
        self.stop = stop
        self.prompt_len = prompt_len
        self.stopped_at: list[int | None] = [None] * batch
        self.ended = [False] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :].tolist()
        done = []
        for r, toks in enumerate(new):
            if self.stopped_at[r] is None and not self.ended[r]:
                if toks and toks[-1] in self.stop.eos_ids:
                    self.ended[r] = True
                elif self.stop.decided(toks):
                    self.stopped_at[r] = len(toks)
            done.append(self.stopped_at[r] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
