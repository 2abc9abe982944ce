"""Loading a PEFT LoRA adapter directory into :class:`LoraAdapter` records, checking everything on the way.

Keys on disk look like ``base_model.model.<module path>.lora_A.weight``; older trainers leave the adapter
name in (``...lora_A.default.weight``). Tensors that are not LoRA factors (``modules_to_save`` copies,
embedding LoRA, ``lora_B.bias`` is handled) are carried through unchanged.

safeprune never unpickles an adapter it was handed. ``adapter_model.bin`` is refused unless the caller
passes ``allow_pickle=True``, which then uses ``torch.load(weights_only=True)`` (no code execution).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import InputError, NonFiniteError, ShapeMismatchError, UnsupportedError
from ..io.files import check_inside, check_regular_file
from ..io.safetensors import check_safetensors_header
from .config import (
    pattern_value,
    read_config,
    scaling_for,
    short_error,
    validate_config,
    warn_unmatched_patterns,
)
from .names import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .records import LoraAdapter, LoraModule, parse_lora_key


def _load_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_safetensors_header(file)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                t = f.get_tensor(k)
                # 8-bit (and smaller) floats have no arithmetic in torch (isfinite, matmul): read them upcast
                tensors[k] = t.float() if t.is_floating_point() and t.element_size() < 2 else t
    except InputError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        raise InputError(f"cannot read safetensors file ({short_error(e)})", file) from None
    return tensors, meta


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): its restricted unpickler builds tensors and plain containers only
    and refuses every other global (os.system, builtins.eval, ...), so nothing in the file is executed."""
    check_regular_file(file)
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: not the user's problem
            warnings.simplefilter("ignore")
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", msg)
        op = re.search(r"Unsupported operand (\d+)", msg)
        if glob:
            why = f"it references {glob.group(1)}, which is not a tensor type"
        elif op:
            why = f"pickle opcode {op.group(1)} is outside what a torch weights file may contain"
        else:
            why = "it holds objects other than tensors"
        raise UnsupportedError(f"pickle refused: {why}; nothing in it was executed", file) from None
    except Exception as e:
        raise InputError(f"not a readable torch pickle ({short_error(e)})", file) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError("pickle does not contain a flat dict of tensors", file)
    return sd


def _check_finite(t: torch.Tensor, key: str, file: Path) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"tensor {key!r} contains {bad}", file)


# Long on purpose: one pass over the tensors whose every check is a distinct refusal users see; split up, the
# order in which they fire (and so which message a broken adapter gets) would be harder to read.
def build_modules(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any], file: Path
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """Group the flat state dict into LoraModule records; return (modules, passthrough tensors)."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedError(f"DoRA tensor {key!r} found: DoRA adapters are not supported", file)
        parsed = parse_lora_key(key)
        if parsed is None:
            extra[key] = t  # modules_to_save copies, embedding LoRA, ...: kept as they are
            continue
        path, kind, param = parsed
        slot = f"{kind}.{param}"
        if slot == "lora_A.bias":
            raise InputError(f"unexpected tensor {key!r} (lora_A has no bias in PEFT)", file)
        if slot in parts.setdefault(path, {}):
            raise InputError(f"module {path!r} has two {slot} tensors ({parts[path][slot][0]!r}, {key!r})", file)
        parts[path][slot] = (key, t)

    use_rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))
    r_default = cfg.get("r", 8)
    alpha_default = cfg.get("lora_alpha", 8)
    modules: dict[str, LoraModule] = {}
    for path, slots in parts.items():
        if "lora_A.weight" not in slots:
            raise InputError(f"module {path!r} has lora_B but no lora_A tensor", file)
        if "lora_B.weight" not in slots:
            raise InputError(f"module {path!r} has lora_A but no lora_B tensor", file)
        key_A, A = slots["lora_A.weight"]
        key_B, B = slots["lora_B.weight"]
        bias = slots.get("lora_B.bias")
        if A.dim() != 2 or B.dim() != 2:
            raise UnsupportedError(
                f"module {path!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are not 2-D "
                "(LoRA on Conv layers is not supported)",
                file,
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise InputError(f"module {path!r}: LoRA tensors must be floating point, got {A.dtype}/{B.dtype}", file)
        if A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"module {path!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank",
                file,
            )
        r = int(A.shape[0])
        if r == 0:
            raise InputError(f"module {path!r} has rank 0", file)
        r_cfg = pattern_value(cfg.get("rank_pattern"), path, r_default, file.parent / CONFIG_NAME)
        if r_cfg != r:
            raise ShapeMismatchError(
                f"module {path!r}: tensors have rank {r} but adapter_config.json gives r={r_cfg}", file
            )
        if bias is not None and tuple(bias[1].shape) != (B.shape[0],):
            raise ShapeMismatchError(
                f"module {path!r}: lora_B.bias {tuple(bias[1].shape)} does not match out_features {B.shape[0]}",
                file,
            )
        for k, t in ((key_A, A), (key_B, B)) + ((bias,) if bias is not None else ()):
            _check_finite(t, k, file)
        alpha = float(
            pattern_value(cfg.get("alpha_pattern"), path, alpha_default, file.parent / CONFIG_NAME, "alpha_pattern")
        )
        modules[path] = LoraModule(
            name=path,
            lora_A=A,
            lora_B=B,
            r=r,
            alpha=alpha,
            scaling=scaling_for(alpha, r, use_rslora),
            fan_in_fan_out=fifo,
            lora_B_bias=None if bias is None else bias[1],
            key_A=key_A,
            key_B=key_B,
            key_B_bias=None if bias is None else bias[0],
        )
    for key, t in extra.items():
        _check_finite(t, key, file)
    if not modules:
        raise InputError("no LoRA tensors (lora_A/lora_B) found", file)
    return modules, extra


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory.

    Raises :class:`~safeprune.errors.SafepruneError` subclasses with a message naming the file and the
    problem for anything missing, corrupt, inconsistent or unsupported.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("adapter directory does not exist", p)
    if not p.is_dir():
        raise InputError("expected an adapter directory (with adapter_config.json)", p)
    cfg = read_config(p)
    validate_config(cfg, p / CONFIG_NAME)
    st = p / WEIGHTS_NAME
    pk = p / PICKLE_WEIGHTS_NAME
    meta: dict[str, str] = {}
    if st.exists():
        check_inside(st, p)
        tensors, meta = _load_safetensors(st)
        weights_file = st
    elif pk.exists():
        check_inside(pk, p)
        if not allow_pickle:
            raise UnsupportedError(
                "pickled adapter weights are refused (loading a pickle can run arbitrary code); convert it "
                "to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
                pk,
            )
        tensors = _load_pickle(pk)
        weights_file = pk
    else:
        raise InputError(f"missing {WEIGHTS_NAME}", p)
    modules, extra = build_modules(tensors, cfg, weights_file)
    warn_unmatched_patterns(cfg, modules, p / CONFIG_NAME)
    return LoraAdapter(config=cfg, modules=modules, extra_tensors=extra, path=p, metadata=meta)
