"""The one score → select → edit → manifest path behind :func:`safeprune.prune` and
:func:`safeprune.project`. The two differ only in the edit applied to the selected modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..adapter import LoraAdapter, load_adapter
from ..errors import InputError, UsageError
from ..scoring import REGISTRY, ScoreTable, scan
from ..selection import select
from ..weights import WeightSource, looks_like_hub_id, resolve_model
from .manifest import build_manifest
from .project import project_modules
from .prune import prune_modules


def as_adapter(adapter: LoraAdapter | str | Path, allow_pickle: bool = False) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter, allow_pickle=allow_pickle)


def default_edit(method: str) -> str:
    """The edit a scoring method declares for its selected modules ("prune" or "project")."""
    cls = REGISTRY.get(method)
    return cls.edit if cls is not None else "prune"


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
    adapter = as_adapter(adapter)

    def apply(selected: list[str]) -> tuple[LoraAdapter, dict[str, Any]]:
        return prune_modules(adapter, selected, mode=mode), {"mode": mode, "modules": selected}

    return _edit(
        adapter,
        "prune",
        apply,
        method=method,
        table=table,
        base=base,
        aligned=aligned,
        unaligned=unaligned,
        device=device,
        options=options,
        progress=progress,
        method_options=method_options,
        sources={"base": base, "aligned": aligned, "unaligned": unaligned},
        select_args=dict(
            top=top,
            threshold=threshold,
            threshold_norm=threshold_norm,
            module_types=module_types,
            auto=auto,
            mad_k=mad_k,
        ),
    )


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
    if default_edit(method) != "project":
        raise UsageError(
            f"project applies SafeLoRA's projection and ranks with --method safelora, not {method!r} "
            "(use `safeprune prune` for splora/ddi)"
        )
    if aligned is None or unaligned is None:
        raise UsageError("project needs --aligned and --unaligned")
    adapter = as_adapter(adapter)

    def apply(selected: list[str]) -> tuple[LoraAdapter, dict[str, Any]]:
        edited, info = project_modules(adapter, selected, aligned, unaligned, device=device)
        return edited, {"method": method, "modules": selected, **info}

    return _edit(
        adapter,
        "project",
        apply,
        method=method,
        table=table,
        base=None,
        aligned=aligned,
        unaligned=unaligned,
        device=device,
        options=None,
        progress=progress,
        method_options=method_options,
        sources={"aligned": aligned, "unaligned": unaligned},
        select_args=dict(top=top, threshold=threshold, module_types=module_types, auto=auto, mad_k=mad_k),
    )


def _runs_here(spec: Any) -> bool:
    """Whether transformers' ``from_pretrained(spec)`` (what PEFT's AutoPeftModel calls) loads ``spec`` here."""
    try:
        return resolve_model(str(spec)).gguf_file is None
    except (InputError, OSError, ValueError):
        return False


def loadable_base(config: dict[str, Any], base: Any) -> dict[str, Any] | None:
    """Point the edited adapter's ``base_model_name_or_path`` at the base the user gave when the one it names
    cannot be loaded here (a path from another machine, a folder holding only a GGUF) and the user's base can
    (an HF directory, or a hub id). A hub id in the config is kept: it loads anywhere. Returns the change, for
    the manifest, or None."""
    cur = config.get("base_model_name_or_path")
    if base is None or isinstance(base, WeightSource) or (isinstance(cur, str) and looks_like_hub_id(cur)):
        return None
    if isinstance(cur, str) and _runs_here(cur):
        return None
    spec = str(base)
    if not _runs_here(spec):
        return None
    ref = resolve_model(spec)
    new = spec if looks_like_hub_id(spec) and not Path(spec).exists() else str(ref.directory.resolve())
    config["base_model_name_or_path"] = new
    return {"before": cur, "after": new}


def _edit(
    adapter: LoraAdapter,
    action: str,
    apply,
    *,
    method: str,
    table: ScoreTable | None,
    base,
    aligned,
    unaligned,
    device,
    options,
    progress: bool,
    method_options: dict[str, Any],
    sources: dict[str, Any],
    select_args: dict[str, Any],
) -> LoraAdapter:
    if table is None:
        table = scan(
            adapter,
            base,
            method,
            aligned=aligned,
            unaligned=unaligned,
            device=device,
            options=options,
            progress=progress,
            **method_options,
        )
    selection = select(table, method, **select_args)
    edited, edit = apply(selection.selected)
    moved = loadable_base(edited.config, base)
    if moved:
        edit = {**edit, "base_model_name_or_path": moved}
    edited.manifest = build_manifest(
        action=action, original=adapter, edited=edited, table=table, selection=selection, edit=edit, sources=sources
    )
    edited.scores = table
    edited.selection = selection
    return edited
