"""The command line: a thin layer over the Python API. ``app`` holds the Typer application and the error
boundary, ``options`` the shared flags (and the scoring methods' flags, built from their declarations),
``render`` the tables and side files; every other file here is one command, imported when that command is
used (``app.COMMANDS`` lists them, so that ``safeprune --help`` loads no model library)."""

from .app import COMMANDS, app, main

__all__ = ["COMMANDS", "app", "main"]
