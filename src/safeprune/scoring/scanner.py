"""Scoring every module of an adapter: adapter + weight sources -> ScoreTable.

Weights are read once per module (each tensor at most once, shared by all methods) in their stored dtype and
released when the module is done, so memory does not grow with the number of layers. On CPU, when every
scorer allows it, a few modules are read and scored at once in worker threads (one torch thread each);
otherwise a reader thread fetches the next module's weights while the current one is being scored.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..adapter import LoraAdapter, LoraModule, adapter_fingerprint, load_adapter, parse_module_types
from ..errors import NonFiniteError, UsageError
from ..io.devices import resolve_device  # re-exported: safeprune.scoring.resolve_device
from ..io.progress import make_progress
from ..weights import (
    WeightSource,
    check_modules_present,
    open_weights,
    read_weight_and_norm,
)
from ..weights.pair import check_pair
from . import methods as registered_methods  # noqa: F401  (importing it registers the scoring methods)
from .agreement import rank_agreement
from .base import ModuleContext, Scorer, get_scorer, method_names
from .table import MethodInfo, ScoreTable, module_row


def _check_row_finite(row: dict[str, Any], adapter: LoraAdapter, allowed: frozenset[str] = frozenset()) -> None:
    """A score table never holds NaN/Inf silently. Inputs are checked finite when read, so a non-finite
    score can only come from degenerate weights; it is reported, not ranked — except for the columns a
    scorer documents as undefined in a degenerate case (``Scorer.nan_allowed``), which are never selected."""
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v) and not (k in allowed and math.isnan(v)):
            raise NonFiniteError(
                f"score {k!r} of module {row['module']!r} is {v} (degenerate weights); refusing to rank it",
                adapter.path or "adapter",
            )


def scan_threads(threads: int | None = None) -> int:
    """CPU threads for scoring: ``threads`` if given, else $SAFEPRUNE_THREADS, else the cores this process
    may use, at most 8.

    On CPU, modules are scored *concurrently*, one module per thread, each with a single torch thread (see
    :func:`scan`). The per-module work is thin matmuls (memory-bound) and small QR/SVDs: an OpenMP team
    splitting each op waits at every barrier for its slowest thread, and on a loaded 2-core machine 2 torch
    threads were 5-50x slower than 1, while independent modules in independent threads have no barrier."""
    if threads is None:
        env = os.environ.get("SAFEPRUNE_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise UsageError(f"SAFEPRUNE_THREADS must be an integer, got {env!r}") from None
    if threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - non-Linux
            cores = os.cpu_count() or 1
        threads = min(8, max(1, cores))
    if threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _make_scorers(
    names: list[str], options: dict[str, dict[str, Any]] | None, method_options: dict[str, Any]
) -> list[Scorer]:
    options = {k: dict(v) for k, v in (options or {}).items()}
    if method_options:
        if len(names) != 1:
            raise UsageError("pass per-method options through options={method: {...}} when scoring several methods")
        options.setdefault(names[0], {}).update(method_options)
    unknown = set(options) - set(names)
    if unknown:
        raise UsageError(f"options given for methods not being run: {', '.join(sorted(unknown))}")
    return [get_scorer(n, **options.get(n, {})) for n in names]


def _modules_of_types(adapter: LoraAdapter, module_types: Iterable[str] | str | None) -> list[LoraModule]:
    types = parse_module_types(module_types)
    modules = [m for m in adapter if types is None or m.module_type in types]
    if not modules:
        raise UsageError(f"no LoRA module of type {', '.join(types or [])} in the adapter")
    return modules


def _needed_roles(scorers: list[Scorer], names: list[str], given: dict[str, Any]) -> list[str]:
    needed = sorted({role for s in scorers for role in s.requires})
    missing = [r for r in needed if given.get(r) is None]
    if missing:
        need = ", ".join(f"--{r}" for r in missing)
        raise UsageError(f"method(s) {', '.join(names)} need {need}")
    return needed


def _open_sources(
    stack: ExitStack, needed: list[str], given: dict[str, Any], modules: list[LoraModule]
) -> dict[str, WeightSource]:
    """Open each needed model (closed when ``stack`` ends unless the caller passed it open), then fail fast,
    from configs and headers alone: a pair is one architecture, every module's weight exists with the right
    shape, and the pair agrees tensor by tensor."""
    sources: dict[str, WeightSource] = {}
    for role in needed:
        src = open_weights(given[role])
        if not isinstance(given[role], WeightSource):
            stack.callback(src.close)
        sources[role] = src
    pair = "aligned" in sources and "unaligned" in sources
    if pair:
        check_pair(sources["aligned"], sources["unaligned"], modules, tensors=False)
    for role, src in sources.items():
        check_modules_present(src, modules, role)
    if pair:
        check_pair(sources["aligned"], sources["unaligned"], modules, config=False)
    return sources


def _method_info(s: Scorer) -> MethodInfo:
    return MethodInfo(
        name=s.name,
        primary=s.primary,
        descending=s.descending,
        columns=s.columns(),
        options=s.options(),
        description=s.description,
    )


Weights = dict[str, tuple[torch.Tensor, float]]


class _ModuleRunner:
    """Reads each module's weights once and runs every scorer on it, in order or several modules at once."""

    def __init__(self, scorers: list[Scorer], sources: dict[str, WeightSource], device: torch.device):
        self.scorers, self.sources, self.device = scorers, sources, device

    def fetch(self, m: LoraModule) -> tuple[Weights, float]:
        ts = time.perf_counter()
        # stored dtype (bf16 stays bf16): converting is left to the scorers that need float32; the
        # float64 norm computed here also proves the weight finite
        ws = {role: read_weight_and_norm(src, m, dtype=None, role=role) for role, src in self.sources.items()}
        return ws, time.perf_counter() - ts

    def score(self, m: LoraModule, ws: Weights | None) -> dict[str, Any]:
        """Every scorer on one module; ``ws`` are its prefetched weights (None: read on demand)."""
        ctx = ModuleContext(m, self.sources, self.device)
        for role, (w, n) in (ws or {}).items():
            ctx.prefetched(role, w, n)
        row = module_row(m)
        for s in self.scorers:
            row.update(s.score(ctx))
        ctx.release()
        return row

    def work(self, m: LoraModule) -> tuple[dict[str, Any], float]:
        ws, dt = self.fetch(m)
        return self.score(m, ws), dt

    def run_parallel(self, modules: list[LoraModule], window: int, stack: ExitStack, tick, advance):
        rows, read_s = [], 0.0
        pool = ThreadPoolExecutor(max_workers=window)
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        inflight: deque[Future] = deque(pool.submit(self.work, m) for m in modules[:window])
        for i, m in enumerate(modules):
            tick(m)
            row, dt = inflight.popleft().result()
            read_s += dt
            if i + window < len(modules):
                inflight.append(pool.submit(self.work, modules[i + window]))
            rows.append(row)
            advance()
        return rows, read_s

    def run_in_order(self, modules: list[LoraModule], prefetch: bool, stack: ExitStack, tick, advance):
        rows, read_s = [], 0.0
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1)) if prefetch else None
        pending: Future | None = pool.submit(self.fetch, modules[0]) if pool else None
        for i, m in enumerate(modules):
            tick(m)
            ws = None
            if pool is not None:
                ws, dt = pending.result()
                read_s += dt
                pending = pool.submit(self.fetch, modules[i + 1]) if i + 1 < len(modules) else None
            rows.append(self.score(m, ws))
            del ws
            advance()
        if pending is not None:  # pragma: no cover - only on early exit
            pending.cancel()
        return rows, read_s


def scan(
    adapter: LoraAdapter | str | Path,
    base: str | Path | WeightSource | None = None,
    methods: str | Sequence[str] = "ddi",
    *,
    aligned: str | Path | WeightSource | None = None,
    unaligned: str | Path | WeightSource | None = None,
    device: str | None = "cpu",
    module_types: Iterable[str] | str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
    prefetch: bool = True,
    threads: int | None = None,
    **method_options: Any,
) -> ScoreTable:
    """Score every LoRA module of ``adapter`` with each of ``methods``.

    ``threads``: CPU threads for scoring (default: see :func:`scan_threads`). When every scorer is
    ``concurrent``, that many modules are scored at once with one torch thread each; otherwise modules are
    scored in order with ``threads - 1`` torch threads and a reader thread. Torch's setting is restored.

    ``options`` maps a method name to its keyword options (e.g. ``{"ddi": {"subspace_dim": "2r"}}``);
    with a single method, its options can also be passed directly as keyword arguments.
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter)
    names = method_names(methods)
    scorers = _make_scorers(names, options, method_options)
    dev = resolve_device(device)
    modules = _modules_of_types(adapter, module_types)
    given = {"base": base, "aligned": aligned, "unaligned": unaligned}
    needed = _needed_roles(scorers, names, given)

    t0 = time.perf_counter()
    n_threads = scan_threads(threads) if dev.type == "cpu" else 1
    # CPU and every scorer safe to run on several modules at once: one module per thread, 1 torch thread
    # each, n_threads + 1 modules in flight (reads overlap other modules' compute; memory stays bounded by
    # the modules in flight, whatever the number of layers). Otherwise: modules in order, the next one's
    # weights read ahead by a reader thread.
    parallel = (
        dev.type == "cpu" and prefetch and n_threads > 1 and all(getattr(s, "concurrent", False) for s in scorers)
    )
    with ExitStack() as stack:
        if dev.type == "cpu":
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1 if parallel else max(1, n_threads - 1))
        sources = _open_sources(stack, needed, given, modules)
        runner = _ModuleRunner(scorers, sources, dev)
        prog = stack.enter_context(make_progress(progress))
        task = prog.add_task("scoring", total=len(modules), module="")

        def tick(m: LoraModule) -> None:
            prog.update(task, module=m.name)

        if parallel:
            rows, read_s = runner.run_parallel(modules, n_threads + 1, stack, tick, lambda: prog.advance(task))
        else:
            rows, read_s = runner.run_in_order(
                modules, prefetch and bool(sources), stack, tick, lambda: prog.advance(task)
            )

    for s in scorers:
        s.finalize(rows)
    nan_ok = frozenset().union(*(s.nan_allowed for s in scorers))
    for row in rows:
        _check_row_finite(row, adapter, nan_ok)
    seconds = time.perf_counter() - t0  # the scan itself: the adapter fingerprint below is not scoring time
    table = ScoreTable(
        rows=rows,
        methods={s.name: _method_info(s) for s in scorers},
        meta={
            "adapter": str(adapter.path) if adapter.path else None,
            "adapter_sha256": adapter_fingerprint(adapter.path) if adapter.path else None,
            **{role: str(getattr(src, "description", src)) for role, src in sources.items()},
            "device": str(dev),
            "threads": n_threads,
            "parallel_modules": parallel,
            "seconds": round(seconds, 4),
            "read_seconds": round(read_s, 4),
            "modules": len(rows),
        },
    )
    table.add_ranks()
    if len(table.methods) > 1:
        table.meta["agreement"] = rank_agreement(table)
    return table
