"""Reading PEFT LoRA adapters into per-module records.

Conventions (PEFT, see ../shared/design/methods.md §1):

* ``lora_A.weight`` has shape ``(r, in_features)``, ``lora_B.weight`` has shape ``(out_features, r)``;
* ``ΔW = s · B @ A`` in the ``(out, in)`` orientation, with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with
  ``use_rslora``), where ``r`` and ``alpha`` are resolved per module through ``rank_pattern`` /
  ``alpha_pattern`` with PEFT's suffix-regex rule;
* ``fan_in_fan_out`` (GPT-2 ``Conv1D``) only changes how the *base* weight is stored (``(in, out)``); the
  LoRA tensors keep the Linear shapes, so safeprune always works in ``(out, in)``.

Keys on disk look like ``base_model.model.<module path>.lora_A.weight``; older trainers leave the adapter
name in (``...lora_A.default.weight``). Tensors that are not LoRA factors (``modules_to_save`` copies,
embedding LoRA, ``lora_B.bias`` is handled) are carried through unchanged.

safeprune never unpickles an adapter it was handed. ``adapter_model.bin`` is refused unless the caller
passes ``allow_pickle=True``, which then uses ``torch.load(weights_only=True)`` (no code execution).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .errors import InputError, NonFiniteError, ShapeMismatchError, UnsupportedError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 16 * 1024 * 1024

# <prefix?><module path>.lora_A|lora_B[.<adapter name>].weight|bias
_LORA_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_LAYER_IDX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class LoraModule:
    """One LoRA-adapted linear module, in PEFT conventions (``A``: (r, in), ``B``: (out, r))."""

    name: str  # module path inside the base model, e.g. "model.layers.0.self_attn.q_proj"
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    lora_B_bias: torch.Tensor | None = None
    key_A: str = ""
    key_B: str = ""
    key_B_bias: str | None = None

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def layer(self) -> int | None:
        """The first numbered path segment (transformer block index), or None."""
        m = _LAYER_IDX.search("." + self.name)
        return int(m.group(1)) if m else None

    @property
    def module_type(self) -> str:
        """The last path segment, e.g. ``q_proj``."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def num_params(self) -> int:
        n = self.lora_A.numel() + self.lora_B.numel()
        return n + (self.lora_B_bias.numel() if self.lora_B_bias is not None else 0)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``ΔW = s·B@A`` in (out, in) orientation. For tests and small modules only."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter held in memory: its config, its LoRA modules and any other tensors."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # set by edits (prune/project): written next to the weights as safeprune.json
    manifest: dict[str, Any] | None = None
    # set by safeprune.prune()/project(): the scores and the selection that produced this adapter
    scores: Any = None
    selection: Any = None

    # -- views ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors as PEFT saves them (keys unchanged from the input)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            out[m.key_A] = m.lora_A
            out[m.key_B] = m.lora_B
            if m.lora_B_bias is not None and m.key_B_bias:
                out[m.key_B_bias] = m.lora_B_bias
        out.update(self.extra_tensors)
        return out

    def with_modules(self, modules: dict[str, LoraModule], **changes: Any) -> "LoraAdapter":
        return replace(self, modules=modules, **changes)

    def save(self, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write a loadable PEFT adapter directory atomically (see :mod:`safeprune.writer`)."""
        from .writer import write_adapter

        return write_adapter(self, out_dir, force=force)


# -------------------------------------------------------------------------------------------------
# config helpers
# -------------------------------------------------------------------------------------------------

def pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first pattern (in dict order) whose regex matches a dotted
    suffix of the module path wins."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if _pattern_matches(key, module_name):
            return value
    return default


def scaling_for(alpha: float, r: int, use_rslora: bool) -> float:
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _read_config(path: Path) -> dict[str, Any]:
    from .safety_io import check_inside

    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        if cfg_path.is_symlink():
            raise InputError(f"{CONFIG_NAME} is a broken symbolic link", cfg_path)
        raise InputError(f"missing {CONFIG_NAME}: not a PEFT adapter directory", path)
    check_inside(cfg_path, path)
    try:
        if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
            raise InputError(f"implausibly large ({cfg_path.stat().st_size} bytes) for an adapter config", cfg_path)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not valid JSON ({_short(e)})", cfg_path) from None
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", cfg_path) from None
    if not isinstance(cfg, dict):
        raise InputError("expected a JSON object", cfg_path)
    return cfg


def validate_config(cfg: dict[str, Any], cfg_path: Path | str) -> None:
    """Refuse what safeprune does not support, with a message that says why."""
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedError(
            f"peft_type {peft_type!r} is not supported (safeprune reads LoRA adapters only)", cfg_path
        )
    if cfg.get("use_dora"):
        raise UnsupportedError(
            "DoRA adapters (use_dora=true) are not supported: their update is not low-rank and zeroing "
            "lora_B does not remove it (see docs/methods.md)",
            cfg_path,
        )
    if cfg.get("target_parameters"):
        raise UnsupportedError("adapters with target_parameters (MoE parameter LoRA) are not supported", cfg_path)
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InputError(f"'r' must be a positive integer, got {r!r}", cfg_path)
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"'lora_alpha' must be a number, got {alpha!r}", cfg_path)
    for key in ("rank_pattern", "alpha_pattern"):
        val = cfg.get(key) or {}
        if not isinstance(val, dict):
            raise InputError(f"'{key}' must be an object, got {type(val).__name__}", cfg_path)
        for k, v in val.items():
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error:
                raise InputError(f"'{key}' key {k!r} is not a valid regular expression", cfg_path) from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise InputError(f"'{key}[{k!r}]' must be a positive number, got {v!r}", cfg_path)
            if key == "rank_pattern" and not isinstance(v, int):
                raise InputError(f"'{key}[{k!r}]' must be an integer, got {v!r}", cfg_path)
    for key in ("use_rslora", "fan_in_fan_out"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise InputError(f"'{key}' must be true or false, got {cfg[key]!r}", cfg_path)
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        raise InputError(f"'target_modules' must be a string or a list, got {type(tm).__name__}", cfg_path)
    if isinstance(tm, list) and not all(isinstance(x, str) for x in tm):
        raise InputError("'target_modules' must be a list of strings", cfg_path)


# -------------------------------------------------------------------------------------------------
# tensors
# -------------------------------------------------------------------------------------------------

def _load_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    from .safety_io import check_safetensors_header

    check_safetensors_header(file)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except InputError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        raise InputError(f"cannot read safetensors file ({_short(e)})", file) from None
    return tensors, meta


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): its restricted unpickler builds tensors and plain containers only
    and refuses every other global (os.system, builtins.eval, ...), so nothing in the file is executed."""
    import pickle
    import warnings

    from .safety_io import check_regular_file

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
        raise InputError(f"not a readable torch pickle ({_short(e)})", file) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError("pickle does not contain a flat dict of tensors", file)
    return sd


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    """``base_model.model.X.lora_A.weight`` -> ("X", "lora_A", "weight"); None for other keys."""
    m = _LORA_KEY.match(key)
    if not m:
        return None
    path = m.group("path")
    if path.startswith(PEFT_PREFIX):
        path = path[len(PEFT_PREFIX):]
    return path, m.group("kind"), m.group("param")


def _check_finite(t: torch.Tensor, key: str, file: Path) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"tensor {key!r} contains {bad}", file)


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
        r_cfg = pattern_value(cfg.get("rank_pattern"), path, r_default)
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
        alpha = float(pattern_value(cfg.get("alpha_pattern"), path, alpha_default))
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
    cfg = _read_config(p)
    validate_config(cfg, p / CONFIG_NAME)
    st = p / WEIGHTS_NAME
    pk = p / PICKLE_WEIGHTS_NAME
    meta: dict[str, str] = {}
    from .safety_io import check_inside

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


def _pattern_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def warn_unmatched_patterns(cfg: dict[str, Any], modules: dict[str, LoraModule], cfg_path: Path | str) -> None:
    """Warn about ``rank_pattern``/``alpha_pattern`` keys that match no LoRA module of the adapter.

    PEFT itself accepts such keys (it only consults a pattern when a module matches it), and every module
    that *is* present has had its rank checked against its tensors, so an unmatched key cannot change a
    score: it is reported as a warning, not an error.
    """
    import warnings

    from .errors import SafepruneWarning

    for key in ("rank_pattern", "alpha_pattern"):
        for pat in (cfg.get(key) or {}):
            if not any(_pattern_matches(pat, name) for name in modules):
                warnings.warn(SafepruneWarning(f"'{key}' entry {pat!r} matches no LoRA module; ignored", cfg_path),
                              stacklevel=2)


def iter_module_types(modules: Iterable[LoraModule]) -> list[str]:
    seen: dict[str, None] = {}
    for m in modules:
        seen.setdefault(m.module_type, None)
    return list(seen)
