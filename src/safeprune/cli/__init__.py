"""The command line: a thin layer over the Python API. ``app`` holds the Typer application and the error
boundary, ``options`` the shared flags (and the scoring methods' flags, built from their declarations),
``render`` the tables and side files; every other file here is one command."""

from . import act, demo, eval, finetune, inspect, project, prune, run, scan, search  # noqa: F401  (register the commands)
from .app import app, main

__all__ = ["app", "main"]
