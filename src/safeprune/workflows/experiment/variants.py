"""What a study evaluates (:class:`Variant`) and the keys that make each stage's cached output reusable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...eval.backends import adapter_fingerprint

Log = Callable[[str], None]


@dataclass
class Variant:
    name: str  # "base", "lora", "lora:ddi@10", "lora:random-s0@10"
    adapter: str | None  # the adapter it derives from (None: the base model)
    method: str | None = None  # method label, "random", or None (the adapter itself / the base)
    tau: int | None = None
    seed: int | None = None
    path: str | None = None  # PEFT directory
    action: str | None = None
    selected: list[str] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)  # auto-τ rules that resolved to this τ
    params_kept: float = 1.0  # share of the adapter's LoRA parameters kept
    modules_kept: int | None = None
    # safeprune repair variants (``repairs:``): the edit strength written, the share of ΔW energy removed,
    # and for an energy-matched random control the repaired variant it matches ("lora:repair@t75")
    strength: float | None = None
    energy_removed: float | None = None
    control_of: str | None = None

    @property
    def is_repair(self) -> bool:
        return self.strength is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def variant_name(adapter: str, method: str, tau: int) -> str:
    return f"{adapter}:{method}@{tau}"


def random_name(adapter: str, seed: int, tau: int) -> str:
    return f"{adapter}:random-s{seed}@{tau}"


def repair_name(adapter: str, repair: str, strength: float, seed: int | None = None) -> str:
    """ "lora:repair@t75" (strength 0.75, in percent), and its random control "lora:repair-random-s1@t75". No
    '.' in the name: the evaluation loads each variant as a PEFT adapter of that name, and PEFT refuses dots."""
    pct = f"{100 * strength:g}".replace(".", "p")
    return f"{adapter}:{repair}" + (f"-random-s{seed}" if seed is not None else "") + f"@t{pct}"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_identity(p: str | None) -> Any:
    """A cheap identity of a model path for cache keys: every file's name, size and mtime (not content)."""
    if p is None:
        return None
    q = Path(p)
    if not q.exists():
        return p  # hub id
    files = [q] if q.is_file() else sorted(f for f in q.rglob("*") if f.is_file())
    return [str(q.resolve())] + [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]


def adapter_identity(p: str) -> str:
    return adapter_fingerprint(p)


def read_key(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def fresh(dir_or_file: Path, key_path: Path, key: dict[str, Any]) -> bool:
    return dir_or_file.exists() and read_key(key_path) == json.loads(json.dumps(key, default=str))


# -- finetune --------------------------------------------------------------------------------------
