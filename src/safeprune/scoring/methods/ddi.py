"""Directional Deviation Index (Ao & Ramchurn, DDI pruning; ../shared/papers/002_b15fbfce5e672a47.txt).

For ΔW = s·B·A (out×in) and the frozen base weight W0:

    S        = λmax(G) / (tr G + ε),  G = ΔWᵀΔW                   spectral sharpness, in [0, 1]
    O        = 1 − ‖P_t ΔW‖_F² / (‖ΔW‖_F² + ε)                     energy outside W0's dominant subspace
    M        = ‖ΔW‖_F / (‖W0‖_F + ε),  M_norm = M / (1 + M)        relative magnitude
    DDI      = S · O · M_norm   (or · M with magnitude="raw")
    DDI_norm = DDI / (1 + DDI)

Sound readings of the paper's ambiguities (../shared/design/methods.md §4), all switchable:

* ``subspace="column"`` (default): P_t projects onto the dominant *column* space of W0 (Y = W0·Ω, left
  multiplication), the only reading consistent with the paper's formula for O and its pseudo-code.
  ``subspace="row"`` uses the right singular space (ΔW·V_t V_tᵀ), as the paper's wording suggests.
* t = r of *this* module (``rank_pattern``-aware); ``subspace_dim="2r"`` or an integer overrides it.
* The range finder keeps exactly t vectors after the small SVD (HMT Alg. 5.1) with ``power_iters``
  re-orthonormalised subspace iterations (default 2; LLM weight spectra decay slowly and without power
  iterations the basis overlaps the true one poorly). Ω is seeded per (seed, in_features, t+oversample).
* ``reuse_subspace=True`` is the paper's "cache Q per layer shape": every module of the same type and
  shape is scored against the subspace of the *first* such module. That measures overlap with another
  layer's geometry, so it is off by default and exists only to reproduce the paper.
* ``exact_subspace=True`` replaces the range finder by a full SVD of W0 (the dense reference; O(m·n·min(m,n))
  per module, fine for small models, slow at 7B). On trained weights the t-th and (t+1)-th singular values
  are often nearly equal (SmolLM2 testbed: σ₈/σ₉ has minimum 1.001 and median 1.014), so the top-t subspace itself is
  ill-conditioned and the randomized O can differ from the exact one by a few hundredths while the ranking
  barely moves (testbed: identical top-10, Kendall τ 0.98; see docs/methods.md).
* Speed: W0 is read once in its stored dtype; a bfloat16 W0 is multiplied as bf16 (float32 accumulation)
  on GPUs and on CPUs with native bf16 matmuls, float32 otherwise (``matmul_dtype="float32"`` forces it);
  ‖W0‖_F is accumulated in float64 blocks. No full-size float32 copy of W0 is made on that path.
* ε: by default relative (``1e-12·tr G``), so that tiny updates are not dominated by the regulariser;
  ``eps=1e-6`` gives the paper's absolute constant.
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import UsageError
from ..base import ModuleContext, Scorer, register
from ..linalg import (
    OmegaCache,
    exact_left_basis,
    left_projected_energy,
    lowrank_svals,
    matmul_weight,
    range_finder,
    right_projected_energy,
)
from ..params import PARAMETERS

_TINY = 1e-300


def parse_subspace_dim(value: str | int | None) -> tuple[float, int | None]:
    """ "r" -> (1, None); "2r" -> (2, None); 16 -> (0, 16)."""
    if value is None:
        return 1.0, None
    if isinstance(value, int):
        if value <= 0:
            raise UsageError(f"--subspace-dim must be positive, got {value}")
        return 0.0, value
    v = str(value).strip().lower()
    if v.endswith("r"):
        mult = v[:-1] or "1"
        try:
            f = float(mult)
        except ValueError:
            raise UsageError(f"--subspace-dim must look like 'r', '2r' or an integer, got {value!r}") from None
        if f <= 0:
            raise UsageError(f"--subspace-dim must be positive, got {value!r}")
        return f, None
    try:
        return parse_subspace_dim(int(v))
    except ValueError:
        raise UsageError(f"--subspace-dim must look like 'r', '2r' or an integer, got {value!r}") from None


@register
class DDIScorer(Scorer):
    name = "ddi"
    requires = ("base",)
    primary = "ddi"
    descending = True
    description = "Directional Deviation Index S·O·M (data-free; needs the base weights)"

    parameters = PARAMETERS["ddi"]

    def setup(self) -> None:
        self._mult, self._fixed_t = parse_subspace_dim(self.subspace_dim)
        self.oversample = int(self.oversample)
        self.power_iters = int(self.power_iters)
        self.reuse_subspace = bool(self.reuse_subspace)
        self.exact_subspace = bool(self.exact_subspace)
        self.seed = int(self.seed)
        self._omegas = OmegaCache(seed=self.seed)
        self._shared_basis: dict[tuple, Any] = {}
        # modules are independent unless the paper's "first module of each shape" basis is reused
        self.concurrent = not self.reuse_subspace

    def options(self) -> dict[str, Any]:
        return {
            "subspace_dim": self.subspace_dim,
            "oversample": self.oversample,
            "power_iters": self.power_iters,
            "subspace": self.subspace,
            "magnitude": self.magnitude,
            "reuse_subspace": self.reuse_subspace,
            "exact_subspace": self.exact_subspace,
            "eps": "relative 1e-12*tr(G)" if self.eps is None else self.eps,
            "seed": self.seed,
            "matmul_dtype": self.matmul_dtype,
        }

    def columns(self) -> list[str]:
        return ["S", "O", "M", "M_norm", "ddi", "ddi_norm", "t", "delta_fro", "base_fro"]

    def target_dim(self, r: int) -> int:
        return self._fixed_t if self._fixed_t is not None else max(1, int(math.ceil(self._mult * r)))

    def _eps(self, trace: float) -> float:
        return (1e-12 * trace + _TINY) if self.eps is None else self.eps + _TINY

    def basis(self, ctx: ModuleContext, t: int):
        """Orthonormal basis (float64) of W0's dominant column (or row) space of dimension t."""
        m = ctx.module
        key = (m.module_type, m.out_features, m.in_features, t, self.subspace)
        if self.reuse_subspace and key in self._shared_basis:
            return self._shared_basis[key]
        # bf16 weights are multiplied as stored where that is exact enough and faster (linalg.matmul_weight)
        W = matmul_weight(ctx.raw_weight("base"), self.matmul_dtype)
        if self.subspace == "row":
            W = W.T
        if self.exact_subspace:
            U = exact_left_basis(W, min(t, *W.shape))
        else:
            U = range_finder(W, t, oversample=self.oversample, power_iters=self.power_iters, omegas=self._omegas).U
        if self.reuse_subspace:
            self._shared_basis[key] = U
        return U

    def score(self, ctx: ModuleContext) -> dict[str, float]:
        m = ctx.module
        base_fro = ctx.norm("base")
        B, A = ctx.lora()
        sv = lowrank_svals(B, A, m.scaling)
        trace = float((sv * sv).sum())
        lam = float(sv[0] ** 2) if sv.numel() else 0.0
        eps = self._eps(trace)
        S = lam / (trace + eps)
        t = self.target_dim(m.r)
        U = self.basis(ctx, t)
        if self.subspace == "column":
            proj = left_projected_energy(U, B, A, m.scaling)
        else:
            proj = right_projected_energy(U, B, A, m.scaling)
        O = 1.0 - proj / (trace + eps)
        O = min(1.0, max(0.0, O))  # rounding can push it a few ulps outside [0, 1]
        delta_fro = math.sqrt(trace)
        M = delta_fro / (base_fro + eps)
        M_norm = delta_fro / (base_fro + delta_fro + eps)
        ddi = S * O * (M_norm if self.magnitude == "norm" else M)
        return {
            "S": S,
            "O": O,
            "M": M,
            "M_norm": M_norm,
            "ddi": ddi,
            "ddi_norm": ddi / (1.0 + ddi),
            "t": t,
            "delta_fro": delta_fro,
            "base_fro": base_fro,
        }
