"""``adapter_config.json``: reading it (bounded), validating it, and PEFT's per-module rank/alpha rules
(``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against a dotted suffix of the module path)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError, SafepruneWarning, UnsupportedError
from ..io.files import check_inside
from ..io.jsonio import loads_bounded
from ..io.patterns import check_pattern, suffix_match
from .names import CONFIG_NAME

_MAX_CONFIG_BYTES = 16 * 1024 * 1024


def short_error(e: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        if cfg_path.is_symlink():
            raise InputError(f"{CONFIG_NAME} is a broken symbolic link", cfg_path)
        raise InputError(f"missing {CONFIG_NAME}: not a PEFT adapter directory", path)
    check_inside(cfg_path, path)
    try:
        if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
            raise InputError(f"implausibly large ({cfg_path.stat().st_size} bytes) for an adapter config", cfg_path)
        cfg = loads_bounded(cfg_path.read_text(encoding="utf-8"), cfg_path, CONFIG_NAME)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not valid JSON ({short_error(e)})", cfg_path) from None
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", cfg_path) from None
    if not isinstance(cfg, dict):
        raise InputError("expected a JSON object", cfg_path)
    return cfg


def pattern_value(
    patterns: dict[str, Any] | None,
    module_name: str,
    default: Any,
    where: Any = CONFIG_NAME,
    what: str = "rank_pattern",
) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first pattern (in dict order) whose regex matches a dotted
    suffix of the module path wins."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if suffix_match(key, module_name, where, what):
            return value
    return default


def scaling_for(alpha: float, r: int, use_rslora: bool) -> float:
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


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
            check_pattern(k, cfg_path, key)
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


def warn_unmatched_patterns(cfg: dict[str, Any], modules: dict[str, Any], cfg_path: Path | str) -> None:
    """Warn about ``rank_pattern``/``alpha_pattern`` keys that match no LoRA module of the adapter.

    PEFT itself accepts such keys (it only consults a pattern when a module matches it), and every module
    that *is* present has had its rank checked against its tensors, so an unmatched key cannot change a
    score: it is reported as a warning, not an error.
    """

    for key in ("rank_pattern", "alpha_pattern"):
        for pat in cfg.get(key) or {}:
            if not any(suffix_match(pat, name, cfg_path, key) for name in modules):
                warnings.warn(
                    SafepruneWarning(f"'{key}' entry {pat!r} matches no LoRA module; ignored", cfg_path), stacklevel=2
                )
