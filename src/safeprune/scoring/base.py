"""Scorer protocol, registry, option declarations and the per-module weight context.

A scoring method is one file in :mod:`safeprune.scoring.methods` holding one :class:`Scorer` subclass
decorated with :func:`register`. It declares, once, everything the rest of the tool needs to know:

* ``name``, ``requires`` (weight roles: base / aligned / unaligned), ``primary`` column and its order;
* ``parameters``: its options as :class:`Param` (name, type, default, help, validation, CLI flag), declared
  in :mod:`safeprune.scoring.params` (light: the CLI's help reads them without torch). The
  base ``__init__`` resolves and validates them; the CLI builds its flags from them
  (:mod:`safeprune.cli.options`), so no option is written twice;
* ``edit``: what acting on a selected module means for this method ("prune" or "project").
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch

from ..adapter import LoraModule
from ..errors import UsageError
from ..weights import WeightSource, checked_fro_norm, read_weight_and_norm
from .params import Param

REGISTRY: dict[str, type[Scorer]] = {}
EDITS = ("prune", "project")


def method_names(methods: str | Iterable[str]) -> list[str]:
    """``"ddi,splora"`` / ``["ddi"]`` / ``"all"`` -> registered method names, in order, without repeats."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    out: list[str] = []
    for m in methods:
        if m == "all":
            out += [k for k in REGISTRY if k not in out and not REGISTRY[k].__dict__.get("hidden", False)]
        elif m not in out:
            out.append(m)
    if not out:
        raise UsageError("no scoring method given")
    return out


def register(cls: type[Scorer]) -> type[Scorer]:
    REGISTRY[cls.name] = cls
    return cls


def get_scorer(name: str, **options: Any) -> Scorer:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown scoring method {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
    return cls(**options)


class ModuleContext:
    """Weights for one module, read at most once each and released when the module is done.

    ``roles`` maps a role name ("base", "aligned", "unaligned") to a WeightSource.
    """

    def __init__(self, module: LoraModule, sources: dict[str, WeightSource], device: str | torch.device = "cpu"):
        self.module = module
        self.sources = sources
        self.device = torch.device(device)
        self._raw: dict[str, torch.Tensor] = {}  # stored dtype (e.g. bfloat16), on self.device
        self._weights: dict[str, torch.Tensor] = {}  # float32 copies, made only when asked for
        self._norms: dict[str, float] = {}
        self._memo: dict[str, Any] = {}

    def source(self, role: str) -> WeightSource:
        src = self.sources.get(role)
        if src is None:
            raise UsageError(f"this method needs the {role} model (--{role})")
        return src

    def raw_weight(self, role: str = "base") -> torch.Tensor:
        """W in (out, in) orientation in the dtype it is stored in (bfloat16, float16, float32...), on the
        context's device. Read at most once per module."""
        w = self._raw.get(role)
        if w is None:
            w, n = read_weight_and_norm(self.source(role), self.module, dtype=None, role=role)
            self.prefetched(role, w, n)
            w = self._raw[role]
        return w

    def weight(self, role: str = "base") -> torch.Tensor:
        """W for this module in (out, in) orientation, float32 (or float64 if stored so), on the context's
        device. Converted from :meth:`raw_weight` on first use only."""
        w = self._weights.get(role)
        if w is None:
            w = self.raw_weight(role)
            if w.dtype not in (torch.float32, torch.float64):
                w = w.float()
            self._weights[role] = w
        return w

    def prefetched(self, role: str, w: torch.Tensor, norm: float | None = None) -> None:
        """Hand over a weight read ahead of time (any float dtype; moved to the context's device), with
        its ‖W‖_F when known (from :func:`read_weight_and_norm`, which also proved it finite)."""
        if w.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            w = w.float()
        self._raw[role] = w.to(self.device)
        if norm is not None:
            self._norms[role] = norm

    def norm(self, role: str = "base") -> float:
        """‖W‖_F (float64), raising NonFiniteError if W holds NaN/Inf. Computed from the stored dtype in
        float64 blocks, without a full-size float32 copy."""
        n = self._norms.get(role)
        if n is None:
            src = self.source(role)
            n = checked_fro_norm(
                self.raw_weight(role), f"{role} weight of module {self.module.name!r}", src.description
            )
            self._norms[role] = n
        return n

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) on the context's device in float32 or better."""
        m = self.module
        B = m.lora_B.to(self.device)
        A = m.lora_A.to(self.device)
        if B.dtype not in (torch.float32, torch.float64):
            B, A = B.float(), A.float()
        return B, A

    def memo(self, key: str, compute):
        """A per-module cache for quantities several scorers share (e.g. SafeLoRA's C·B)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def release(self) -> None:
        self._weights.clear()
        self._memo.clear()
        self._raw.clear()


class Scorer:
    """Base class. Subclasses set the class attributes, declare ``parameters`` and implement :meth:`score`
    (and :meth:`setup` for state derived from the options)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    primary: ClassVar[str] = ""
    descending: ClassVar[bool] = True  # True: highest value is pruned first
    # columns that are NaN by definition in a documented degenerate case (e.g. SafeLoRA's cosine when the
    # aligned and unaligned weights are identical); such a module is never selected. Any other NaN is an error.
    nan_allowed: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""
    # True if score() may run for different modules at the same time in several threads (no state shared
    # between modules, or shared state guarded); scan() then scores modules concurrently on CPU.
    concurrent: bool = False
    parameters: ClassVar[tuple[Param, ...]] = ()
    edit: ClassVar[str] = "prune"  # what acting on a selected module means: "prune" or "project"

    def __init__(self, **options: Any):
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UsageError(
                f"method {self.name!r} has no option {unknown[0]!r} (its options: {', '.join(known) or 'none'})"
            )
        for p in self.parameters:
            value = options.get(p.name, p.default)
            p.validate(value)
            setattr(self, p.name, value)
        self.setup()

    def setup(self) -> None:
        """Derived state, after the declared options are set and validated. Default: nothing."""

    def options(self) -> dict[str, Any]:
        return {}

    def columns(self) -> list[str]:
        raise NotImplementedError

    def score(self, ctx: ModuleContext) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, rows: list[dict[str, Any]]) -> None:
        """Hook for scores that need every module (e.g. pooled normalisation). Default: nothing."""
