"""Low-rank linear algebra used by the scorers.

Everything about ``ΔW = s·B·A`` (B: m×r, A: r×n) is computed from r×r matrices:

* singular values of ΔW = singular values of ``K = s·R_B·R_Aᵀ`` where ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``
  (thin QR), so ``λmax(ΔWᵀΔW) = σ₁(K)²`` and ``tr(ΔWᵀΔW) = ‖K‖_F²``;
* ``‖UᵀΔW‖_F² = s²·⟨(UᵀB)ᵀ(UᵀB), AAᵀ⟩_F`` for any orthonormal U (m×t);
* ``‖ΔW V‖_F² = s²·⟨BᵀB, (AV)(AV)ᵀ⟩_F`` for any orthonormal V (n×t).

The r×r algebra runs in float64. The only O(m·n) work is the randomized range finder on the base weight
W0 (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), done in float32 matmuls with float64 QR/SVD of the
thin factors, truncated to exactly ``t`` vectors *after* the small SVD (never ``Q[:, :t]``).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch

F64 = torch.float64


def lowrank_core(B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """The r×r core K with the same singular values as s·B@A (float64)."""
    _, RB = torch.linalg.qr(B.to(F64), mode="reduced")  # (r, r) when m >= r
    _, RA = torch.linalg.qr(A.to(F64).T, mode="reduced")
    return s * (RB @ RA.T)


def lowrank_svals(B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """Singular values of s·B@A, descending, from an r×r SVD (float64)."""
    return torch.linalg.svdvals(lowrank_core(B, A, s))


def gram_energy(B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> float:
    """‖s·B@A‖_F² = s²·⟨BᵀB, AAᵀ⟩_F without forming B@A."""
    B64, A64 = B.to(F64), A.to(F64)
    return float(s * s * ((B64.T @ B64) * (A64 @ A64.T)).sum())


def left_projected_energy(U: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> float:
    """‖Uᵀ(s·B@A)‖_F² for orthonormal U (m×t)."""
    UB = U.to(F64).T @ B.to(F64)  # t×r
    A64 = A.to(F64)
    return float(s * s * ((UB.T @ UB) * (A64 @ A64.T)).sum())


def right_projected_energy(V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> float:
    """‖(s·B@A)V‖_F² for orthonormal V (n×t)."""
    AV = A.to(F64) @ V.to(F64)  # r×t
    B64 = B.to(F64)
    return float(s * s * ((B64.T @ B64) * (AV @ AV.T)).sum())


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from the parts, identical across runs, platforms and processes."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class OmegaCache:
    """Gaussian test matrices Ω (n×ℓ), one per (n, ℓ), drawn from a seed that depends only on
    (seed, n, ℓ). Caching Ω (not Q) keeps the range finder reproducible and cheap while every module
    still gets the subspace of *its own* W0."""

    def __init__(self, seed: int = 0, max_entries: int = 8):
        self.seed = seed
        self.max_entries = max_entries
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()  # scan() may score modules in several threads

    def get(self, n: int, ell: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        key = (n, ell, str(device), dtype)
        with self._lock:
            return self._get(key, n, ell, device, dtype)

    def _get(self, key: tuple, n: int, ell: int, device, dtype) -> torch.Tensor:
        om = self._cache.get(key)
        if om is None:
            g = torch.Generator(device="cpu").manual_seed(stable_seed("omega", self.seed, n, ell))
            om = torch.randn(n, ell, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = om
        return om


@dataclass
class RangeFinderResult:
    U: torch.Tensor  # m×t orthonormal (float64), approximate dominant left singular vectors
    svals: torch.Tensor  # the t leading approximate singular values (float64)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y.to(F64), mode="reduced")[0]


def range_finder(
    W: torch.Tensor,
    t: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    omega: torch.Tensor | None = None,
    omegas: OmegaCache | None = None,
) -> RangeFinderResult:
    """Rank-t approximation of the dominant column space of W (m×n), HMT Alg. 4.4 + 5.1.

    ``Y = W Ω`` (Ω: n×(t+p)), QR, ``power_iters`` rounds of re-orthonormalised subspace iteration, then the
    small SVD of ``QᵀW`` and truncation to exactly t vectors: ``U_t = Q Ũ[:, :t]``.
    """
    m, n = W.shape
    t = max(1, min(t, m, n))
    ell = min(t + max(0, oversample), n, m)
    if omega is None:
        omega = (omegas or OmegaCache()).get(n, ell, W.device, W.dtype)
    else:
        omega = omega[:, :ell]
    Q = _orth(W @ omega)
    wdt = W.dtype
    for _ in range(power_iters):
        Z = _orth(W.T @ Q.to(wdt))
        Q = _orth(W @ Z.to(wdt))
    small = (Q.to(wdt).T @ W).to(F64)  # ℓ×n
    Ut, S, _ = torch.linalg.svd(small, full_matrices=False)
    return RangeFinderResult(U=Q @ Ut[:, :t], svals=S[:t])


def _cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates
    bf16 matmuls and float32 is faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_BF16_CPU: bool | None = None


def matmul_weight(W: torch.Tensor, policy: str = "auto") -> torch.Tensor:
    """W in the dtype the range finder should multiply in.

    ``policy="float32"`` always converts (float64 stays float64). ``"auto"`` keeps a stored bfloat16/float16
    W as is on a GPU, and bfloat16 on a CPU with native bf16 matmuls: the products then accumulate in
    float32 and only the thin m×ℓ / n×ℓ factors are rounded to the weight's dtype, while W itself is
    exact in it, so the basis matches the float32 one to ~1e-5 (see tests) at a fraction of the memory
    traffic and without a full-size float32 copy. Anything else is converted to float32.
    """
    global _BF16_CPU
    if W.dtype in (torch.float32, torch.float64):
        return W
    if policy == "float32":
        return W.float()
    if W.device.type != "cpu" and W.dtype in (torch.float16, torch.bfloat16):
        return W
    if W.dtype == torch.bfloat16:
        if _BF16_CPU is None:
            _BF16_CPU = _cpu_has_bf16_matmul()
        if _BF16_CPU:
            return W
    return W.float()


def exact_left_basis(W: torch.Tensor, t: int) -> torch.Tensor:
    """The exact top-t left singular vectors (float64) from a full SVD: the dense reference, and DDI's
    ``exact_subspace`` option."""
    U, _, _ = torch.linalg.svd(W.to(F64), full_matrices=False)
    return U[:, :t]
