"""Base-weight sources: read one tensor at a time, lazily, from wherever the base model lives.

* a local Hugging Face directory (``model.safetensors``, or shards with ``model.safetensors.index.json``,
  or shards without an index);
* a single ``.safetensors`` file;
* a GGUF file (or a directory holding exactly one), dequantised tensor by tensor with the ``gguf`` package;
  llama-family ``attn_q``/``attn_k`` rows are permuted by llama.cpp's converter and are un-permuted here so
  they match Hugging Face order;
* a hub id (``org/name``), resolved through huggingface_hub's local cache (and downloaded only when the
  network is allowed).

All sources present tensors under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) and return
float32 (or the requested dtype, or the stored dtype with ``dtype=None``) tensors on the CPU. Nothing loads the
whole model. Safetensors tensors are read with positional reads of their byte range (no shard stays mapped), so
peak memory is the tensors in flight, whatever the number of layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import InputError, OfflineError, ShapeMismatchError, UnsupportedError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_BASES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


class WeightSource(ABC):
    """Lazy access to a model's weights by Hugging Face tensor name."""

    description: str = ""

    @abstractmethod
    def keys(self) -> set[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def _read(self, key: str) -> torch.Tensor: ...

    def get(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if key not in self.keys():
            raise InputError(f"no tensor named {key!r}", self.description)
        t = self._read(key)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def file_of(self, key: str) -> str:
        return self.description

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


# -------------------------------------------------------------------------------------------------
# safetensors (single file, sharded with or without index)
# -------------------------------------------------------------------------------------------------

class SafetensorsSource(WeightSource):
    """One or more safetensors files; a tensor -> file map built from the index or from the headers."""

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None, description: str = ""):
        from .safety_io import check_safetensors_header

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
                self._shapes[k] = tuple(info["shape"])
                self._file_of[k] = f
                b, e = info["data_offsets"]
                self._spans[k] = (info["dtype"], start + b, e - b)
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._file_of:
                    raise InputError(f"index names tensor {k!r} in {f.name}, but that file does not contain it",
                                     self.description)
                if self._file_of[k] != f:
                    raise InputError(f"index places {k!r} in {f.name} but it is in {self._file_of[k].name}",
                                     self.description)
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
        from safetensors import safe_open

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
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
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


def _safetensors_dir(d: Path, root: Path | None = None) -> WeightSource:
    """Open the weights in directory ``d``. Every file read must lie inside ``root`` (default ``d``) after
    resolving symlinks; a hub cache snapshot passes its repository folder, whose blobs its links point to."""
    from .safety_io import check_inside

    root = d if root is None else root

    index = d / INDEX_NAME
    if index.is_file():
        check_inside(index, root)
        try:
            idx = json.loads(index.read_text(encoding="utf-8"))
            wm = idx["weight_map"]
            assert isinstance(wm, dict)
        except Exception:
            raise InputError("corrupt index: expected JSON with a 'weight_map' object", index) from None
        shard_names = sorted(set(wm.values()))
        files = []
        for name in shard_names:
            f = d / name
            if not f.is_file():
                raise InputError(f"shard {name!r} named in {INDEX_NAME} is missing", d)
            check_inside(f, root)
            files.append(f)
        return SafetensorsSource(files, {k: d / v for k, v in wm.items()}, description=str(d))
    single = d / SINGLE_NAME
    if single.is_file():
        check_inside(single, root)
        return SafetensorsSource([single], description=str(d))
    shards = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if shards:
        for f in shards:
            check_inside(f, root)
        return SafetensorsSource(shards, description=str(d))
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        check_inside(ggufs[0], root)
        return GGUFSource(ggufs[0])
    if len(ggufs) > 1:
        raise InputError(f"several GGUF files; name one of them: {', '.join(p.name for p in ggufs)}", d)
    for name in _PICKLE_BASES:
        if (d / name).exists():
            raise UnsupportedError(
                f"base weights are pickled ({name}); safeprune reads safetensors or GGUF only. Convert with "
                "`model.save_pretrained(dir, safe_serialization=True)`",
                d,
            )
    raise InputError("no model weights found (expected model.safetensors, shards with an index, or a .gguf)", d)


# -------------------------------------------------------------------------------------------------
# GGUF
# -------------------------------------------------------------------------------------------------

# llama.cpp tensor names -> Hugging Face names for decoder-only transformer families
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GGUF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# architectures whose q/k rows llama.cpp's converter permutes (LlamaModel.permute)
_PERMUTED_ARCHS = {"llama", "mistral", "granite", "granitemoe"}


def gguf_to_hf_name(name: str) -> str | None:
    m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
    if m:
        i, part, kind = m.groups()
        hf = _GGUF_BLOCK.get(part)
        return None if hf is None else f"model.layers.{i}.{hf}.{kind}"
    m = re.match(r"^([a-z_]+)\.(weight|bias)$", name)
    if m and m.group(1) in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute(weights, n_head, n_head_kv)`` on the output rows of q/k weights.

    ``n_head`` is the number of heads of *this* projection (query heads for q, kv heads for k).
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ShapeMismatchError(f"cannot un-permute a {tuple(w.shape)} weight over {n_head} heads")
    head_dim = out // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(WeightSource):
    """A GGUF file read tensor by tensor (memory-mapped by the gguf package) and dequantised to float32."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:  # pragma: no cover - dependency
            raise InputError("reading GGUF needs the 'gguf' package: pip install gguf", path) from None
        from .safety_io import check_regular_file

        self.path = path
        self.description = str(path)
        check_regular_file(path)
        try:
            self._reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise InputError(f"not a readable GGUF file ({str(e)[:200]})", path) from None
        self.arch = self._field_str("general.architecture") or "unknown"
        self.n_head = self._field_int(f"{self.arch}.attention.head_count")
        self.n_head_kv = self._field_int(f"{self.arch}.attention.head_count_kv") or self.n_head
        self._tensors = {}
        for t in self._reader.tensors:
            hf = gguf_to_hf_name(t.name) or t.name
            self._tensors[hf] = t
        self._gguf = gguf

    def _field(self, key: str):
        f = self._reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # pragma: no cover - older gguf
            return None

    def _field_str(self, key: str) -> str | None:
        v = self._field(key)
        return v if isinstance(v, str) else None

    def _field_int(self, key: str) -> int | None:
        v = self._field(key)
        if isinstance(v, list):  # per-layer head counts: only uniform ones are supported
            v = v[0] if v and all(x == v[0] for x in v) else None
        return int(v) if isinstance(v, (int, np.integer)) else None

    def keys(self) -> set[str]:
        return set(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        # GGUF lists dims innermost-first; HF order is the reverse
        return tuple(int(x) for x in reversed(self._tensors[key].shape.tolist()))

    def files(self) -> list[Path]:
        return [self.path]

    def _read(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        qtype = t.tensor_type
        try:
            arr = self._gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError:
            raise UnsupportedError(
                f"tensor {t.name!r} uses quantisation {qtype.name}, which the gguf package cannot dequantise",
                self.path,
            ) from None
        except Exception as e:
            raise InputError(f"cannot dequantise tensor {t.name!r} ({str(e)[:200]})", self.path) from None
        arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(key))
        w = torch.from_numpy(arr.copy())
        if self.arch in _PERMUTED_ARCHS and key.endswith(".weight") and self.n_head:
            try:
                if ".self_attn.q_proj." in key:
                    w = unpermute_qk(w, self.n_head)
                elif ".self_attn.k_proj." in key:
                    w = unpermute_qk(w, self.n_head_kv or self.n_head)
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"tensor {t.name!r}: {e.problem} (head counts in the metadata)",
                                         self.path) from None
        return w

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None


# -------------------------------------------------------------------------------------------------
# hub ids
# -------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` that is not a relative or absolute path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/"))


def resolve_hub_id(repo_id: str) -> Path:
    """Local snapshot directory for a hub id: the cache first; the network only if allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise OfflineError("resolving hub ids needs huggingface_hub", repo_id) from None
    patterns = ["*.safetensors", "*.json", "*.gguf"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise OfflineError(
            "not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it "
            "first (`huggingface-cli download " + repo_id + "`) or pass a local directory",
            repo_id,
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise OfflineError(
            f"not a local path, not in the Hugging Face cache, and downloading failed ({str(e)[:160]}); "
            "pass a local directory",
            repo_id,
        ) from None


def open_weights(spec: str | Path | WeightSource) -> WeightSource:
    """Open a base model (or aligned/unaligned model) given as a directory, a file or a hub id."""
    if isinstance(spec, WeightSource):
        return spec
    p = Path(spec)
    if p.is_dir():
        return _safetensors_dir(p)
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUFSource(p)
        if p.suffix == ".safetensors":
            return SafetensorsSource([p])
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UnsupportedError("pickled weights are refused; use safetensors or GGUF", p)
        raise InputError("unrecognised weight file (expected a directory, .safetensors or .gguf)", p)
    if p.exists():  # a FIFO, a device...
        from .safety_io import check_regular_file

        check_regular_file(p)
    if isinstance(spec, str) and looks_like_hub_id(spec):
        snap = resolve_hub_id(spec)
        # snapshots/<rev>/file -> ../../blobs/<hash>: the repository folder is the trust root
        root = snap.parent.parent if snap.parent.name == "snapshots" else snap
        return _safetensors_dir(snap, root=root)
    raise InputError("does not exist (expected a local directory, a .safetensors/.gguf file or a hub id)", spec)


# -------------------------------------------------------------------------------------------------
# adapter module -> base tensor
# -------------------------------------------------------------------------------------------------

def _name_candidates(module: str) -> Iterable[str]:
    yield module
    parts = module.split(".")
    # checkpoints saved from the bare backbone (no "model." prefix) or wrapped (VLMs)
    if parts[0] == "model":
        yield ".".join(parts[1:])
    else:
        yield "model." + module
    for wrapper in ("model.language_model.", "language_model.model.", "language_model."):
        if module.startswith("model."):
            yield wrapper + module[len("model."):]
        yield wrapper + module


def base_key_for(source: WeightSource, module: str, role: str = "base") -> str:
    keys = source.keys()
    tried = []
    for cand in _name_candidates(module):
        k = cand + ".weight"
        tried.append(k)
        if k in keys:
            return k
    raise InputError(
        f"{role} model has no weight for LoRA module {module!r} (looked for {tried[0]!r}); is this the model "
        "the adapter was trained on?",
        source.description,
    )


def module_weight_key(source: WeightSource, module, role: str = "base") -> str:
    """The source's tensor name for a LoraModule's W0, after checking its stored shape (header only).

    ``role`` ("base", "aligned", "unaligned") names the model in error messages."""
    key = base_key_for(source, module.name, role)
    shp = source.shape(key)
    want = (module.out_features, module.in_features)
    stored_want = (want[1], want[0]) if module.fan_in_fan_out else want
    if tuple(shp) != stored_want:
        hint = " (fan_in_fan_out)" if module.fan_in_fan_out else ""
        raise ShapeMismatchError(
            f"{role} tensor {key!r} has shape {tuple(shp)} but the adapter's module {module.name!r} needs "
            f"{stored_want}{hint}",
            source.file_of(key),
        )
    return key


def check_modules_present(source: WeightSource, modules: Iterable, role: str = "base") -> None:
    """Fail fast (before any tensor is read) if the source lacks a module's weight or has the wrong shape."""
    for m in modules:
        module_weight_key(source, m, role)


def read_weight_and_norm(source: WeightSource, module, *, dtype: torch.dtype | None = torch.float32,
                         role: str = "base") -> tuple[torch.Tensor, float]:
    """Read W0 for a LoraModule in (out, in) orientation (``dtype=None``: the stored dtype, e.g. bfloat16,
    without conversion), checking its shape, and return it with ‖W0‖_F.

    Every scorer gets its weights through here, so a NaN/Inf in a base (or aligned/unaligned) weight is
    reported as an error naming the file and the tensor instead of turning into a NaN score. The check is
    the float64 norm itself (finite for any finite float32/bf16 tensor), so it costs no extra pass.
    """
    from .errors import NonFiniteError

    key = module_weight_key(source, module, role)
    w = source.get(key, dtype=dtype)
    if not w.is_floating_point():
        w = w.float()
    n = fro_norm64(w)
    if not math.isfinite(n):
        bad = "NaN" if bool(torch.isnan(w).any()) else "Inf"
        raise NonFiniteError(f"tensor {key!r} contains {bad}", source.file_of(key))
    return (w.T if module.fan_in_fan_out else w), n


def read_module_weight(source: WeightSource, module, *, dtype: torch.dtype | None = torch.float32,
                       role: str = "base") -> torch.Tensor:
    """:func:`read_weight_and_norm` without the norm."""
    return read_weight_and_norm(source, module, dtype=dtype, role=role)[0]


_NORM_CHUNK = 1 << 18  # elements per float64 block: stays in cache, no full-size copy
_NORM_ROW = 1024  # entries summed by one thread in a fixed order


def fro_norm64(w: torch.Tensor) -> float:
    """‖w‖_F accumulated in float64, block by block (any float dtype, any device), bit-reproducible.

    A float64 ``vector_norm`` over the whole tensor is several times slower than the read on CPU and a
    float32 one loses ~1e-4 relative accuracy on 10^7 entries. Blocks of 2^18 entries are converted to
    float64 and squared; each row of 1024 entries is summed by one thread in a fixed order and the row sums
    in a fixed order too, so the result does not depend on the number of torch threads (a BLAS ``dot``
    does: its split follows the thread count)."""
    if not w.is_contiguous() and w.dim() == 2 and w.T.is_contiguous():
        w = w.T  # (fan_in_fan_out views) the norm does not care about orientation
    flat = w.reshape(-1)
    if w.device.type != "cpu":
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    acc = 0.0
    for c in flat.split(_NORM_CHUNK):
        c = c.to(torch.float64)
        n = c.numel() - c.numel() % _NORM_ROW
        if n:  # per-row sums (one thread each), then a 256-entry sum (below torch's parallel grain)
            acc += float((c[:n].view(-1, _NORM_ROW) ** 2).sum(dim=1).sum())
        if n < c.numel():
            acc += float((c[n:] ** 2).sum())
    return math.sqrt(acc)


def checked_fro_norm(w: torch.Tensor, what: str, where: str) -> float:
    """‖w‖_F in float64, raising NonFiniteError if w holds NaN/Inf (one pass, no full-size copy)."""
    from .errors import NonFiniteError

    n = fro_norm64(w)
    if not (n == n and n != float("inf")):
        raise NonFiniteError(f"{what} contains NaN or Inf", where)
    return n
