"""Edits finer than a whole module (issue 13): a LoRA module's update ΔW = s·B·A is a sum of r rank-1
components, and a repair may remove, scale or project some of them while keeping the rest.

* :func:`orthogonalise` rewrites each module's factors so that its components are the singular directions
  of ΔW (B' = Q_B·U·√Σ/√s, A' = √Σ/√s·Vᵀ·Q_Aᵀ from thin QRs of B and Aᵀ and the r×r SVD of s·R_B·R_Aᵀ; no
  d×d or dense ΔW is formed). ΔW is unchanged; component i is σ_i·u_i·v_iᵀ, so the components are separable
  (removing one does not change the others) and ordered by their energy σ_i².
* :func:`gate_components` multiplies component i of a module by a gate g_i ∈ [0, 1] (0 removes it): the gate
  goes into lora_B's column i, so the adapter keeps its rank r and layout (vLLM serves one global r).
* :func:`project_out` removes from a module's output its part along given unit directions:
  B ← (I − R·Rᵀ)·B for an orthonormal R (out × k), e.g. the model's refusal direction for the modules that
  write to the residual stream (o_proj, down_proj); a lora_B bias is projected too.

Every edit returns a new adapter in PEFT conventions (same tensor names, shapes and rank), float32 maths,
stored back in the factors' dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Mapping, Sequence

import torch

from ..adapter import LoraAdapter, LoraModule
from ..errors import UsageError

F32 = torch.float32


def _factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    B, A = m.lora_B.to(F32), m.lora_A.to(F32)
    if not (B.dtype.is_floating_point and A.dtype.is_floating_point):
        raise UsageError(f"module {m.name!r}: LoRA factors must be floating point")
    return B, A


def component_svd(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, V) with ΔW = U·diag(σ)·Vᵀ, U: out×r, V: in×r orthonormal, σ descending (float64 maths on the
    thin factors: QR of B and Aᵀ, then the r×r SVD)."""
    B, A = m.lora_B.to(torch.float64), m.lora_A.to(torch.float64)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(m.scaling * (Rb @ Ra.T))
    return Qb @ U, S, Qa @ Vh.T


def _orthogonal_module(m: LoraModule) -> LoraModule:
    U, S, V = component_svd(m)
    if m.scaling == 0:  # ΔW = 0 whatever the factors: keep them as they are
        return m
    # s·B'·A' = s·sign(s)·U·(S/|s|)·Vᵀ = U·S·Vᵀ = ΔW, with the scale split evenly between the factors
    root = torch.sqrt(S / abs(m.scaling))
    B = math.copysign(1.0, m.scaling) * (U * root)
    A = root[:, None] * V.T
    return replace(m, lora_B=B.to(m.lora_B.dtype).contiguous(), lora_A=A.to(m.lora_A.dtype).contiguous())


def orthogonalise(adapter: LoraAdapter, names: Sequence[str] | None = None) -> LoraAdapter:
    """Rewrite the factors of ``names`` (default: every module) so that component i = i-th singular
    direction of ΔW; ΔW itself is unchanged (up to float rounding in the stored dtype)."""
    if names is not None:
        _known(adapter, names)
    todo = set(adapter.modules if names is None else names)
    modules = {n: (_orthogonal_module(m) if n in todo else m) for n, m in adapter.modules.items()}
    return adapter.with_modules(modules, config=copy.deepcopy(adapter.config), manifest=None)


def gate_components(adapter: LoraAdapter, gates: Mapping[str, Sequence[float] | torch.Tensor]) -> LoraAdapter:
    """Scale component i of each listed module by ``gates[module][i]`` ∈ [0, 1] (0 = remove). The gate
    multiplies lora_B's column i (and leaves a lora_B bias alone: it is not a component)."""
    _known(adapter, gates)
    modules = {}
    for n, m in adapter.modules.items():
        if n in gates:
            g = torch.as_tensor(gates[n], dtype=F32).flatten()
            if g.numel() != m.r:
                raise UsageError(f"module {n!r} has {m.r} components, got {g.numel()} gates")
            if not bool(torch.isfinite(g).all()) or bool((g < 0).any()) or bool((g > 1).any()):
                raise UsageError(f"gates of module {n!r} must lie in [0, 1]")
            m = replace(m, lora_B=(m.lora_B.to(F32) * g).to(m.lora_B.dtype).contiguous())
        modules[n] = m
    return adapter.with_modules(modules, config=copy.deepcopy(adapter.config), manifest=None)


def remove_components(adapter: LoraAdapter, components: Mapping[str, Sequence[int]]) -> LoraAdapter:
    """Remove the listed component indices of each module (gate 0), keeping the rank and layout."""
    gates = {}
    _known(adapter, components)
    for n, idx in components.items():
        r = adapter.modules[n].r
        bad = [i for i in idx if not 0 <= int(i) < r]
        if bad:
            raise UsageError(f"module {n!r} has components 0..{r - 1}, not {bad[0]}")
        g = torch.ones(r)
        g[list(map(int, idx))] = 0.0
        gates[n] = g
    return gate_components(adapter, gates)


def project_out(adapter: LoraAdapter, directions: Mapping[str, torch.Tensor], eps: float = 1e-12) -> LoraAdapter:
    """B ← (I − R·Rᵀ)·B for each listed module, R = an orthonormal basis (QR) of the given direction(s)
    (out, or out × k); a lora_B bias b ← (I − R·Rᵀ)·b. The module's output loses exactly its part along R."""
    _known(adapter, directions)
    modules = {}
    for n, m in adapter.modules.items():
        if n in directions:
            D = torch.as_tensor(directions[n], dtype=torch.float64)
            D = D[:, None] if D.dim() == 1 else D
            if D.shape[0] != m.out_features:
                raise UsageError(f"direction for {n!r} has {D.shape[0]} entries, the module writes {m.out_features}")
            if not bool(torch.isfinite(D).all()) or float(D.norm()) <= eps:
                raise UsageError(f"direction for {n!r} must be finite and non-zero")
            R, _ = torch.linalg.qr(D)
            B = m.lora_B.to(torch.float64)
            B = B - R @ (R.T @ B)
            bias = m.lora_B_bias
            if bias is not None:
                b = bias.to(torch.float64)
                bias = (b - R @ (R.T @ b)).to(m.lora_B_bias.dtype).contiguous()
            m = replace(m, lora_B=B.to(m.lora_B.dtype).contiguous(), lora_B_bias=bias)
        modules[n] = m
    return adapter.with_modules(modules, config=copy.deepcopy(adapter.config), manifest=None)


def component_energy(m: LoraModule) -> torch.Tensor:
    """σ_i² of each component after :func:`orthogonalise` (the share of ‖ΔW‖_F² each carries)."""
    return component_svd(m)[1] ** 2


def _known(adapter: LoraAdapter, names) -> None:
    missing = [n for n in names if n not in adapter.modules]
    if missing:
        raise UsageError(f"not LoRA modules of this adapter: {', '.join(map(str, missing[:5]))}")


__all__ = ["orthogonalise", "gate_components", "remove_components", "project_out", "component_svd", "component_energy"]
