"""The options of ``safeprune repair`` (:mod:`safeprune.workflows.repair`), in a module that imports no model
library: ``safeprune repair --help`` shows their defaults without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

METHODS = ("gate", "greedy")
DEFAULT_METHOD = "gate"


@dataclass
class RepairOptions:
    method: str = DEFAULT_METHOD
    steps: int = 10
    lr: float = 0.2
    per_round: int = 48
    lambda_task: float = 0.3
    lambda_over: float = 0.3
    n_harmful: int = 32
    n_harmless: int = 16
    n_task: int = 8
    n_check: int = 32
    n_task_check: int = 16
    target_tokens: int = 8
    max_length: int = 200
    max_utility_drop: float = 1.0
    max_over_refusal_rise: float = 5.0
    target_asr: float | None = None
    refusal: str | None = None
    seed: int = 0
    threads: int = 1
    batch_size: int = 16
    # activation checkpointing in the fit (None: on for bases of a billion parameters or more)
    checkpoint: bool | None = None
    device: str = "cpu"  # where the fit and the check generations run (cpu, cuda, cuda:N, mps)
    # where the checkpointed layers' inputs wait for the backward pass: none (the device), cpu (host memory,
    # from an accelerator) or disk (temporary files): with cpu/disk the fit's memory does not grow with the layers
    offload: str = "none"

    def check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown repair method {self.method!r}; known: {', '.join(METHODS)}")
        for k in (
            "steps",
            "per_round",
            "n_harmful",
            "n_harmless",
            "n_task",
            "n_check",
            "n_task_check",
            "target_tokens",
            "max_length",
            "threads",
            "batch_size",
        ):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"--{k.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for k in ("lr", "lambda_task", "lambda_over", "max_utility_drop", "max_over_refusal_rise"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf") and v >= 0):
                raise UsageError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise UsageError("--lr must be > 0")
        if self.device != "cpu":  # before any model is loaded (the check imports torch)
            from ..io.devices import resolve_device

            resolve_device(self.device)
        from ..io.offload import check_offload

        check_offload(self.offload, self.device, self.checkpoint)
        if self.target_asr is not None and not (0 <= self.target_asr <= 100):
            raise UsageError(f"--target-asr is a percentage in [0, 100], got {self.target_asr!r}")
