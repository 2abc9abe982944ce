"""Safetensors weights (a single file, or shards with or without an index).

Tensors are read with positional reads of their byte range (no shard stays mapped), so peak memory is the
tensors in flight, whatever the number of layers.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from ..io.safetensors import check_safetensors_header
from .base import WeightSource


class SafetensorsSource(WeightSource):
    """One or more safetensors files; a tensor -> file map built from the index or from the headers."""

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None, description: str = ""):
        self._files = files
        self.description = description or str(files[0].parent if len(files) > 1 else files[0])
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, Path] = {}
        self._spans: dict[str, tuple[str, int, int]] = {}  # key -> (dtype, absolute offset, nbytes)
        for f in files:
            header = check_safetensors_header(f)
            start = _data_start(f)
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                if k in self._file_of and weight_map is None:  # which copy wins would be arbitrary
                    raise InputError(
                        f"tensor {k!r} is in two shards ({self._file_of[k].name} and {f.name}) and no "
                        "index says which to use",
                        self.description,
                    )
                self._shapes[k] = tuple(info["shape"])
                self._file_of[k] = f
                b, e = info["data_offsets"]
                self._spans[k] = (info["dtype"], start + b, e - b)
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._file_of:
                    raise InputError(
                        f"index names tensor {k!r} in {f.name}, but that file does not contain it", self.description
                    )
                if self._file_of[k] != f:
                    raise InputError(
                        f"index places {k!r} in {f.name} but it is in {self._file_of[k].name}", self.description
                    )
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def keys(self) -> set[str]:
        return set(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def file_of(self, key: str) -> str:
        return str(self._file_of.get(key, self.description))

    def files(self) -> list[Path]:
        return list(self._files)

    def _handle(self, f: Path):
        with self._lock:
            h = self._handles.get(f)
            if h is None:
                h = safe_open(str(f), framework="pt")
                self._handles[f] = h
            return h

    def _fd(self, f: Path) -> int:
        with self._lock:
            fd = self._fds.get(f)
            if fd is None:
                fd = os.open(f, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                self._fds[f] = fd
            return fd

    def _read(self, key: str) -> torch.Tensor:
        f = self._file_of[key]
        dtype, offset, nbytes = self._spans[key]
        tdt = _ST_TORCH_DTYPES.get(dtype)
        if tdt is None or sys.byteorder != "little" or not hasattr(os, "preadv"):
            try:  # exotic dtypes: let safetensors decode them
                return self._handle(f).get_tensor(key)
            except Exception as e:
                raise InputError(f"cannot read tensor {key!r} ({str(e)[:200]})", f) from None
        # Positional read of exactly this tensor's bytes into a fresh buffer: no mapping of the shard is
        # kept, so the process's resident memory does not grow with the number of tensors read (an mmap'd
        # shard counts every touched page in RSS until it is unmapped), and the read thread-safely
        # overlaps with compute in scan()'s reader thread.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            _pread_into(self._fd(f), memoryview(buf.numpy()), offset)
        except OSError as e:
            raise InputError(f"cannot read tensor {key!r} ({e.strerror or e})", f) from None
        return buf.view(tdt).reshape(self._shapes[key])

    def close(self) -> None:
        self._handles.clear()
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass


_ST_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _data_start(f: Path) -> int:
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n


def _pread_into(fd: int, mv: memoryview, offset: int) -> None:
    done, total = 0, len(mv)
    while done < total:
        k = os.preadv(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise OSError(0, f"unexpected end of file after {done} of {total} bytes")
        done += k
