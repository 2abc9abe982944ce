"""The scoring methods' options, declared once, in a module that imports no model library.

Each method's :class:`Param` tuple lives here under the method's name (:data:`PARAMETERS`) and its
``Scorer`` subclass sets ``parameters = PARAMETERS[name]``: the scorer validates and resolves them, and the
command line builds one flag per option from them (:mod:`safeprune.cli.options`) — so ``safeprune scan
--help`` can list every method's flags without importing torch (a test checks that the registered scorers
and this table agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UsageError

# entries of V = aligned − unaligned formed at a time (4 MiB in float32); the same as weights.pair.BLOCK_ELEMS
BLOCK_ELEMS = 1 << 20
SPLORA_MODES = ("sound", "official", "official-first")


@dataclass(frozen=True)
class Param:
    """One option of a scoring method, declared once.

    ``check(value)`` returns an error message (the option is refused with a UsageError) or None.
    ``flag`` is the CLI flag (default ``--name-with-dashes``); ``cli=False`` keeps an option for the
    Python API only. Methods that declare the same flag share it on the command line (``--seed``)."""

    name: str
    type: Any
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    flag: str | None = None
    cli: bool = True

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> None:
        msg = self.check(value) if self.check is not None else None
        if msg:
            raise UsageError(msg)


DDI = (
    # validated by parse_subspace_dim in setup(), which says what is wrong
    Param("subspace_dim", str, "r", "DDI subspace dimension t: 'r', '2r' or an integer."),
    Param(
        "oversample",
        int,
        8,
        "DDI range-finder oversampling.",
        check=lambda v: f"--oversample must be >= 0, got {v}" if v < 0 else None,
    ),
    Param(
        "power_iters",
        int,
        2,
        "DDI range-finder power iterations.",
        check=lambda v: f"--power-iters must be >= 0, got {v}" if v < 0 else None,
    ),
    Param(
        "subspace",
        str,
        "column",
        "DDI: 'column' (sound default) or 'row' (paper wording).",
        check=lambda v: None if v in ("column", "row") else f"--subspace must be 'column' or 'row', got {v!r}",
    ),
    Param(
        "magnitude",
        str,
        "norm",
        "DDI magnitude term: 'norm' (M/(1+M)) or 'raw' (M).",
        check=lambda v: None if v in ("norm", "raw") else f"--magnitude must be 'norm' or 'raw', got {v!r}",
    ),
    Param(
        "reuse_subspace",
        bool,
        False,
        "Paper-faithful: reuse one subspace per module type and shape (off: each module uses its own W0).",
    ),
    Param(
        "exact_subspace",
        bool,
        False,
        "DDI: W0's subspace from a full SVD instead of the randomized range finder (exact; slow for large models).",
    ),
    Param(
        "eps",
        float | None,
        None,
        "Absolute ε (paper: 1e-6). Default: relative 1e-12·tr(G).",
        check=lambda v: (
            None if v is None or (v >= 0 and math.isfinite(v)) else f"--eps must be a non-negative number, got {v}"
        ),
    ),
    Param("seed", int, 0, "Seed of the randomized range finder."),
    Param(
        "matmul_dtype",
        str,
        "auto",
        "Dtype of the W0 matmuls: 'auto' (bf16 where the CPU has it) or 'float32'.",
        check=lambda v: None if v in ("auto", "float32") else f"matmul_dtype must be 'auto' or 'float32', got {v!r}",
        cli=False,
    ),
)

SAFELORA = (
    Param(
        "block_elems",
        int,
        BLOCK_ELEMS,
        "Entries of V = aligned − unaligned formed at a time.",
        cli=False,
        check=lambda v: f"block_elems must be >= 1, got {v}" if v < 1 else None,
    ),
)

SPLORA = (
    Param(
        "mode",
        str,
        "sound",
        "SPLoRA E-DIEM: 'sound' (null of rotated updates), 'official' (public code, HEAD "
        "rule) or 'official-first' (first-commit rule).",
        flag="--splora-mode",
        check=lambda v: (
            None if v in SPLORA_MODES else f"--splora-mode must be one of {', '.join(SPLORA_MODES)}, got {v!r}"
        ),
    ),
    Param(
        "null_samples",
        int,
        32,
        "SPLoRA sound mode: rotated updates in the reference distribution.",
        check=lambda v: f"--null-samples must be >= 4 (quartiles need a few samples), got {v}" if v < 4 else None,
    ),
    Param("seed", int, 0, "Seed of the randomized range finder."),
    Param("block_elems", int, BLOCK_ELEMS, "Entries of V = aligned − unaligned formed at a time.", cli=False),
)

# every registered scoring method's options, by method name
PARAMETERS: dict[str, tuple[Param, ...]] = {"ddi": DDI, "safelora": SAFELORA, "splora": SPLORA}
