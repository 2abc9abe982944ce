"""Everything ``finetune`` refuses before it loads a model, and where an unfinished run lives."""

from __future__ import annotations

import re
from pathlib import Path

from transformers.trainer_utils import SchedulerType

from ..errors import OutputExistsError, UsageError
from ..weights.resolve import resolve_model

TRUNCATED = ("drop-long", "drop", "keep")
SCHEDULERS = tuple(t.value for t in SchedulerType)


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    best = None
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and d.is_dir() and (d / "trainer_state.json").is_file():
                if best is None or int(m.group(1)) > best[0]:
                    best = (int(m.group(1)), d)
    return None if best is None else best[1]


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished run lives (checkpoints included) until it is renamed to ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def check_finetune(base: Path, out: Path, work: Path, resume: bool, force: bool, **v) -> Path | None:
    """Refuse bad settings and clashing outputs before anything is loaded; the checkpoint to resume from."""
    resolve_model(str(base))  # a model transformers can load (directory, .gguf, hub id), or a one-line error
    for name, lo in (("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 2), ("warmup_steps", 0)):
        if v[name] < lo:
            raise UsageError(f"{name} must be at least {lo} (got {v[name]})")
    if v["save_steps"] is not None and v["save_steps"] < 1:
        raise UsageError("save_steps must be at least 1")
    if not (0.0 <= v["dropout"] < 1.0):
        raise UsageError(f"dropout must be in [0, 1) (got {v['dropout']})")
    if v["max_steps"] is None and not v["epochs"] > 0:
        raise UsageError(f"epochs must be positive (got {v['epochs']})")
    if not v["lr"] > 0:
        raise UsageError(f"lr must be positive (got {v['lr']})")
    if v["lr_scheduler"] not in SCHEDULERS:
        raise UsageError(f"unknown lr_scheduler {v['lr_scheduler']!r} (one of: {', '.join(SCHEDULERS)})")
    if v["truncated"] not in TRUNCATED:
        raise UsageError(f"truncated must be one of {', '.join(TRUNCATED)} (got {v['truncated']!r})")
    if out.exists() and not force:
        raise OutputExistsError("output exists (use --force to replace it)", out)
    if resume:
        resume_from = find_checkpoint(work / "checkpoints")
        if resume_from is None:
            raise UsageError(f"--resume: no checkpoint in {work / 'checkpoints'} (run with --save-steps to write some)")
        return resume_from
    if work.exists() and not force:
        raise OutputExistsError(
            f"an unfinished run is in {work}: pass --resume to continue it or --force to start over", out
        )
    return None
