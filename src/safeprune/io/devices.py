"""The one ``--device`` rule every command uses (scan, repair, eval/run generation, finetune): a name torch
knows, of a kind safeprune runs on (cpu, cuda, cuda:N, mps) and present on this machine, or ``auto`` (the
first CUDA GPU if there is one, else the CPU). Anything else is a one-line :class:`UsageError`."""

from __future__ import annotations

import torch

from ..errors import UsageError

KINDS = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None, *, option: str = "--device") -> torch.device:
    """``name`` (None = cpu) as a torch device that exists here, or a one-line UsageError naming ``option``."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "cpu").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {name!r} is not a torch device (cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type not in KINDS:
        raise UsageError(f"{option} {name}: only cpu, cuda and mps are supported (or auto)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"{option} {name}: no such CUDA device here (torch sees {torch.cuda.device_count()})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{option} {name}: MPS is not available here")
    return dev
