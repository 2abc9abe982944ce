"""Aligned/unaligned weight pairs: the SafeLoRA alignment matrix, applied without forming it.

For one LoRA-targeted weight, V = W_aligned − W_unaligned (out×in) and SafeLoRA's "projection"
C = V Vᵀ / ‖V‖_F (out×out). Everything safeprune needs is C·Z for a thin Z (out×k, k = r or a few r):

    C·Z = V (Vᵀ Z) / ‖V‖_F

computed in two passes over row blocks of V, each block formed on the fly from the two weights
(``Wa[i:j] − Wu[i:j]``). Neither V (out×in) nor C (out×out) is ever materialised: beyond the two weights
that were read, memory is one row block (at most ``block_elems`` entries) plus O((out + in)·k).
Each block is formed in float64 (so the difference of two float32 weights is exact), products and the
norm are float64 as well.

:func:`check_pair` checks, from metadata only, that the two models have the same architecture and the
same shape for every targeted tensor, so a mismatched pair fails before any scoring.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch

from ..errors import InputError, NonFiniteError, ShapeMismatchError, UsageError
from ..io.jsonio import loads_bounded, read_text_bounded
from ..io.safetensors import check_safetensors_header
from .base import WeightSource
from .gguf import GGUFSource
from .keys import name_candidates
from .safetensors import SafetensorsSource

F64 = torch.float64
BLOCK_ELEMS = 1 << 20  # entries of V formed at a time (4 MiB in float32)

# config.json fields that must agree between an aligned model and its unaligned counterpart
_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
)


def _rows_per_block(out: int, inp: int, block_elems: int) -> int:
    return max(1, min(out, block_elems // max(1, inp)))


def _diff_block(Wa: torch.Tensor, Wu: torch.Tensor, i: int, step: int, buf: torch.Tensor) -> torch.Tensor:
    """Rows i:i+step of V = Wa − Wu in float64, written into ``buf``."""
    n = min(step, Wa.shape[0] - i)
    Vb = buf[:n]
    Vb.copy_(Wa[i : i + n])
    Vb.sub_(Wu[i : i + n])
    return Vb


def apply_alignment(
    Wa: torch.Tensor,
    Wu: torch.Tensor,
    Z: torch.Tensor,
    *,
    block_elems: int = BLOCK_ELEMS,
    what: str = "alignment matrix",
    where: str = "",
) -> tuple[torch.Tensor, float]:
    """Return (C·Z, ‖V‖_F) with V = Wa − Wu, C = V Vᵀ/‖V‖_F, in float64; C·Z is out×k.

    If V = 0 (the pair agrees on this weight) C is 0 and so is C·Z; the caller decides what that means.
    """
    if Wa.shape != Wu.shape:
        raise ShapeMismatchError(
            f"aligned weight has shape {tuple(Wa.shape)} but unaligned has {tuple(Wu.shape)}", where or None
        )
    out, inp = Wa.shape
    if Z.shape[0] != out:
        raise ValueError(f"Z has {Z.shape[0]} rows, expected {out}")
    Z64 = Z.to(device=Wa.device, dtype=F64)
    k = Z64.shape[1]
    step = _rows_per_block(out, inp, block_elems)
    # one float64 block buffer reused by both passes (no per-block allocations); blocks are formed straight
    # from the stored dtype (bf16/fp16/fp32 -> float64 is exact, and so is the float64 difference)
    buf = torch.empty(min(step, out), inp, dtype=F64, device=Wa.device)
    ZtV = torch.zeros(k, inp, dtype=F64, device=Wa.device)  # (VᵀZ)ᵀ, accumulated as Zᵀ·V (row-major friendly)
    sq = 0.0
    for i in range(0, out, step):
        Vb = _diff_block(Wa, Wu, i, step, buf)
        sq += float(torch.linalg.vector_norm(Vb) ** 2)
        ZtV.addmm_(Z64[i : i + step].T, Vb)
    vfro = math.sqrt(sq)
    if not math.isfinite(vfro):
        raise NonFiniteError(f"{what} (aligned − unaligned) contains NaN or Inf", where or None)
    CZ = torch.empty(out, k, dtype=F64, device=Wa.device)
    if vfro == 0.0:
        CZ.zero_()
        return CZ, 0.0
    VtZ = ZtV.T
    for i in range(0, out, step):
        Vb = _diff_block(Wa, Wu, i, step, buf)
        torch.mm(Vb, VtZ, out=CZ[i : i + step])
    CZ /= vfro
    return CZ, vfro


def dense_alignment_matrix(Wa: torch.Tensor, Wu: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """Dense reference C = V Vᵀ/‖V‖_F (out×out). For tests and the benchmark of the official approach only."""
    V = Wa.to(dtype) - Wu.to(dtype)
    return (V @ V.T) / torch.linalg.norm(V)


def gram_inner(P: torch.Tensor, Q: torch.Tensor, GA: torch.Tensor) -> float:
    """⟨P·A, Q·A⟩_F = ⟨PᵀQ, A Aᵀ⟩_F for P, Q (out×r) and GA = A Aᵀ (r×r)."""
    return float(((P.T @ Q) * GA).sum())


# -------------------------------------------------------------------------------------------------
# pair checks
# -------------------------------------------------------------------------------------------------


def _config_of(src: WeightSource) -> tuple[dict | None, Path | None]:
    files = src.files()
    if not files:
        return None, None
    cfg = files[0].parent / "config.json"
    if not cfg.is_file():
        return None, None
    # a config.json that is there but unreadable is refused: ignoring it would skip the architecture check
    try:
        data = loads_bounded(read_text_bounded(cfg, "a model config"), cfg, "config.json")
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", cfg) from None
    except ValueError as e:
        raise InputError(f"not valid JSON ({str(e)[:120]})", cfg) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", cfg)
    return data, cfg


def _pair_key(src: WeightSource, module: str, role: str) -> str:
    keys = src.keys()
    cands = [c + ".weight" for c in name_candidates(module)]
    for k in cands:
        if k in keys:
            return k
    raise InputError(
        f"{role} model has no weight for LoRA module {module!r} (looked for {cands[0]!r})", src.description
    )


def _stored_dtype(src: WeightSource, key: str, headers: dict) -> str | None:
    """The dtype a tensor is stored in (safetensors dtype or GGUF quantisation type), from metadata only."""
    if isinstance(src, SafetensorsSource):
        f = src.file_of(key)
        if f not in headers:
            headers[f] = check_safetensors_header(Path(f))
        return str(headers[f].get(key, {}).get("dtype")) or None
    if isinstance(src, GGUFSource):
        t = src._tensors.get(key)
        return None if t is None else t.tensor_type.name
    return None


def check_pair(
    aligned: WeightSource, unaligned: WeightSource, modules: Iterable, *, config: bool = True, tensors: bool = True
) -> None:
    """Fail early (metadata only) if the pair cannot be compared module by module.

    * the same files given twice -> UsageError (V would be 0 everywhere);
    * config.json architecture fields that differ -> ShapeMismatchError naming both files;
    * a targeted tensor missing from either -> InputError naming the file;
    * a targeted tensor with different shapes -> ShapeMismatchError naming both files;
    * a targeted tensor stored in different dtypes (e.g. bfloat16 vs float32, or two GGUF quantisations)
      -> InputError: V = aligned − unaligned would then be dominated by the rounding of the coarser one.
    (Each model's shapes are also checked against the adapter when the weights are read.)
    """
    fa = [os.path.realpath(f) for f in aligned.files()]
    fu = [os.path.realpath(f) for f in unaligned.files()]
    if fa and fa == fu:
        raise UsageError(
            f"--aligned and --unaligned are the same model ({aligned.description}); the pair methods "
            "need an aligned model and its unaligned counterpart"
        )
    ca, pa = _config_of(aligned) if config else (None, None)
    cu, pu = _config_of(unaligned) if config else (None, None)
    if ca is not None and cu is not None:
        diffs = [k for k in _ARCH_FIELDS if k in ca and k in cu and ca[k] != cu[k]]
        if diffs:
            k = diffs[0]
            raise ShapeMismatchError(
                f"aligned and unaligned models differ in architecture: {k} is {ca[k]!r} in {pa} but {cu[k]!r} "
                "here; they must be two versions of the same model",
                pu,
            )
    headers: dict = {}
    for m in modules if tensors else ():
        ka = _pair_key(aligned, m.name, "aligned")
        ku = _pair_key(unaligned, m.name, "unaligned")
        sa, su = tuple(aligned.shape(ka)), tuple(unaligned.shape(ku))
        if sa != su:
            raise ShapeMismatchError(
                f"tensor for module {m.name!r} has shape {sa} in the aligned model ({aligned.file_of(ka)}) but "
                f"{su} in the unaligned model ({unaligned.file_of(ku)})"
            )
        da, du = _stored_dtype(aligned, ka, headers), _stored_dtype(unaligned, ku, headers)
        if da and du and da != du:
            raise InputError(
                f"tensor for module {m.name!r} is stored as {da} in the aligned model ({aligned.file_of(ka)}) but "
                f"as {du} in the unaligned model ({unaligned.file_of(ku)}); V = aligned − unaligned would be "
                "dominated by rounding: give both models in the same dtype"
            )
