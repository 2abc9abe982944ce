"""``safeprune run``: experiment files, cached stages, analysis against random controls, and the report."""

from .config import ExperimentConfig, load_config
from .run import RunResult, run_experiment

__all__ = ["ExperimentConfig", "load_config", "RunResult", "run_experiment"]
