"""Test-only callbacks, loaded by `python -m bdh_lightning fit --config` in the fault and distributed tests."""

import hashlib
import json
import math
import os

import torch
from lightning.pytorch.callbacks import Callback


def digest(windows: torch.Tensor) -> str:
    return hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16]


class WindowRecorder(Callback):
    """Writes `<out_dir>/rank<r>.json`: a digest of every training batch, and of every validation window, it saw,
    and the seed each training batch's dropout drew from."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.train, self.val, self.seeds = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seeds.append(torch.initial_seed())  # set by BDHLitModule.on_train_batch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(digest(batch[0]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.extend(digest(window) for window in batch[0])

    def on_fit_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"world_size": trainer.world_size, "train": self.train, "val": self.val, "seeds": self.seeds}, f)


class PoisonWeights(Callback):
    """Makes training go non-finite at `step`: `where` = "loss" puts a NaN in a weight before the forward
    pass; "update" puts an infinity in a gradient, so the loss stays finite and only the update is poisoned."""

    def __init__(self, step: int, where: str):
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "loss" and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head[0, 0] = math.nan

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "update" and trainer.global_step == self.step:
            pl_module.model.lm_head.grad[0, 0] = math.inf


class StallAt(Callback):
    """Stops training for good when `step` optimizer steps are done (their checkpoint saved): it writes
    "stalled at step <step>" to stderr and sleeps, so a test can kill the run at a known step, not a guessed one."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import sys
            import time

            print(f"stalled at step {self.step}", file=sys.stderr, flush=True)
            time.sleep(3600)


class SlowSteps(Callback):
    """Sleeps `seconds` before every training batch: a signal sent mid-step then reliably arrives mid-step."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        time.sleep(self.seconds)
