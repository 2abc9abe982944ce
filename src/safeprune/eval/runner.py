"""Cached generation: generate what the cache lacks, batch by batch, appending each batch as it ends."""

from __future__ import annotations

from typing import Callable, Sequence

from .backends import Backend, Generation, GenSettings
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
        bs = max(1, settings.batch_size)
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
