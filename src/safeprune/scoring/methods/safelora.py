"""SafeLoRA (Hsu et al., NeurIPS 2024): cosine between a LoRA update and its "projection" onto the alignment
direction of an aligned/unaligned model pair (../shared/design/methods.md §2).

Per targeted module, with V = W_aligned − W_unaligned (out×in) and ΔW = s·B·A:

    C        = V Vᵀ / ‖V‖_F                      (out×out, never formed)
    C·B      = V (Vᵀ B) / ‖V‖_F                  (out×r, two passes over row blocks of V)
    cos      = ⟨C·ΔW, ΔW⟩_F / (‖C·ΔW‖_F ‖ΔW‖_F)
             = ⟨(CB)ᵀB, AAᵀ⟩ / sqrt(⟨(CB)ᵀCB, AAᵀ⟩ · ⟨BᵀB, AAᵀ⟩)       (r×r Grams, float64)

C is positive semi-definite, so cos ∈ [0, 1]; s and the 1/‖V‖_F factor cancel. A *low* cosine means the
update points away from the directions the alignment moved, so SafeLoRA acts on the lowest cosines first
(``descending = False``): ``--top K`` takes exactly the K lowest (ties broken by layer, then module path;
the official code rounds cos to 5 decimals and projects every module ≤ the K-th value, which can select
more than K), ``--threshold τ`` (paper default 0.5) takes every module with cos ≤ τ.

Extra columns: ``proj_ratio`` = ‖C·ΔW‖_F/‖ΔW‖_F (C is not a projector: it rescales as well as rotates;
this is by how much the projected update shrinks or grows) and ``v_fro`` = ‖V‖_F. A module whose pair
weights are identical (V = 0) has no alignment direction: its cos is NaN and it is never selected.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import InputError
from ...weights.pair import BLOCK_ELEMS, apply_alignment
from ..base import ModuleContext, Scorer, register
from ..params import PARAMETERS

F64 = torch.float64


def projected_B(ctx: ModuleContext, block_elems: int = BLOCK_ELEMS) -> tuple[torch.Tensor, float]:
    """(C·B in float64, ‖V‖_F) for the context's module, computed once and shared by SafeLoRA and SPLoRA."""

    def compute():
        B, _ = ctx.lora()
        where = f"{ctx.source('aligned').description} / {ctx.source('unaligned').description}"
        # the stored dtype (e.g. bf16) is enough: row blocks of V are formed in float64 from it, so no
        # full-size float32 copies of the two weights are made
        return apply_alignment(
            ctx.raw_weight("aligned"),
            ctx.raw_weight("unaligned"),
            B,
            block_elems=block_elems,
            what=f"alignment matrix of module {ctx.module.name!r}",
            where=where,
        )

    return ctx.memo("safelora.CB", compute)


def cosine_from_grams(B: torch.Tensor, CB: torch.Tensor, A: torch.Tensor) -> tuple[float, float]:
    """(cos(C·B·A, B·A), ‖C·B·A‖/‖B·A‖) from r×r Grams; NaN where undefined."""
    r = B.shape[1]
    S = torch.cat([B.to(F64), CB.to(F64)], dim=1)  # out × 2r: one Gram gives BᵀB, (CB)ᵀB and (CB)ᵀCB
    G = S.T @ S
    A64 = A.to(F64)
    GA = A64 @ A64.T
    xy = float((G[r:, :r] * GA).sum())
    xx = max(0.0, float((G[r:, r:] * GA).sum()))
    yy = max(0.0, float((G[:r, :r] * GA).sum()))
    if xx == 0.0 or yy == 0.0:
        return float("nan"), (math.sqrt(xx / yy) if yy > 0 else float("nan"))
    cos = xy / math.sqrt(xx * yy)
    return min(1.0, max(-1.0, cos)), math.sqrt(xx / yy)


@register
class SafeLoRAScorer(Scorer):
    name = "safelora"
    requires = ("aligned", "unaligned")
    primary = "cos"
    nan_allowed = frozenset({"cos", "proj_ratio"})  # V = 0 (pair identical on this weight) or ΔW = 0
    descending = False
    description = "SafeLoRA: cos(C·ΔW, ΔW) with C = VVᵀ/‖V‖_F, V = aligned − unaligned (low = act first)"

    edit = "project"
    parameters = PARAMETERS["safelora"]

    def setup(self) -> None:
        self.block_elems = int(self.block_elems)

    def options(self) -> dict[str, Any]:
        return {
            "projection": "C = V V^T / ||V||_F applied on the output side (lora_B <- C lora_B)",
            "cosine": "exact float64 (not rounded to 5 decimals)",
            "ties": "layer, then module path",
        }

    def columns(self) -> list[str]:
        return ["cos", "proj_ratio", "v_fro"]

    def score(self, ctx: ModuleContext) -> dict[str, float]:
        B, A = ctx.lora()
        CB, vfro = projected_B(ctx, self.block_elems)
        if vfro == 0.0:
            return {"cos": float("nan"), "proj_ratio": 0.0, "v_fro": 0.0}
        cos, ratio = cosine_from_grams(B, CB, A)
        return {"cos": cos, "proj_ratio": ratio, "v_fro": vfro}

    def finalize(self, rows: list[dict[str, Any]]) -> None:
        if rows and all(r.get("v_fro") == 0.0 for r in rows):
            raise InputError(
                "the aligned and unaligned weights are identical for every targeted module "
                "(V = 0): give the aligned model and its unaligned counterpart"
            )
