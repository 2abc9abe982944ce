"""Dense reference implementations (full SVD, explicit projectors) that the fast paths must match."""

from __future__ import annotations

import torch

F64 = torch.float64


def dense_ddi(
    W0: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    s: float,
    t: int,
    subspace: str = "column",
    basis: torch.Tensor | None = None,
    magnitude: str = "norm",
) -> dict:
    """Every DDI component from dense matrices: ΔW, G = ΔWᵀΔW, eigvalsh, full SVD of W0, P = U_t U_tᵀ."""
    W0 = W0.to(F64)
    dW = s * (B.to(F64) @ A.to(F64))
    G = dW.T @ dW
    lam = float(torch.linalg.eigvalsh(G).max())
    tr = float(torch.trace(G))
    U, _, Vh = torch.linalg.svd(W0, full_matrices=True)
    if subspace == "column":
        Ut = U[:, :t] if basis is None else basis.to(F64)
        P = Ut @ Ut.T  # explicit m×m projector
        proj = float(torch.linalg.matrix_norm(P @ dW) ** 2)
    else:
        Vt = Vh[:t].T if basis is None else basis.to(F64)
        P = Vt @ Vt.T  # explicit n×n projector
        proj = float(torch.linalg.matrix_norm(dW @ P) ** 2)
    S = lam / tr if tr > 0 else 0.0
    O = 1 - proj / tr if tr > 0 else 1.0
    M = float(torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(W0))
    Mn = M / (1 + M)
    ddi = S * O * (Mn if magnitude == "norm" else M)
    return {"S": S, "O": O, "M": M, "M_norm": Mn, "ddi": ddi, "ddi_norm": ddi / (1 + ddi)}


def low_rank_matrix(m: int, n: int, k: int, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """A rank-k m×n matrix with singular values 1, 2^-decay, 3^-decay, ..."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    s = torch.arange(1, k + 1, dtype=F64) ** (-decay)
    return (U * s) @ V.T


def decaying_matrix(m: int, n: int, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    return low_rank_matrix(m, n, min(m, n), seed, decay)
