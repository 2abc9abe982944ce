"""The safetensors header, validated before any tensor is read.

safetensors' own reader rejects most corrupt files, but its messages do not always say what is wrong;
these checks validate the header ourselves (length, JSON, dtypes, offsets inside the file and not
overlapping) so a person gets a precise one-line error naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import InputError
from .files import check_regular_file
from .jsonio import loads_bounded

# bytes per element for the dtypes safetensors defines
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
# limits on what a header may describe (README "Security"): real headers are a few hundred KiB at most
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """Return (header dict, data start offset) after validating the header."""
    check_regular_file(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError("truncated safetensors file (shorter than its 8-byte header length)", file)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES and 8 + n <= size:
                raise InputError(
                    f"safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES // (1024 * 1024)} MiB limit", file
                )
            if 8 + n > size:
                raise InputError(
                    f"corrupt safetensors header: header length {n} does not fit in a {size}-byte file", file
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", file) from None
    try:
        # readers disagree on which of two equal keys wins: a header that names a tensor twice is refused
        header = loads_bounded(raw.decode("utf-8"), file, "the safetensors header", object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise InputError(f"corrupt safetensors header: {e.args[0]!r} appears twice", file) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("corrupt safetensors header: not valid JSON", file) from None
    if not isinstance(header, dict):
        raise InputError("corrupt safetensors header: not a JSON object", file)
    if len(header) > MAX_TENSORS + 1:
        raise InputError(f"safetensors header lists {len(header) - 1} tensors, over the limit of {MAX_TENSORS}", file)
    return header, 8 + n


def check_safetensors_header(file: Path) -> dict:
    """Validate dtypes, shapes and data offsets of every tensor in a safetensors file."""
    header, start = read_safetensors_header(file)
    data_len = file.stat().st_size - start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise InputError("corrupt safetensors header: __metadata__ is not an object", file)
            bad = [k for k, v in (info or {}).items() if not isinstance(v, str)]
            if bad:
                raise InputError(f"corrupt safetensors header: __metadata__ value of {bad[0]!r} is not a string", file)
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise InputError(f"corrupt safetensors header: entry {name!r} lacks dtype/shape/data_offsets", file)
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"tensor {name!r} has unknown dtype {dtype!r}", file)
        shape = info["shape"]
        offs = info["data_offsets"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offs)
        ):
            raise InputError(f"corrupt safetensors header: bad shape or offsets for {name!r}", file)
        b, e = offs
        n = 1
        for s in shape:
            n *= s
        if e < b or e - b != n * SAFETENSORS_DTYPES[dtype]:
            raise InputError(
                f"corrupt safetensors header: tensor {name!r} spans {e - b} bytes but its shape {shape} "
                f"and dtype {dtype} need {int(n * SAFETENSORS_DTYPES[dtype])}",
                file,
            )
        if e > data_len:
            raise InputError(
                f"truncated safetensors file: tensor {name!r} ends at byte {e} of a {data_len}-byte data section",
                file,
            )
        spans.append((b, e, name))
    spans.sort()
    for (_b1, e1, n1), (b2, _e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise InputError(f"corrupt safetensors header: tensors {n1!r} and {n2!r} overlap", file)
    return header
