"""The fine-tuning progress display: a rich bar on a terminal, one line a step in a log."""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

from ..io.progress import make_progress


def progress_callback(enabled: bool):
    """A TrainerCallback that shows a rich bar with the loss on a terminal and prints one line a step to a
    log (a pipe, a file) so ``nohup ... > log`` records the loss curve as it goes."""

    class Progress(TrainerCallback):
        def __init__(self):
            self.prog = None
            self.task = None
            self.t0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            if enabled and state.is_world_process_zero:
                self.prog = make_progress(True)
                self.prog.start()
                self.task = self.prog.add_task(
                    "fine-tuning LoRA", total=state.max_steps, completed=state.global_step, module=""
                )

        def on_log(self, args, state, control, logs=None, **kw):
            if not (enabled and state.is_world_process_zero) or not logs or "loss" not in logs:
                return
            msg = f"loss {logs['loss']:.4f}"
            if self.prog is not None and not self.prog.disable:
                self.prog.update(self.task, completed=state.global_step, module=msg)
            else:
                el = time.monotonic() - self.t0
                print(
                    f"step {state.global_step}/{state.max_steps} epoch {logs.get('epoch', 0):.2f} {msg} "
                    f"grad_norm {logs.get('grad_norm', float('nan')):.3f} lr {logs.get('learning_rate', 0):.3g} "
                    f"elapsed {el:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )

        def on_train_end(self, args, state, control, **kw):
            if self.prog is not None:
                self.prog.stop()

    return Progress()
