"""Crash safety during training: SIGTERM and Ctrl-C stop with a checkpoint, and a NaN or infinite loss stops
training without touching the last good checkpoint (checkpoint files themselves: `checkpoints.py`).

Every failure here ends as one exception with a one-line message; `cli.main` prints it and exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from .errors import NonFiniteError, TrainingInterrupted


def last_checkpoint_path(trainer) -> str | None:
    """Where this run keeps last.ckpt (None when checkpointing is off)."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.dirpath:
        return None
    return callback.last_model_path or os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)


class StopOnSignal(Callback):
    """SIGTERM (pre-emption, `scancel`, `kill`) or Ctrl-C: finish the current optimizer step, save last.ckpt, stop.

    Also saves last.ckpt when training ends at a step no checkpoint holds yet (max_steps between two saves).
    A second Ctrl-C aborts at once, without saving.
    """

    def __init__(self):
        self.signum: int | None = None
        self.saved_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed after Lightning's SIGTERM handler (set when fit starts), which would stop without saving;
        # Lightning puts the original handlers back when fit ends.
        self.signum = None
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)

    def request_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step (Ctrl-C again aborts without saving)\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # stop only between optimizer steps, where a checkpoint is complete
        # All ranks decide together: a signal that reached one rank stops every rank at the same step.
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        signum = self.signum or signal.SIGTERM
        how = signal.Signals(signum).name if self.signum else "a signal to another rank"
        path = last_checkpoint_path(trainer)
        if path is None:
            raise TrainingInterrupted(f"stopped by {how} after step {trainer.global_step}; checkpointing is off, nothing saved", signum)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(f"stopped by {how} after step {trainer.global_step}; saved {path}; continue with --ckpt_path last", signum)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        path = last_checkpoint_path(trainer)
        if path and trainer.checkpoint_callback.save_last and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(path, weights_only=False)


class StopOnNonFinite(Callback):
    """A NaN or infinite loss stops training before its optimizer step, and non-finite weights are never saved,
    so the last good checkpoint stays as it was."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # All ranks decide together, so no rank is left waiting in a collective.
        if trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False):
            raise NonFiniteError(f"training loss is {loss.item()} at step {trainer.global_step}; stopped without saving; {self.advice(trainer)}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        weights = [t for t in checkpoint["state_dict"].values() if torch.is_floating_point(t) and t.numel()]
        extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in weights])  # NaN propagates; 5x faster than isfinite
        if not torch.isfinite(extremes).all():
            raise NonFiniteError(f"the weights became NaN or infinite at step {trainer.global_step}; not saving them; {self.advice(trainer)}")

    @staticmethod
    def advice(trainer) -> str:
        callback = trainer.checkpoint_callback
        last_good = (callback.last_model_path or callback.best_model_path) if callback else ""
        remedy = "a lower model.learning_rate, or trainer.precision bf16-mixed or 32-true"
        if last_good:
            return f"the last good checkpoint is {last_good}; resume from it (--ckpt_path) with {remedy}"
        return f"no checkpoint was saved in this run; start again with {remedy}"
