"""Where the tensors autograd keeps for the backward pass are held: on the device (``none``), in host memory
(``cpu``: ``torch.autograd.graph.save_on_cpu``, for a GPU fit) or in files in a private temporary folder
(``disk``: the process's own memory then holds none of them).

``safeprune repair --offload`` wraps each checkpointed decoder layer's call in :func:`saved_tensors` so the one
tensor a checkpointed layer keeps — its input hidden state — leaves the device: with checkpointing alone the
fit's memory above the loaded model grows by one hidden state per layer; with offloading it does not grow with
the layers at all (``benchmarks/bench_repair_offload.py``). A spilled tensor is read back bit for bit, so the
gradients are the same as without offloading.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

from ..errors import UsageError

KINDS = ("none", "cpu", "disk")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"--offload must be one of {', '.join(KINDS)}, got {kind!r}")


def check_offload(kind: str, device: str, checkpoint: bool | None) -> None:
    """Refuse an unknown kind, ``cpu`` offloading for a fit that already runs on the CPU, and offloading with
    checkpointing turned off (``checkpoint`` False; None is automatic, which offloading turns on)."""
    _check_kind(kind)
    if kind == "cpu" and str(device).split(":")[0] == "cpu":
        raise UsageError(
            "--offload cpu moves saved activations from an accelerator to host memory; on the CPU use --offload disk"
        )
    if kind != "none" and checkpoint is False:
        raise UsageError(f"--offload {kind} moves the checkpointed layers' inputs: it needs --checkpoint")


class _Spilled:
    """One saved tensor in a file; the file goes when autograd drops the saved tensor."""

    __slots__ = ("path", "device", "__weakref__")

    def __init__(self, path: Path, device: Any):
        self.path, self.device = path, device

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class DiskSpill:
    """Saved-tensor hooks that write each packed tensor to a file in a private temporary folder (under
    ``$TMPDIR``) and read it back when the backward pass needs it. :meth:`close` removes the folder."""

    def __init__(self, prefix: str = "safeprune-spill-"):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))  # mode 0700
        self._n = itertools.count()
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def pack(self, t: Any) -> Any:
        import torch

        path = self.dir / f"{next(self._n)}.pt"
        torch.save(t.detach().to("cpu"), path)
        return _Spilled(path, t.device)

    @staticmethod
    def unpack(s: _Spilled) -> Any:
        import torch

        return torch.load(s.path, map_location="cpu", weights_only=True).to(s.device)

    def files(self) -> int:
        """How many spilled tensors are on disk now (for tests)."""
        return sum(1 for _ in self.dir.glob("*.pt"))

    def close(self) -> None:
        self._cleanup()


@contextlib.contextmanager
def saved_tensors(kind: str, spill: DiskSpill | None = None, *, pin_memory: bool = False) -> Iterator[None]:
    """The context in which the tensors autograd saves go where ``kind`` says (``disk`` needs ``spill``)."""
    import torch

    _check_kind(kind)
    if kind == "none":
        yield
    elif kind == "cpu":
        with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            yield
    elif kind == "disk":
        if spill is None:
            raise UsageError("disk offloading needs a spill folder")
        with torch.autograd.graph.saved_tensors_hooks(spill.pack, spill.unpack):
            yield
