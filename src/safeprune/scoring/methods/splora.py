"""SPLoRA (Ao et al., TACL 2025; ../shared/papers/000_7f5fb7c589c268c0.txt): E-DIEM between a LoRA update and
its SafeLoRA projection, and pruning of the modules it marks as least aligned (../shared/design/methods.md §3).

DIEM (Tessari, Yao & Hogan 2024) measures a Euclidean distance against what chance would give:
``DIEM(a, b) = (v_M − v_m)·(‖a − b‖ − c)/σ²`` with c and σ² the median and variance of the distance
between random vectors. E-DIEM replaces the chance distribution by an empirical *reference set* and the
variance by the inter-quartile range. SPLoRA compares X = C·ΔW (the SafeLoRA projection, C = VVᵀ/‖V‖_F,
V = W_aligned − W_unaligned) with Y = ΔW. Two modes:

``mode="sound"`` (default)
    ΔW = s·B·A (PEFT's delta, scaling included) and d = ‖CΔW − ΔW‖_F = s·‖(CB − B)A‖_F from r×r Grams.
    The reference distribution is a *per-module null*: the same distance for ``null_samples`` updates
    ΔW̃ = Q·ΔW with Q a Haar-random rotation of the output space, i.e. updates with exactly ΔW's spectrum
    but random output directions. Only Q·B is needed, and Q·B = F·R_B with B = Q_B·R_B (thin QR) and F a
    Haar-random out×r orthonormal frame (QR of a Gaussian matrix with the sign fix), so the null costs one
    pass of C over an out×(r·n) matrix and never an out×out matrix. (Rotating the input side is not needed:
    d depends on A only through AAᵀ.) The frames are drawn from a seed that depends only on
    (seed, out, r, n), so all modules of a shape share them (common random numbers: differences between
    modules are not noise from different draws).

        E-DIEM = (d − median(null)) / (IQR(null) + ε),   ε = 1e-12·median + 1e-300

    E-DIEM > 0: the projection moves ΔW *more* than it moves a random update of the same spectrum, i.e. ΔW
    lies outside the directions alignment changed — least aligned — so the highest values are pruned first
    (``descending=True``); ``--top K`` prunes exactly K (default 10, ties by layer then module path).
    Caveat (methods.md §2.3): C is not a projector; its eigenvalues σᵢ(V)²/‖V‖_F can exceed 1, so on
    directions where they do, an aligned update is amplified rather than kept. The null is computed with the
    same C, so the score stays relative to what C does to a random update.

``mode="official"`` / ``mode="official-first"``
    What the public SPLoRA code computes (splora.py @ cf817f6 / 74d6873 with similarity.py @ 667cbec),
    reproduced for comparison with published numbers, in float32 like the original:

        X = (C·B)·A, Y = B·A                            (unscaled: s is not applied)
        d = ‖X − Y‖_F + 1e-6
        reference set = 50 copies of (X, Y)  ⇒  E = mean(50 × ‖X − Y‖), IQR = 0, scale = 0 + 1e-6
        v_M = Q3(X) − Q1(X),  v_m = Q1(X) − Q1(Y)         (torch.quantile "linear" semantics)
        E-DIEM = (((d − E)/scale − v_m)/(v_M − v_m))·(v_M − v_m)
        NaN ("None" in the original) when X == Y exactly or v_M == v_m

    Because the reference set is degenerate, (d − E)/scale is float32 rounding of d divided by 1e-6 (about
    1 for d < 16, about 1.9 for 16 ≤ d < 32, 0 above; column ``ediem_core``); the ranking is driven by
    that artefact and the quantile offset −v_m. C·B is computed here as V(VᵀB)/‖V‖_F rounded to float32,
    not as the original's dense float32 C@B, so the artefact term can differ from the original by a few
    float32 ulps of d / 1e-6. Entry quantiles are computed with ``torch.kthvalue`` and torch.quantile's
    interpolation (bit-identical to torch.quantile up to 2^24 entries, where torch.quantile itself stops;
    above it, float64 ranks); this mode holds X and Y densely, O(out·in) per module — never out×out.

    Selection follows the original: low E-DIEM is pruned first (``descending=False``).
    ``official`` is the current HEAD rule: the threshold is the K-th *largest* score and every module at
    or below it is pruned, i.e. all but the K−1 highest (L − K + 1 of L modules; ``top_rule="complement"``
    in the options, applied by :func:`safeprune.selection.select`). ``official-first`` is the first
    commit's rule: prune the K lowest. ``--threshold τ`` prunes every module with E-DIEM ≤ τ in both.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import InputError
from ...weights.pair import BLOCK_ELEMS, apply_alignment
from ..base import ModuleContext, Scorer, register
from ..linalg import stable_seed
from ..params import PARAMETERS, SPLORA_MODES
from .safelora import projected_B

F64 = torch.float64
MODES = SPLORA_MODES
OFFICIAL_EPS = 1e-6
OFFICIAL_COPIES = 50
TORCH_QUANTILE_LIMIT = 1 << 24


def quantile_linear(t: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(t, q) ("linear") for any size, via torch.kthvalue (no 2^24-entry limit).

    Up to 2^24 entries the arithmetic is torch.quantile's own (ranks q·(n−1) in t's dtype, truncation,
    lerp), so the result is bit-identical; above, ranks are computed in float64.
    """
    flat = t.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if n <= TORCH_QUANTILE_LIMIT:
        ranks = torch.scalar_tensor(q, dtype=flat.dtype) * (n - 1)
    else:
        ranks = torch.scalar_tensor(q * (n - 1), dtype=F64)
    lo = int(ranks.to(torch.int64))
    hi = int(torch.ceil(ranks).to(torch.int64))
    w = (ranks - lo).to(flat.dtype)
    v_lo = torch.kthvalue(flat, lo + 1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(flat, hi + 1).values
    return torch.lerp(v_lo, v_hi, w)


class FrameCache:
    """Haar-random out×r orthonormal frames, n per (out, r), seeded by (seed, out, r, n) only."""

    def __init__(self, seed: int = 0, max_entries: int = 8):
        self.seed = seed
        self.max_entries = max_entries
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, out: int, r: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor (n, out, r), float64."""
        key = (out, r, n, str(device))
        F = self._cache.get(key)
        if F is None:
            g = torch.Generator(device="cpu").manual_seed(stable_seed("splora-null", self.seed, out, r, n))
            G = torch.randn(n, out, r, generator=g, dtype=F64)
            Q, R = torch.linalg.qr(G, mode="reduced")
            sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
            sign[sign == 0] = 1.0
            F = (Q * sign.unsqueeze(-2)).to(device)
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = F
        return F


def null_distances(CZ: torch.Tensor, Z: torch.Tensor, A: torch.Tensor, n: int, r: int, s: float) -> torch.Tensor:
    """s·‖(C·Z_k − Z_k)·A‖_F for each of the n column blocks Z_k (out×r) of Z, from r×r Grams (float64)."""
    D = (CZ - Z).reshape(Z.shape[0], n, r)  # column block k = columns k*r .. k*r+r-1
    grams = torch.einsum("oni,onj->nij", D, D)  # n × r × r
    A64 = A.to(F64)
    GA = A64 @ A64.T
    sq = (grams * GA).sum(dim=(1, 2)).clamp_min(0.0)
    return s * sq.sqrt()


def sound_ediem(
    Wa: torch.Tensor,
    Wu: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    s: float,
    frames: FrameCache,
    null_samples: int,
    *,
    CB: torch.Tensor | None = None,
    vfro: float | None = None,
    block_elems: int = BLOCK_ELEMS,
) -> dict[str, float]:
    """Sound-mode E-DIEM of ΔW = s·B·A against its Haar-rotation null (see the module docstring)."""
    nan = float("nan")
    B64 = B.to(F64)
    if CB is None or vfro is None:
        CB, vfro = apply_alignment(Wa, Wu, B64, block_elems=block_elems)
    out, r = B64.shape
    d, delta = null_distances(torch.cat([CB, torch.zeros_like(B64)], 1), torch.cat([B64, B64], 1), A, 2, r, s)
    d, delta = float(d), float(delta)  # ‖CΔW − ΔW‖_F and ‖ΔW‖_F
    if vfro == 0.0 or delta == 0.0:
        return {"ediem": nan, "ediem_dist": d, "ediem_dist_rel": nan, "ediem_null_median": nan, "ediem_null_iqr": nan}
    n = null_samples
    _, RB = torch.linalg.qr(B64, mode="reduced")  # min(out, r) × r
    F = frames.get(out, RB.shape[0], n, B64.device)  # n × out × min(out, r)
    Z = (F @ RB).permute(1, 0, 2).reshape(out, n * r)  # out × (n·r), block k = F_k R_B
    CZ, _ = apply_alignment(Wa, Wu, Z, block_elems=block_elems)
    null = null_distances(CZ, Z, A, n, r, s)
    del Z, CZ
    med = float(torch.quantile(null, 0.5))
    iqr = float(torch.quantile(null, 0.75) - torch.quantile(null, 0.25))
    eps = 1e-12 * abs(med) + 1e-300
    return {
        "ediem": (d - med) / (iqr + eps),
        "ediem_dist": d,
        "ediem_dist_rel": d / delta,
        "ediem_null_median": med,
        "ediem_null_iqr": iqr,
    }


@register
class SPLoRAScorer(Scorer):
    name = "splora"
    requires = ("aligned", "unaligned")
    primary = "ediem"
    # undefined when V = 0 or ΔW = 0 (the official code returns None there); such modules are never selected
    nan_allowed = frozenset(
        {"ediem", "ediem_dist_rel", "ediem_null_median", "ediem_null_iqr", "ediem_core", "ediem_vM", "ediem_vm"}
    )
    descending = True  # sound mode; the official modes set False on the instance
    description = "SPLoRA: E-DIEM between C·ΔW and ΔW (sound: Haar-rotation null; official: public code)"

    parameters = PARAMETERS["splora"]

    def setup(self) -> None:
        self.null_samples = int(self.null_samples)
        self.seed = int(self.seed)
        self.block_elems = int(self.block_elems)
        self.descending = self.mode == "sound"
        self._frames = FrameCache(seed=self.seed)

    def options(self) -> dict[str, Any]:
        if self.mode == "sound":
            return {
                "mode": "sound",
                "delta": "s*B*A",
                "null": "Haar rotations of the output space",
                "null_samples": self.null_samples,
                "center": "median",
                "spread": "IQR",
                "seed": self.seed,
                "prune": "highest E-DIEM first",
            }
        opts = {
            "mode": self.mode,
            "delta": "B*A (unscaled)",
            "reference_set": "50 copies of (X, Y)",
            "eps": OFFICIAL_EPS,
            "dtype": "float32",
            "prune": "lowest E-DIEM first",
        }
        if self.mode == "official":
            opts["top_rule"] = "complement"  # HEAD: prune all but the K-1 highest
        return opts

    def columns(self) -> list[str]:
        if self.mode == "sound":
            return ["ediem", "ediem_dist", "ediem_dist_rel", "ediem_null_median", "ediem_null_iqr", "v_fro"]
        return ["ediem", "ediem_dist", "ediem_core", "ediem_vM", "ediem_vm", "v_fro"]

    # -- sound --------------------------------------------------------------------------------------
    def _score_sound(self, ctx: ModuleContext) -> dict[str, float]:
        m = ctx.module
        B, A = ctx.lora()
        CB, vfro = projected_B(ctx, self.block_elems)
        res = sound_ediem(
            ctx.weight("aligned"),
            ctx.weight("unaligned"),
            B,
            A,
            float(m.scaling),
            self._frames,
            self.null_samples,
            CB=CB,
            vfro=vfro,
            block_elems=self.block_elems,
        )
        res["v_fro"] = vfro
        return res

    # -- official -----------------------------------------------------------------------------------
    def _score_official(self, ctx: ModuleContext) -> dict[str, float]:
        B, A = ctx.lora()
        CB, vfro = projected_B(ctx, self.block_elems)
        f32 = torch.float32
        B32, A32 = B.to(f32), A.to(f32)
        X = CB.to(f32) @ A32  # fW = (C·B)·A, unscaled
        Y = B32 @ A32  # ori = B·A
        nan = float("nan")
        if torch.equal(X, Y):
            return {"ediem": nan, "ediem_dist": 0.0, "ediem_core": nan, "ediem_vM": nan, "ediem_vm": nan, "v_fro": vfro}
        d0 = torch.linalg.norm(X - Y)  # float32 Frobenius norm
        d = d0 + OFFICIAL_EPS
        distances = d0.reshape(1).repeat(OFFICIAL_COPIES)  # the 50 identical reference distances
        expected = torch.mean(distances)
        scale = quantile_linear(distances, 0.75) - quantile_linear(distances, 0.25) + OFFICIAL_EPS
        x_q1, x_q3 = quantile_linear(X, 0.25), quantile_linear(X, 0.75)
        y_q1 = quantile_linear(Y, 0.25)
        del X, Y
        v_M = x_q3 - x_q1
        v_m = x_q1 - y_q1
        core = (d - expected) / scale
        if bool(v_M - v_m == 0):
            ediem = nan
        else:
            ediem = float(((core - v_m) / (v_M - v_m)) * (v_M - v_m))
        return {
            "ediem": ediem,
            "ediem_dist": float(d0),
            "ediem_core": float(core),
            "ediem_vM": float(v_M),
            "ediem_vm": float(v_m),
            "v_fro": vfro,
        }

    def score(self, ctx: ModuleContext) -> dict[str, float]:
        return self._score_sound(ctx) if self.mode == "sound" else self._score_official(ctx)

    def finalize(self, rows: list[dict[str, Any]]) -> None:
        if rows and all(r.get("v_fro") == 0.0 for r in rows):
            raise InputError(
                "the aligned and unaligned weights are identical for every targeted module "
                "(V = 0): give the aligned model and its unaligned counterpart"
            )
