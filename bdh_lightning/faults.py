"""Crash safety: checkpoints written atomically, SIGTERM and Ctrl-C stop with a checkpoint, a NaN or infinite
loss stops training without touching the last good checkpoint, and checkpoint files are read without running
code from them.

Every failure here ends as one exception with a one-line message; `cli.main` prints it and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import sys
import threading
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from .model import BDH, BDHConfig


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line saying why and what to do."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weights; the message names the step and the last good checkpoint."""


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped training at a step boundary, after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a Lightning checkpoint, unpickled with weights_only=True: tensors and plain values only,
    so a file carrying a pickled function or object is refused instead of run. Tensors stay memory-mapped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        payload = re.search(r"GLOBAL (\S+)", str(error))
        if payload:
            raise CheckpointError(
                f"checkpoint {path} contains a pickled reference to {payload[1]}, which loading would run; refused "
                "(only tensors and plain values are loaded): use a checkpoint written by `fit`"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint; use another one") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception:  # torch raises RuntimeError, EOFError, ValueError... for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not a PyTorch checkpoint; use another one "
            "(e.g. an earlier .ckpt in the same checkpoints/ folder)"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict); use one written by `fit`")
    return checkpoint


def check_model_shape(checkpoint: dict, path: str | Path, model_args: dict) -> None:
    """Raise CheckpointError unless the checkpoint's weights have the shapes of the model `model_args` describe."""
    config = BDHConfig(**{f.name: model_args[f.name] for f in dataclasses.fields(BDHConfig)})
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {f"model.{name}": tuple(t.shape) for name, t in BDH(config).state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items() if torch.is_tensor(t)}
    if not expected.keys() <= saved.keys():
        raise CheckpointError(f"checkpoint {path} holds no BDH weights ({sorted(saved)[:3]}...); use one written by `fit`")
    for name, shape in expected.items():
        if saved[name] != shape:
            trained = checkpoint.get("hyper_parameters", {})
            settings = ", ".join(f"{k}={trained[k]}" for k in ("n_embd", "n_head", "mlp_internal_dim_multiplier") if k in trained)
            config_yaml = Path(path).parent.parent / "config.yaml"
            hint = f" (e.g. --config {config_yaml})" if config_yaml.is_file() else ""
            raise CheckpointError(
                f"checkpoint {path} holds a model of another shape: {name} is {saved[name]} there but {shape} with "
                f"these settings; use the model settings it was trained with{f' ({settings})' if settings else ''}{hint}"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to `<name>.part` in its own folder, syncs it to disk, then renames it over `<name>`.

    A kill or power cut during the write leaves the previous file whole. (Lightning's writer buffers the whole
    checkpoint in memory, writes it to the system temp folder and moves it into place: a copy, not a rename,
    whenever that folder is on another file system, and never synced to disk.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


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
