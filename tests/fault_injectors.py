"""Test-only callbacks for the distributed fault tests, loaded by `python -m bdh_lightning fit --config`."""

import time

import torch
from lightning.pytorch.callbacks import Callback


class OutOfMemoryOnRank(Callback):
    """At `step`, rank `rank` runs out of memory; every other rank hangs as it would inside an NCCL collective
    whose peer has gone (NCCL does not notice; gloo, the CPU backend, would fail at once and hide the hang).
    `message` None raises torch.OutOfMemoryError; else a RuntimeError with that text (cuBLAS's, say)."""

    def __init__(self, rank: int, step: int, message: str | None = None):
        self.rank, self.step, self.message = rank, step, message

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            raise (
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                if self.message is None
                else RuntimeError(self.message)
            )
        time.sleep(600)


class RecordTF32(Callback):
    """Writes `cuda tf32 <allow_tf32>` as the rank saw it when training started (to check ddp_spawn workers)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.path, "w") as out:
                out.write(f"{trainer.strategy.root_device.type} {torch.backends.cuda.matmul.allow_tf32}\n")
