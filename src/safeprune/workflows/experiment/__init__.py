"""``safeprune run``: experiment files, cached stages, analysis against random controls, and the report."""

from .config import ExperimentConfig, load_config
from .estimate import estimate_experiment, estimate_lines
from .run import RunResult, run_experiment

__all__ = ["ExperimentConfig", "load_config", "RunResult", "run_experiment", "estimate_experiment", "estimate_lines"]
