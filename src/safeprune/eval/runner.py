"""Cached generation: generate what the cache lacks, batch by batch, appending each batch as it ends."""

from __future__ import annotations

from typing import Callable, Sequence

from .backends import Backend, Generation, GenSettings
from .backends.base import CALL_ROWS
from .cache import GenerationCache, cache_key


def generate_cached(
    backend: Backend,
    cache: GenerationCache,
    prompts: Sequence[str],
    adapter: str | None,
    settings: GenSettings,
    label: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """One Generation per prompt; cached ones are read back (``cached=True``), the rest generated."""
    mh = backend.model_hash()
    ah = backend.adapter_hash(adapter)
    rendered = [backend.render(p, settings) for p in prompts]
    keys = [cache_key(backend.name, mh, ah, r, settings.key()) for r in rendered]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    # identical prompts are generated once
    uniq: dict[str, int] = {}
    for i in todo:
        uniq.setdefault(keys[i], i)
    todo = list(uniq.values())
    if settings.sort_by_length:
        # batches of similar length: less left padding (a batch costs its longest prompt × its size)
        todo.sort(key=lambda i: (len(rendered[i]), i))
    done = len(prompts) - len(todo)
    if progress:
        progress(done, len(prompts))

    def store(chunk: list[int], gens: list[Generation]) -> None:
        nonlocal done
        cache.add(
            {
                "key": keys[i],
                "variant": label,
                "adapter": adapter,
                "adapter_hash": ah,
                "model_hash": mh,
                "backend": backend.name,
                "settings": settings.key(),
                "prompt": prompts[i],
                **g.to_dict(),
            }
            for i, g in zip(chunk, gens)
        )
        done += len(chunk)
        if progress:
            progress(done, len(prompts))

    if todo and backend.schedules_itself(settings):
        # one call; the backend reports generations as they finish, and each is cached then
        backend.generate(
            [prompts[i] for i in todo], adapter, settings, on_batch=lambda js, gs: store([todo[j] for j in js], gs)
        )
    elif todo:
        bs = settings.batch_size if settings.batch_size > 0 else CALL_ROWS  # 0: automatic
        for s in range(0, len(todo), bs):  # one backend call per batch so each batch is cached at once
            chunk = todo[s : s + bs]
            store(chunk, backend.generate([prompts[i] for i in chunk], adapter, settings))
    fresh = set(todo)
    out = []
    fields = ("text", "new_tokens", "batch_seconds", "batch_size", "mean_nll", "mean_entropy", "finished")
    for i, k in enumerate(keys):
        rec = cache.get(k)
        g = Generation(**{f: rec.get(f) for f in fields}, stopped_early=bool(rec.get("stopped_early")))
        g.cached = i not in fresh
        out.append(g)
    return out


def generate_cached_sets(
    backend: Backend,
    cache: GenerationCache,
    jobs: Sequence[tuple[str, Sequence[str], GenSettings]],
    adapter: str | None,
    label: str = "",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, list[Generation]]:
    """:func:`generate_cached` for several prompt sets (``(name, prompts, settings)``) of one variant. Sets
    whose settings are equal go to a self-scheduling backend in one call (continuous batching: the prompts
    of the next set fill the slots the first set's finished rows free, instead of each set draining to a
    few rows at its end); otherwise, or alone, a set is generated on its own. The generations, their cache
    keys and records are the same either way (the key does not depend on batch composition)."""
    groups: dict[str, list[int]] = {}
    for j, (_, _, st) in enumerate(jobs):
        groups.setdefault(repr(st) if backend.schedules_itself(st) else f"{j}", []).append(j)
    out: dict[str, list[Generation]] = {}
    for members in groups.values():
        names = [jobs[j][0] for j in members]
        prompts = [p for j in members for p in jobs[j][1]]
        cb = (lambda d, n, _s=" + ".join(names): progress(_s, d, n)) if progress else None
        gens = generate_cached(backend, cache, prompts, adapter, jobs[members[0]][2], label=label, progress=cb)
        for j in members:
            out[jobs[j][0]], gens = gens[: len(jobs[j][1])], gens[len(jobs[j][1]) :]
    return out
