"""What a run prints, to stderr from global rank 0, one write per line: a header before training, progress in
steps, a closing block. Lightning's own notices are filtered (`quiet`) unless `--no_quiet` is given.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar

from .devices import device_memory

# Lightning's notices that say nothing about this run (each checked against Lightning 2.6's wording).
QUIET_MESSAGES = (
    r".*`IterableDataset` has `__len__` defined.*",
    r".*The dirpath has changed from.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
    r".*`flops_per_batch`.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Precision .* is not supported by the model summary.*",
)


def quiet() -> None:
    """Silence the framework's noise (warnings from its own modules, its info logs); keep the user's warnings."""
    for pattern in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    for package in ("lightning", "pytorch_lightning", "torch", "jsonargparse", "torchmetrics"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=rf"{package}(\..*)?")
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{package}(\..*)?")
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: ...", "💡 Tip: ...", seeds


# On a terminal a model's control bytes (ESC starts escape sequences; CR, BS and C1 controls redraw text) are
# shown as \xNN, and so are those in a file name echoed in a message: only newline and tab pass through.
CONTROL_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F] if code not in (0x09, 0x0A)},
    **{code: "".join(f"\\x{b:02x}" for b in chr(code).encode()) for code in range(0x80, 0xA0)},
}


def shown(text: str) -> str:
    """Text as it is safe to print on a terminal: control characters other than newline and tab escaped, and lone
    surrogates (bytes a shell argument held that were not UTF-8) as \\udcNN."""
    return text.translate(CONTROL_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")


def say(line: str) -> None:
    """One line to stderr in a single write (the lines of several ranks never interleave), control bytes escaped."""
    sys.stderr.write(shown(line) + "\n")
    sys.stderr.flush()


def abandon_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's flush at exit cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def rate(bytes_per_second: float) -> str:
    for unit, size in (("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= size:
            return f"{bytes_per_second / size:.1f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def bytes_per_step(trainer, datamodule) -> int:
    """The global batch in bytes: devices x nodes x batch x accumulation x block."""
    return trainer.world_size * datamodule.batch_size * trainer.accumulate_grad_batches * datamodule.block_size


class RunSummary(Callback):
    """The run's header and its closing block (global rank 0 only), printed whether or not progress is shown."""

    def __init__(self, header_lines: list[str] | None = None):
        super().__init__()
        self.header_lines = header_lines or []  # lines the CLI knows before the trainer exists (kernel, memory)
        self.start_time: float | None = None  # None until training starts: a fit that trains nothing never starts
        self.start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time = time.perf_counter()
        self.start_step = trainer.global_step
        log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it (one rank alone would wait forever)
        if trainer.is_global_zero:
            for line in self.header(trainer, pl_module, log_dir):
                say(line)

    def header(self, trainer, pl_module, log_dir: str | None) -> list[str]:
        data = trainer.datamodule
        c = pl_module.config
        callback = trainer.checkpoint_callback
        run_dir = log_dir or trainer.default_root_dir
        lines = [
            f"run        {run_dir}" + (f"   (checkpoints: {callback.dirpath})" if callback and callback.dirpath else "")
        ]
        device = trainer.strategy.root_device
        nodes = f" x {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
        lines.append(f"device     {trainer.num_devices} x {device.type}{nodes}, precision {trainer.precision}")
        lines.append(
            f"model      {c.num_parameters:,} parameters: {c.n_layer} layers, D {c.n_embd}, {c.n_head} heads x "
            f"N {c.neurons_per_head} neurons, dropout {c.dropout}"
        )
        if data is not None:
            per_step = bytes_per_step(trainer, data)
            lines.append(
                f"batch      {trainer.world_size} device(s) x {data.batch_size} windows x {trainer.accumulate_grad_batches} "
                f"accumulated x {data.block_size} bytes = {per_step:,} bytes per optimizer step"
            )
            describe = getattr(data, "describe", None)
            if callable(describe):
                lines.append(f"corpus     {describe().removeprefix('corpus ')}")
        lines.extend(self.header_lines)
        todo = (trainer.max_steps - trainer.global_step) if trainer.max_steps and trainer.max_steps > 0 else None
        if todo is not None:
            resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
            lines.append(
                f"training   {todo} steps to step {trainer.max_steps}{resumed}; validation every "
                f"{trainer.val_check_interval} batches"
            )
        return lines

    # -- closing -------------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:  # after every on_train_end: the final last.ckpt is written
        log_dir = trainer.log_dir  # on every rank, as above
        if trainer.is_global_zero:
            for line in self.closing(trainer, log_dir):
                say(line)

    def closing(self, trainer, log_dir: str | None) -> list[str]:
        started = self.start_time is not None
        elapsed = time.perf_counter() - self.start_time if started else 0.0
        done = trainer.global_step - self.start_step if started else 0
        lines = [f"done       {done} steps (now at step {trainer.global_step}) in {duration(elapsed)}"]
        if done and elapsed > 0 and trainer.datamodule is not None:
            lines[-1] += f", {rate(done * bytes_per_step(trainer, trainer.datamodule) / elapsed)} on average"
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            lines.append(f"val/loss   {float(val):.4f}   val/bpb {float(val) / math.log(2):.4f}")
        callback = trainer.checkpoint_callback
        last = ""
        if callback is not None:
            last = callback.last_model_path or (
                os.path.join(callback.dirpath, "last.ckpt")
                if callback.dirpath and os.path.exists(os.path.join(callback.dirpath, "last.ckpt"))
                else ""
            )
            if callback.best_model_path:
                lines.append(f"best       {callback.best_model_path}")
            if last:
                lines.append(f"last       {last}")
        if log_dir:
            logs = Path(log_dir).parent
            lines.append(f"next       tensorboard --logdir {shlex.quote(str(logs))}")
        if last:
            lines.append(
                f'           python -m bdh_lightning generate --ckpt_path {shlex.quote(last)} --prompt "To be"'
            )
        return lines


class RunReport(RunSummary, ProgressBar):
    """The header and closing block, and between them the run's progress in optimizer steps.

    On a terminal the progress is one line redrawn in place; in a log file (stderr not a TTY) it is one
    line every `trainer.log_every_n_steps` steps. Validation prints one line with its loss.
    """

    def __init__(self, header_lines: list[str] | None = None):
        super().__init__(header_lines)
        self._enabled = True
        self.tty = sys.stderr.isatty()
        self.last_time = 0.0
        self.val_loss: float | None = None
        self.redrawn = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def active(self, trainer) -> bool:
        return self._enabled and trainer.is_global_zero and not trainer.sanity_checking

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.last_time = self.start_time

    # -- progress ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active(trainer) or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        every = max(1, trainer.log_every_n_steps)
        # Reading the loss syncs the GPU: a terminal is redrawn at most twice a second, a file every log interval.
        redraw = self.tty and time.perf_counter() - self.last_time >= 0.5
        if redraw or step % every == 0 or step == trainer.max_steps:
            self.last_time = time.perf_counter()
            self.show(trainer, step)

    def show(self, trainer, step: int) -> None:
        now = time.perf_counter()
        done = step - self.start_step
        elapsed = now - self.start_time
        speed = done * bytes_per_step(trainer, trainer.datamodule) / elapsed if elapsed > 0 and done else 0.0
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        left = (total - step) * elapsed / done if total and done else None
        metrics = trainer.progress_bar_metrics
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.4f}")
        if speed:
            parts.append(rate(speed))
        if left is not None:
            parts.append(f"{duration(left)} left")
        line = "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
            self.redrawn = True
        else:
            say(line)

    def end_redraw(self) -> None:
        if self.redrawn:
            sys.stderr.write("\n")
            self.redrawn = False

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not self.active(trainer) or loss is None:
            return
        self.val_loss = float(loss)
        if trainer.state.fn == "fit":
            self.end_redraw()
            say(f"step {trainer.global_step}: val/loss {self.val_loss:.4f}, val/bpb {self.val_loss / math.log(2):.4f}")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.end_redraw()


def memory_line(predicted: int, device: torch.device) -> str:
    """'memory     predicted peak 1.20 GiB of 23.4 GiB available RAM (a prediction until measured)'."""
    have, what = device_memory(device)
    place = f" ({what} {format_bytes(have)})" if have else ""
    return f"memory     predicted peak {format_bytes(predicted)}{place}; a prediction, not yet measured on this device"
