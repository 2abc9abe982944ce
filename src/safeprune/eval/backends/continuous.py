"""Greedy generation by continuous batching over the KV cache (the HF backend's default loop).

HF ``generate`` on a fixed batch keeps every row until the longest one ends, padding the finished ones.
Here a batch slot is freed as soon as its sequence ends (end-of-sequence token, verdict-aware early stop,
or ``max_new_tokens``) and refilled with the next prompt:

* prompts are taken longest first (fewer padding columns while the long ones run);
* the token prefix all prompts share (the chat template's system turn: about half of a short safety
  prompt) is encoded once per call and its keys/values copied into each new row;
* new prompts are prefilled in groups of similar length (little left padding), each in a cache of its own,
  then joined to the running cache along the batch dimension (shorter ones left-padded with zero
  keys/values, masked out);
* finished rows are dropped from the cache, and leading columns that are padding in every row are cut;
* free slots are refilled in groups (an eighth of the rows in flight, :data:`REFILL_SHARE`), and the new
  rows are written into the rows the finished ones freed in the running cache, when they fit;
* rows of very different lengths run in separate *lanes* (running batches stepped one after the other): a
  decode step reads every cached column of every row, padding included, so one 1,000-token dialogue in a
  batch of 250-token ones makes every row read four times the keys/values it needs. A prefilled group joins
  the lane where it adds the least padding, and opens a new lane when that padding (rows × columns) costs
  more than a lane's own forward pass: both are memory reads, one of the weights (parameters) and one of
  the padding's keys/values (:func:`lane_padding_limit`);
* each step feeds one token per row with the position ``number of real tokens so far`` and the attention
  mask of real tokens, as ``generate`` does; the token is the argmax of the float32 logits, as in
  ``generate``, and ``mean_nll`` / ``mean_entropy`` are computed as the ``generate`` path computes them;
  on a CPU the output layer is fused with those statistics over vocabulary chunks, so the logits are never
  written (:class:`_Head`, checked against the model's own logits on the first forward of each call).

Greedy tokens equal ``generate``'s for the same prompt up to floating-point rounding: the rows a prompt
shares a batch with and the number of padding columns change the order of floating-point sums, which can
flip an argmax between two nearly tied tokens (never seen in float64; counted in float32 by the benchmark).
Sampling is not done here (``generate`` keeps its random streams).
"""

from __future__ import annotations

import inspect
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .base import Generation, GenSettings

try:  # transformers >= 4.56: a cache is a list of layers holding .keys / .values
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the generate loop is used instead
    DynamicCache = DynamicLayer = None  # type: ignore[assignment,misc]


def cache_kwarg(model: Any) -> str | None:
    """The name under which the causal LM's ``forward`` takes its KV cache, or None when continuous
    batching cannot run on this model (older transformers, or a cache that is not a plain dynamic one,
    e.g. sliding-window layers)."""
    if DynamicCache is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    name = "cache" if "cache" in params else ("past_key_values" if "past_key_values" in params else None)
    try:
        layers = DynamicCache(config=base.config).layers
    except Exception:  # noqa: BLE001 - any failure means: not a plain dynamic cache
        return None
    if name is None or not layers or any(type(la) is not DynamicLayer for la in layers):
        return None
    return name


@dataclass
class _Row:
    index: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False  # ended with EOS
    early: bool = False  # stopped once the verdict was decided
    done: bool = False


def _choose(logits: torch.Tensor, chunk: int = 16) -> tuple[list[int], list[float], list[float]]:
    """Greedy token, its log-probability and the entropy of the distribution, per row (float32, like
    ``generate`` and the ``_TokenStats`` processor of the generate path). Rows are processed ``chunk`` at a
    time: each row's values are the same bits (a row's softmax does not read the others), and 16 rows of a
    50k vocabulary stay in the CPU's caches between the five passes (256 rows at once: 160 ms a step, in
    chunks: 51 ms; ``benchmarks/results/decode_costs.json``)."""
    scores = logits.to(dtype=torch.float32)
    tok = torch.argmax(scores, dim=-1)
    chosen, ent = [], []
    for s in range(0, scores.shape[0], chunk):
        logp = torch.log_softmax(scores[s : s + chunk], dim=-1)
        p = logp.exp()
        ent.append(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1))
        chosen.append(logp.gather(1, tok[s : s + chunk, None]).squeeze(1))
    return tok.tolist(), torch.cat(chosen).tolist(), torch.cat(ent).tolist()


HEAD_CHUNK = 4096  # vocabulary columns per product of the fused output layer
FUSE_HEAD = True  # fuse the output layer on a CPU when its check passes (:class:`_Head`); False: never


def _fused_choose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, chunk: int = HEAD_CHUNK
) -> tuple[list[int], list[float], list[float]]:
    """:func:`_choose` of ``linear(x, weight, bias)`` without writing the logits: the product is computed
    ``chunk`` vocabulary columns at a time into one small buffer, and the argmax, the log-sum-exp (running
    maximum, rescaled sum of exponentials) and the sum of ``p * logit`` are accumulated per chunk; the chosen
    token's log-probability is ``max - lse`` and the entropy ``lse - sum(p * logit)``. The tokens are those
    of the whole product's argmax (the first maximum wins); the log-probability and entropy agree with
    :func:`_choose`'s to float32 rounding of the summation order (within 1e-6 and 7e-6 on random
    SmolLM2-sized data). The 50 MB of logits of a 256-row step is never written or read back: 1.10x faster
    at 256 rows, 1.03x at 128, 1.11x at 64 in isolation, ~1% of a whole safety call
    (``benchmarks/results/fused_head.json``, ``fused_head_loop.json``)."""
    x = x.to(weight.dtype).contiguous()
    rows, vocab = x.shape[0], weight.shape[0]
    m = torch.full((rows,), float("-inf"), device=x.device)
    arg = torch.zeros(rows, dtype=torch.long, device=x.device)
    s, t = torch.zeros(rows, device=x.device), torch.zeros(rows, device=x.device)
    buf = x.new_empty(rows, min(chunk, vocab))
    for a in range(0, vocab, chunk):
        n = min(chunk, vocab - a)
        if bias is None:
            y = torch.mm(x, weight[a : a + n].t(), out=buf[:, :n])
        else:
            y = torch.addmm(bias[a : a + n], x, weight[a : a + n].t(), out=buf[:, :n])
        y = y.to(torch.float32)
        cm, ca = y.max(-1)
        new = torch.maximum(m, cm)
        scale = torch.exp(m - new)
        e = torch.exp(y - new[:, None])
        s, t = s * scale + e.sum(-1), t * scale + (torch.where(e > 0, e * y, torch.zeros_like(e))).sum(-1)
        arg = torch.where(cm > m, ca + a, arg)  # strictly greater: the first maximum wins, as in argmax
        m = new
    lse = m + torch.log(s)
    return arg.tolist(), (m - lse).tolist(), (lse - t / s).tolist()


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
    return F.pad(t, pad)


class _Layer(DynamicLayer if DynamicLayer is not None else object):  # type: ignore[misc]
    """A layer of the running batch's cache whose keys/values are views of buffers with ``room`` spare
    columns: a decode step writes its one column in place. ``DynamicLayer.update`` concatenates instead,
    copying the whole cache of every layer at every step (for 100 dialogue rows of 400 tokens, ~1.8 GB of
    memory traffic per step). The values, and so the attention, are the same."""

    room = 64

    def _alloc(self, like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty(rows, h, width + self.room, d)

    def fill(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int) -> None:
        """The rows of several caches stacked, each left-padded with zeros to ``width`` columns."""
        rows = sum(k.shape[0] for k in keys)
        self._k, self._v = self._alloc(keys[0], rows, width), self._alloc(values[0], rows, width)
        self._write(keys, values, 0, width)
        self._view(width)

    def _write(self, keys: list[torch.Tensor], values: list[torch.Tensor], first: int, width: int) -> None:
        """Copy the caches' rows into the buffers from row ``first`` on, each left-padded with zeros to
        ``width`` columns."""
        r = first
        for k, v in zip(keys, values):
            n, pad = k.shape[0], width - k.shape[2]
            for buf, src in ((self._k, k), (self._v, v)):
                buf[r : r + n, :, :pad].zero_()  # masked out, but 0 * garbage could be NaN
                buf[r : r + n, :, pad:width].copy_(src)
            r += n

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
        """Write the rows of other caches into this buffer's spare rows (rows a finished sequence freed),
        each left-padded with zeros to the running width: a copy of the new rows only. False (nothing
        written) when they do not fit: too many rows, or wider than the running cache."""
        rows, width = self.keys.shape[0], self.keys.shape[2]
        n = sum(k.shape[0] for k in keys)
        if rows + n > self._k.shape[0] or any(k.shape[2] > width for k in keys):
            return False
        self._write(keys, values, rows, width)
        self._view(width, rows + n)
        return True

    def select(self, idx: torch.Tensor, first: int) -> None:
        """Keep the rows ``idx``, from column ``first`` on (a copy of the kept rows)."""
        width = self.keys.shape[2] - first
        k, v = self._alloc(self.keys, len(idx), width), self._alloc(self.values, len(idx), width)
        torch.index_select(self.keys[:, :, first:], 0, idx, out=k[:, :, :width])
        torch.index_select(self.values[:, :, first:], 0, idx, out=v[:, :, :width])
        self._k, self._v = k, v
        self._view(width)

    def move(self, dst: torch.Tensor, src: torch.Tensor, rows: int) -> None:
        """Copy rows ``src`` onto rows ``dst`` in place and keep the first ``rows``: removing a few finished
        rows copies as many rows, not the whole cache."""
        width = self.keys.shape[2]
        if len(dst):
            self._k.index_copy_(0, dst, self._k.index_select(0, src))
            self._v.index_copy_(0, dst, self._v.index_select(0, src))
        self._view(width, rows)

    def _view(self, width: int, rows: int | None = None) -> None:
        rows = self._k.shape[0] if rows is None else rows
        self.keys, self.values = self._k[:rows, :, :width], self._v[:rows, :, :width]
        self.device, self.is_initialized = self._k.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n, m = self.keys.shape[2], key_states.shape[2]
        if n + m > self._k.shape[2]:  # out of room: a bigger buffer (rare: room covers max_new_tokens)
            self.fill([self.keys], [self.values], n)
        rows = self.keys.shape[0]
        self._k[:rows, :, n : n + m].copy_(key_states)
        self._v[:rows, :, n : n + m].copy_(value_states)
        self._view(n + m, rows)
        return self.keys, self.values


class _Batch:
    """The running rows, their attention mask (rows × columns, left-padded) and their KV cache (layers
    with spare columns, see :class:`_Layer`)."""

    def __init__(self, kwarg: str, room: int = 64):
        self.kwarg = kwarg
        self.room = room
        self.rows: list[_Row] = []
        self.mask: torch.Tensor | None = None
        self.cache: Any = None

    def join(self, parts: list[_Batch]) -> bool:
        """Add the rows of other batches (freshly prefilled groups): into the spare rows of the running
        cache when they fit (True: a copy of the new rows), else into a new cache holding all rows (a copy
        of every row, per layer)."""
        parts = [b for b in parts if b.rows]
        if self.rows and parts and self._append(parts):
            return True
        parts = ([self] if self.rows else []) + parts
        if not parts:
            return False
        width = max(b.mask.shape[1] for b in parts)
        cache = parts[0].cache
        layers = []
        for i in range(len(cache.layers)):
            la = _Layer()
            la.room = self.room
            la.fill([b.cache.layers[i].keys for b in parts], [b.cache.layers[i].values for b in parts], width)
            layers.append(la)
        cache.layers = layers
        self.mask = torch.cat([_left_pad(b.mask, width, 1) for b in parts], 0)
        self.cache = cache
        self.rows = [r for b in parts for r in b.rows]
        return False

    def _append(self, parts: list[_Batch]) -> bool:
        """Join in place: the new rows go into the spare rows of every layer's buffer (rows that finished
        sequences freed, see :meth:`keep`), when all of them fit and none is wider than the running cache
        (:meth:`_Layer.append` decides, on the first layer, before anything is written); else False and
        nothing changed."""
        layers = self.cache.layers
        if not all(isinstance(la, _Layer) for la in layers):
            return False
        width = self.mask.shape[1]
        for i, la in enumerate(layers):
            if not la.append([b.cache.layers[i].keys for b in parts], [b.cache.layers[i].values for b in parts]):
                if i == 0:
                    return False
                raise RuntimeError("the layers of a running cache disagree on their rows or width")
        self.mask = torch.cat([self.mask] + [_left_pad(b.mask, width, 1) for b in parts], 0)
        self.rows = self.rows + [r for b in parts for r in b.rows]
        return True

    def keep(self, which: list[int]) -> None:
        """Keep these rows (positions in ``self.rows``). The running cache removes a few rows in place (the
        last kept rows move into the holes, so the row order changes); when the kept rows share many leading
        padding columns, those are cut (a copy of the kept rows)."""
        if len(which) == len(self.rows):
            return
        if not which:
            self.rows, self.cache, self.mask = [], None, None
            return
        n = len(which)
        idx = torch.tensor(which, device=self.mask.device)
        first = int(self.mask.index_select(0, idx).any(0).to(torch.int8).argmax())
        layers = self.cache.layers
        if all(isinstance(la, _Layer) for la in layers) and first < max(16, self.mask.shape[1] // 8):
            kept = set(which)
            holes = [p for p in range(n) if p not in kept]
            movers = [q for q in which if q >= n]
            order = list(range(n))
            for h, q in zip(holes, movers):
                order[h] = q
            dev = self.mask.device
            dst = torch.tensor(holes, dtype=torch.long, device=dev)
            src = torch.tensor(movers, dtype=torch.long, device=dev)
            for la in layers:
                la.move(dst, src, n)
            self.mask = self.mask.index_select(0, torch.tensor(order, device=self.mask.device))
            self.rows = [self.rows[i] for i in order]
            return
        for la in layers:
            if isinstance(la, _Layer):
                la.select(idx, first)
            else:  # a prefilled group's own cache
                la.keys = la.keys.index_select(0, idx)[:, :, first:]
                la.values = la.values.index_select(0, idx)[:, :, first:]
        self.mask = self.mask.index_select(0, idx)[:, first:]
        self.rows = [self.rows[i] for i in which]


def _new_cache(model: Any) -> Any:
    return DynamicCache(config=(model.get_base_model() if hasattr(model, "get_base_model") else model).config)


def _common_prefix(ids: list[list[int]]) -> int:
    """Length of the token prefix every prompt shares (the chat template's system turn), leaving each
    prompt at least one token of its own."""
    if len(ids) < 2:
        return 0
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for x in ids[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


class _Prefix:
    """The shared prefix's keys and values, computed once per call (batch 1) and copied into each
    admitted group's cache: the prefix is not re-encoded for every prompt."""

    def __init__(self, model: Any, kwarg: str, tokens: list[int], device: str):
        self.tokens = tokens
        self.cache = _new_cache(model)
        if tokens:
            inp = torch.tensor([tokens], device=device)
            mask = torch.ones_like(inp)
            pos = torch.arange(len(tokens), device=device)[None]
            model(
                input_ids=inp,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{kwarg: self.cache},
            )

    def cache_for(self, model: Any, rows: int) -> Any:
        cache = _new_cache(model)
        if self.tokens:
            for layer, (k, v) in zip(cache.layers, ((la.keys, la.values) for la in self.cache.layers)):
                layer.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
        return cache


PREFILL_TOKENS = 2048  # padded tokens per prefill forward: larger ones run slower per token on a CPU
# free slots are refilled once 1/REFILL_SHARE of the rows in flight are free (or the queue is that short):
# a refill costs a prefill forward pass and a join whatever its size (250 safety prompts through 64 slots
# with mix_s0: 77 prefills and 76 copied joins refilling every step, 70-77 s; 20 prefills and 15 in-place
# joins refilling 8 at a time, 65-66 s; same texts; notes/issue18.md, seventh session)
REFILL_SHARE = 8


def _prefill_groups(
    lengths: list[int], max_rows: int = 64, max_waste: float = 0.15, max_tokens: int = PREFILL_TOKENS
) -> list[list[int]]:
    """Split prompts (longest first) into prefill groups whose left padding stays under ``max_waste`` of
    their tokens (one padded group of prompts from 470 down to 100 tokens would encode twice the tokens)
    and whose padded size stays under ``max_tokens`` (an ad hoc measurement on SmolLM2, one thread, another job on
    the other core: 250-token dialogues cost 3.0 ms a token in groups of 4 or 8, 3.4 in groups of 16 — the
    activations of a large forward no longer stay in the CPU's caches — while short prompts gain from more
    rows per forward)."""
    groups: list[list[int]] = []
    for j, n in enumerate(lengths):
        g = groups[-1] if groups else None
        if g is not None and len(g) < max_rows:
            width = max(lengths[k] for k in g + [j])
            real = sum(lengths[k] for k in g) + n
            if width * (len(g) + 1) <= min((1 + max_waste) * real, max_tokens):
                g.append(j)
                continue
        groups.append([j])
    return groups


def _prefill(model: Any, kwarg: str, prefix: _Prefix, seqs: list[list[int]], pad: int, device: str):
    """Prefill the prompts' own tokens (after the shared prefix), left-padded among themselves: the
    columns are [prefix][padding][prompt]; positions count real tokens only."""
    p = len(prefix.tokens)
    rest = [s[p:] for s in seqs]
    width = max(len(s) for s in rest)
    inp = torch.tensor([[pad] * (width - len(s)) + s for s in rest], device=device)
    own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in rest], device=device)
    mask = torch.cat([torch.ones(len(seqs), p, dtype=own.dtype, device=device), own], 1)
    pos = (mask.cumsum(-1) - 1)[:, p:].masked_fill(own == 0, 0)
    cache = prefix.cache_for(model, len(seqs))
    out = model(
        input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kwarg: cache}
    )
    return cache, mask, out


def continuous_generate(
    backend: Any,
    texts: list[str],
    settings: GenSettings,
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
) -> list[Generation]:
    """Greedy generations of the rendered ``texts`` with at most ``settings.batch_size`` rows in flight.
    ``backend`` is an :class:`~.hf.HFBackend` (model, tokenizer, device, eos_ids, stopper,
    encode_kwargs); the adapter is already selected and inference mode on."""
    with _Head(backend.model, backend.device) as head:
        return _generate(backend, texts, settings, on_batch, head)


class _Head:
    """The output layer while the loop runs, through a forward pre-hook on it.

    * Its input is made contiguous. A prefill keeps the logits of the last position only
      (``logits_to_keep=1``), a strided ``[rows, 1, hidden]`` view that ``linear`` turns into a batched
      product over the weight expanded per row: one read of the 49,152 × 576 matrix per row (153 ms for 16
      rows on SmolLM2, 26 ms contiguous; ``benchmarks/results/decode_costs.json``). The values are the same
      up to float rounding.
    * On a CPU, once :meth:`choose` has checked it on the first forward, the layer is *fused*: the hook keeps
      the last position's input and hands the layer zero positions, so the model writes no logits, and
      :meth:`choose` computes the token and its statistics from the kept input by :func:`_fused_choose`. The
      check: the fused token equals the argmax of the model's own logits and the log-probability and entropy
      agree within 1e-3 for every row of that forward; a model that transforms its logits after the layer
      (soft-capping, a scale) fails it, and keeps the plain path, as does an output layer that is not a plain
      ``Linear`` (e.g. a LoRA-adapted one)."""

    def __init__(self, model: Any, device: str):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.module = head if isinstance(head, torch.nn.Module) else None
        self.fusable = (
            FUSE_HEAD
            and type(head) is torch.nn.Linear
            and str(device).startswith("cpu")  # measured there; a GPU writes its logits fast enough
            and head.weight.dtype in (torch.float32, torch.float64)
        )
        self.fused = False  # decided by the first forward (see choose)
        self.x: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> _Head:
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        self.x = None

    def _hook(self, _module: Any, args: tuple) -> tuple | None:
        if not args:
            return None
        x = args[0]
        if self.fusable:
            self.x = x[:, -1]
        if self.fused:
            return (x[:, :0], *args[1:])
        return (x.contiguous(), *args[1:])

    def choose(self, out: Any) -> tuple[list[int], list[float], list[float]]:
        """Token, log-probability and entropy per row of this forward's last position."""
        if self.fused:
            return _fused_choose(self.x, self.module.weight, self.module.bias)
        got = _choose(out.logits[:, -1])
        if self.fusable:  # the first forward: fuse from now on if the fused statistics agree
            fused = _fused_choose(self.x, self.module.weight, self.module.bias)
            same = fused[0] == got[0] and all(
                abs(a - b) <= 1e-3 for u, v in ((fused[1], got[1]), (fused[2], got[2])) for a, b in zip(u, v)
            )
            self.fusable = self.fused = same
        return got


def _generate(backend: Any, texts: list[str], settings: GenSettings, on_batch, head: _Head) -> list[Generation]:
    model, tok = backend.model, backend.tokenizer
    kwarg = backend.cache_kwarg
    ids = [tok(t, **backend.encode_kwargs(settings))["input_ids"] for t in texts]
    queue = deque(sorted(range(len(texts)), key=lambda i: (-len(ids[i]), i)))
    eos, stop = backend.eos_ids(), backend.stopper(settings)
    max_new = max(1, settings.max_new_tokens)
    cap = (
        settings.batch_size
        if settings.batch_size > 0
        else auto_rows(model, max((len(x) for x in ids), default=1) + max_new, backend.device)
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    prefix = _Prefix(model, kwarg, ids[0][: _common_prefix(ids)] if ids else [], backend.device)
    results: dict[int, Generation] = {}

    def advance(rows: list[_Row], out: Any, t0: float) -> None:
        toks, chosen, ent = head.choose(out)
        seconds = time.perf_counter() - t0
        for r, t, c, e in zip(rows, toks, chosen, ent):
            r.tokens.append(t)
            r.logp.append(c)
            r.entropy.append(e)
            r.seconds += seconds / len(rows)
            if t in eos:
                r.finished = r.done = True
            elif len(r.tokens) >= max_new:
                r.done = True
            elif stop is not None and stop.decided(r.tokens):
                r.early = r.done = True

    def emit(rows: list[_Row]) -> None:
        gens = []
        for r in rows:
            text = tok.decode(r.tokens, skip_special_tokens=True)
            n = len(r.tokens)
            g = Generation(text.strip(), n, r.seconds, 1, -sum(r.logp) / n, sum(r.entropy) / n, r.finished, r.early)
            results[r.index] = g
            gens.append(g)
        if on_batch and gens:
            on_batch([r.index for r in rows], gens)

    lanes: list[_Batch] = []
    limit = lane_padding_limit(model)
    stats = {
        "rows_cap": cap,
        "lanes_max": 0,
        "forwards": 0,
        "prefill_forwards": 0,
        "joins_in_place": 0,
        "joins_copied": 0,
    }
    refill = max(1, cap // REFILL_SHARE)
    while queue or lanes:
        running = sum(len(b.rows) for b in lanes)
        if queue and (not running or cap - running >= min(refill, len(queue))):
            new = [_Row(queue.popleft()) for _ in range(min(cap - running, len(queue)))]
            joins: dict[int, list[_Batch]] = {}
            for chunk in _prefill_groups([len(ids[r.index]) - len(prefix.tokens) for r in new]):
                rows = [new[j] for j in chunk]
                t0 = time.perf_counter()
                g = _Batch(kwarg)
                g.cache, g.mask, out = _prefill(model, kwarg, prefix, [ids[r.index] for r in rows], pad, backend.device)
                stats["prefill_forwards"] += 1
                g.rows = rows
                advance(rows, out, t0)
                emit([r for r in rows if r.done])
                g.keep([j for j, r in enumerate(rows) if not r.done])
                if g.rows:
                    lane = _pick_lane(lanes, joins, g, limit)
                    if lane == len(lanes):
                        lanes.append(_Batch(kwarg, room=max_new + 1))
                    joins.setdefault(lane, []).append(g)
            for lane, groups in joins.items():
                stats["joins_in_place" if lanes[lane].join(groups) else "joins_copied"] += 1
            stats["lanes_max"] = max(stats["lanes_max"], len(lanes))
        for batch in lanes:
            t0 = time.perf_counter()
            inp = torch.tensor([[r.tokens[-1]] for r in batch.rows], device=backend.device)
            pos = batch.mask.sum(-1, keepdim=True)
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
            out = model(
                input_ids=inp, attention_mask=batch.mask, position_ids=pos, use_cache=True, **{kwarg: batch.cache}
            )
            stats["forwards"] += 1
            advance(batch.rows, out, t0)
            emit([r for r in batch.rows if r.done])
            batch.keep([j for j, r in enumerate(batch.rows) if not r.done])
        lanes = [b for b in lanes if b.rows]
    stats["fused_head"] = head.fused
    backend.loop_stats = stats
    return [results[i] for i in range(len(texts))]


def _kv_dims(model: Any) -> tuple[Any, int, int, int]:
    """The base model, its decoder layers, key/value heads and head size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return base, cfg.num_hidden_layers, kv, dim


def lane_padding_limit(model: Any) -> int:
    """Padding (rows × cached columns) a join may add to a lane before a new lane is cheaper. Both costs
    are memory reads on a CPU: a lane's forward pass reads every weight once (the input embedding table
    only in the rows it looks up), a padded column makes each layer read its keys and values. So the limit
    is the number of parameters read per step over the key/value numbers per token: 11,700 for SmolLM2-135M
    (with mix_s0's LoRA 11,756; measured with one thread in ``benchmarks/results/decode_costs.json``: a forward
    pass costs 63 ms, a padded column 5.2 µs per row, so 12,000)."""
    base, layers, kv, dim = _kv_dims(model)
    params = sum(p.numel() for p in base.parameters())
    emb_in, emb_out = base.get_input_embeddings(), base.get_output_embeddings()
    w_in = getattr(emb_in, "weight", None)
    if w_in is not None and getattr(emb_out, "weight", None) is not w_in:  # untied: the input table is looked up
        params -= w_in.numel()
    return max(1, params // (2 * layers * kv * dim))


# An automatic batch size (``batch_size`` 0): as many rows in flight as the keys/values of their longest
# prompt plus the new tokens fit in MEMORY_SHARE of the free memory, at most ROWS_MAX. A decode step's cost per
# row falls with the rows in flight up to about 128-256 and is flat beyond (SmolLM2, one thread: 8.6 ms a
# row at 16 rows, 4.9 at 64, 4.1 at 128, 4.0 at 256, 3.8 at 384; benchmarks/results/decode_costs.json),
# while the cache grows with every row.
ROWS_MAX = 256
MEMORY_SHARE = 0.25


def free_memory(device: str) -> int:
    """Bytes free for the cache: on a CUDA device what the allocator reports free, else the system's
    ``MemAvailable`` (``/proc/meminfo``), else the free physical pages, else 4 GiB."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def auto_rows(model: Any, tokens_per_row: int, device: str, free: int | None = None) -> int:
    """Rows in flight for an automatic batch size: per row, the keys and values of ``tokens_per_row``
    tokens in every layer (in the model's dtype) and three float32 rows of logits (the output, a softmax
    chunk, its exponent); ``MEMORY_SHARE`` of ``free`` bytes (default :func:`free_memory`), at most
    ``ROWS_MAX``, at least 1."""
    base, layers, kv, dim = _kv_dims(model)
    item = next(base.parameters()).element_size()
    w_out = getattr(base.get_output_embeddings(), "weight", None)
    vocab = w_out.shape[0] if w_out is not None else 0
    per_row = 2 * layers * kv * dim * item * max(1, tokens_per_row) + 3 * 4 * vocab
    free = free_memory(device) if free is None else free
    return max(1, min(ROWS_MAX, int(MEMORY_SHARE * free) // per_row))


def _pick_lane(lanes: list[_Batch], joins: dict[int, list[_Batch]], g: _Batch, limit: int, most: int = 4) -> int:
    """The lane a prefilled group joins: among the lanes whose padding (rows × columns that are not the
    row's own tokens), with the group and the groups already bound for it, stays within ``limit``, the one
    where the group adds the least; when none does, a new lane (index ``len(lanes)``) while fewer than
    ``most`` run, else the lane it adds the least padding to. The padding a lane carries is paid at every
    step; ``limit`` is what one more forward pass a step costs (:func:`lane_padding_limit`)."""
    w, real_g = g.mask.shape[1], int(g.mask.sum())
    scored = []  # (over the limit, padding the group adds, lane): the smallest wins
    for i, b in enumerate(lanes):
        parts = ([b] if b.rows else []) + joins.get(i, [])
        rows = sum(len(p.rows) for p in parts)
        width = max((p.mask.shape[1] for p in parts), default=0)
        real = sum(int(p.mask.sum()) for p in parts)
        new_width = max(width, w)
        extra = rows * (new_width - width) + len(g.rows) * (new_width - w)
        scored.append(((rows + len(g.rows)) * new_width - real - real_g > limit, extra, i))
    if not scored or (min(scored)[0] and len(lanes) < most):
        return len(lanes)
    return min(scored)[2]
