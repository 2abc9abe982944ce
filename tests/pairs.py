"""Aligned/unaligned pairs for the pair-method tests: copy a tiny model and perturb it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def perturb_model(
    src: Path,
    out: Path,
    scale: float = 0.02,
    seed: int = 7,
    rank: int | None = None,
    skip: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
) -> Path:
    """Copy the HF dir ``src`` to ``out`` with every 2-D weight W replaced by W + scale·N (N Gaussian, or a
    rank-``rank`` product when given); keys containing any of ``skip`` are copied unchanged and keys in
    ``drop`` are left out."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(Path(src).glob("*.safetensors")):
        sd = load_file(str(f))
        new = {}
        for k, w in sd.items():
            if k in drop:
                continue
            if w.dim() == 2 and not any(s in k for s in skip):
                if rank:
                    n = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
                    n = n / rank**0.5
                else:
                    n = torch.randn(w.shape, generator=g)
                w = (w.float() + scale * n).to(w.dtype)
            new[k] = w.contiguous()
        save_file(new, str(out / f.name), metadata={"format": "pt"})
    return out


def module_pair(aligned: Path, unaligned: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    key = module + ".weight"
    wa = load_file(str(Path(aligned) / "model.safetensors"))[key]
    wu = load_file(str(Path(unaligned) / "model.safetensors"))[key]
    return wa.double(), wu.double()


def dense_C(wa: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    V = wa.double() - wu.double()
    return V @ V.T / torch.linalg.norm(V)
