"""``safeprune.run_experiment``: one command from an experiment file to a report."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...errors import OutputError, UsageError
from ...eval.results import dumps
from ...io.files import write_text_atomic
from .analysis import analyse
from .config import ExperimentConfig, load_config
from .eval_stages import stage_evaluate, stage_latency
from .repair_stage import repair_summaries, stage_repair
from .report import build_report
from .stages import stage_edit, stage_finetune, stage_score


@dataclass
class RunResult:
    out_dir: Path
    analysis: dict[str, Any]
    report_md: Path
    report_html: Path
    timing: dict[str, float]


def _default_log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_experiment(
    config: ExperimentConfig | str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    backend=None,
    stop_after: str | None = None,
    command: str | None = None,
) -> RunResult:
    """Run every stage of an experiment (each reusing its cached outputs when its inputs are unchanged)
    and write ``report.md``, ``report.html``, ``analysis.json`` and the plots into ``out_dir``.

    ``backend``: a prebuilt generation backend (tests); ``stop_after``: 'score', 'edit' or 'evaluate'."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if stop_after not in (None, "finetune", "score", "edit", "evaluate"):
        raise UsageError(f"stop_after must be finetune, score, edit or evaluate, not {stop_after!r}")
    out = Path(out_dir)
    _check_out(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    log = log or _default_log
    write_text_atomic(out / "experiment.resolved.json", cfg.model_dump_json(indent=1))
    timing: dict[str, float] = {}

    def timed(name: str, fn, *a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        timing[name] = time.perf_counter() - t0
        return r

    t_all = time.perf_counter()
    cpu0 = time.process_time()
    adapters = dict(cfg.adapters)
    adapters.update(timed("finetune", stage_finetune, cfg, out, log, progress))
    if stop_after == "finetune":
        return RunResult(out, {}, out / "report.md", out / "report.html", timing)
    tables = timed("score", stage_score, cfg, adapters, out, log, progress)
    if stop_after == "score":
        return RunResult(out, {}, out / "report.md", out / "report.html", timing)
    variants, auto_info = timed("edit", stage_edit, cfg, adapters, tables, out, log)
    if cfg.repairs:
        variants += timed("repair", stage_repair, cfg, adapters, out, log, progress)
    write_text_atomic(out / "variants.json", json.dumps([v.to_dict() for v in variants], indent=1))
    if stop_after == "edit":
        return RunResult(out, {}, out / "report.md", out / "report.html", timing)
    res, sets, be = timed("evaluate", stage_evaluate, cfg, variants, out, log, progress, backend)
    latency = timed("latency", stage_latency, cfg, variants, sets, out, log, be)
    t0 = time.perf_counter()
    analysis = analyse(res.results, res.items, variants, n_boot=cfg.evaluation.bootstrap, seed=cfg.seed)
    analysis["auto_tau"] = auto_info
    if cfg.repairs:
        for a, fits in repair_summaries(out, cfg, list(adapters)).items():
            analysis["adapters"].setdefault(a, {})["repair_fits"] = fits
    analysis["timing"] = timing
    timing["total (before the report)"] = time.perf_counter() - t_all
    write_text_atomic(out / "analysis.json", dumps(analysis))
    paths = build_report(cfg, out, analysis, variants, tables, auto_info, latency, res.results, timing, command=command)
    timing.pop("total (before the report)")
    timing["report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_all
    timing["cpu_total"] = time.process_time() - cpu0  # CPU seconds of this process (all threads)
    analysis["timing"] = timing
    write_text_atomic(out / "analysis.json", dumps(analysis))
    log(f"report: {paths['md']} and {paths['html']} (total {timing['total']:.0f} s)")
    return RunResult(out, analysis, paths["md"], paths["html"], timing)


def _check_out(out: Path, cfg: ExperimentConfig) -> None:
    """The output directory must not be (or lie inside) an input."""
    res = out.resolve()
    for p in [cfg.base, cfg.aligned, cfg.unaligned, *cfg.adapters.values()]:
        if not p:
            continue
        q = Path(p)
        if q.exists():
            q = q.resolve()
            if res == q or q in res.parents:
                raise OutputError("the output directory is inside an input model/adapter; choose another", out)
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", out)
