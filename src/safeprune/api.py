"""The Python API. The CLI (:mod:`safeprune.cli`) is a thin layer over these functions.

    import safeprune
    adapter = safeprune.load_adapter("my_adapter")
    table = safeprune.scan(adapter, base="path/to/base")          # per-module DDI records
    pruned = safeprune.prune(adapter, base="path/to/base", top=10)  # edited adapter (+ manifest)
    pruned.save("my_adapter-pruned")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .adapter import LoraAdapter, load_adapter
from .edits import prune_modules
from .manifest import build_manifest
from .scan import scan
from .selection import Selection, select
from .sources import WeightSource
from .table import ScoreTable


def _as_adapter(adapter: LoraAdapter | str | Path, allow_pickle: bool = False) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter, allow_pickle=allow_pickle)


def prune(
    adapter: LoraAdapter | str | Path,
    base: str | Path | WeightSource | None = None,
    *,
    method: str = "ddi",
    table: ScoreTable | None = None,
    top: int | None = None,
    threshold: float | None = None,
    threshold_norm: float | None = None,
    auto: str | None = None,
    mad_k: float = 3.0,
    module_types: Iterable[str] | str | None = None,
    mode: str = "remove",
    aligned: str | Path | WeightSource | None = None,
    unaligned: str | Path | WeightSource | None = None,
    device: str | None = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
    **method_options: Any,
) -> LoraAdapter:
    """Score (unless ``table`` is given), select and prune; return the edited adapter.

    The result carries ``.scores`` (the ScoreTable), ``.selection`` and ``.manifest`` (written as
    ``safeprune.json`` by :meth:`LoraAdapter.save`).
    """
    adapter = _as_adapter(adapter)
    if table is None:
        table = scan(adapter, base, method, aligned=aligned, unaligned=unaligned, device=device,
                     options=options, progress=progress, **method_options)
    selection = select(table, method, top=top, threshold=threshold, threshold_norm=threshold_norm,
                       module_types=module_types, auto=auto, mad_k=mad_k)
    edited = prune_modules(adapter, selection.selected, mode=mode)
    edited.manifest = build_manifest(
        action="prune", original=adapter, edited=edited, table=table, selection=selection,
        edit={"mode": mode, "modules": selection.selected},
        sources={"base": base, "aligned": aligned, "unaligned": unaligned},
    )
    edited.scores = table
    edited.selection = selection
    return edited


__all__ = ["load_adapter", "scan", "select", "prune", "prune_modules", "ScoreTable", "Selection", "LoraAdapter"]


def project(
    adapter: LoraAdapter | str | Path,
    aligned: str | Path | WeightSource | None = None,
    unaligned: str | Path | WeightSource | None = None,
    *,
    method: str = "safelora",
    table: ScoreTable | None = None,
    top: int | None = None,
    threshold: float | None = None,
    auto: str | None = None,
    mad_k: float = 3.0,
    module_types: Iterable[str] | str | None = None,
    device: str | None = "cpu",
    progress: bool = False,
    **method_options: Any,
) -> LoraAdapter:
    """SafeLoRA: score, select (``top`` K lowest cosines, default 10, or ``threshold`` cos ≤ τ) and replace
    each selected module's lora_B by C·lora_B (C = VVᵀ/‖V‖_F, V = aligned − unaligned); return the edited
    adapter with ``.scores``, ``.selection`` and ``.manifest`` (``action="project"``)."""
    from .errors import UsageError
    from .projection import project_modules

    if method != "safelora":
        raise UsageError(f"project applies SafeLoRA's projection and ranks with --method safelora, not {method!r} "
                         "(use `safeprune prune` for splora/ddi)")
    if aligned is None or unaligned is None:
        raise UsageError("project needs --aligned and --unaligned")
    adapter = _as_adapter(adapter)
    if table is None:
        table = scan(adapter, None, method, aligned=aligned, unaligned=unaligned, device=device,
                     progress=progress, **method_options)
    selection = select(table, method, top=top, threshold=threshold, module_types=module_types, auto=auto,
                       mad_k=mad_k)
    edited, info = project_modules(adapter, selection.selected, aligned, unaligned, device=device)
    edited.manifest = build_manifest(
        action="project", original=adapter, edited=edited, table=table, selection=selection,
        edit={"method": "safelora", "modules": selection.selected, **info},
        sources={"aligned": aligned, "unaligned": unaligned},
    )
    edited.scores = table
    edited.selection = selection
    return edited


__all__ += ["project"]
