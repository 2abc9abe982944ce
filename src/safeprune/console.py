"""The ``safeprune`` executable's entry point.

Loading the command line imports torch, transformers and peft (seconds). Ctrl-C during that time must end
like Ctrl-C anywhere else — one line, exit 130, nothing written — not with a traceback from an import; so
this module imports nothing heavy itself and the package's API is loaded lazily (``safeprune/__init__.py``).
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    def is_interrupt(e: BaseException) -> bool:  # until the recording handler is in place
        return isinstance(e, KeyboardInterrupt)

    try:
        from .io.commit import is_interrupt, note_sigint  # light: no torch

        signal.signal(signal.SIGINT, note_sigint)
        from .cli import main as run
    except (KeyboardInterrupt, ImportError) as e:  # a Ctrl-C inside a C extension's import is an ImportError
        if not is_interrupt(e):
            raise
        sys.stderr.write("interrupted: no output was written\n")
        sys.exit(130)
    try:
        run()
    finally:  # the work is done (or refused): a late Ctrl-C must not turn the exit status into a kill
        signal.signal(signal.SIGINT, signal.SIG_IGN)
