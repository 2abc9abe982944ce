"""GGUF weights, dequantised tensor by tensor with the ``gguf`` package.

llama-family ``attn_q``/``attn_k`` rows are permuted by llama.cpp's converter and are un-permuted here so
they match Hugging Face order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ShapeMismatchError, UnsupportedError
from ..io.files import check_regular_file
from .base import WeightSource

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
                raise ShapeMismatchError(
                    f"tensor {t.name!r}: {e.problem} (head counts in the metadata)", self.path
                ) from None
        return w

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None
