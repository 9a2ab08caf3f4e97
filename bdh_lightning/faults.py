"""Crash safety during training: SIGTERM and Ctrl-C stop with a checkpoint, a NaN or infinite loss stops
training without touching the last good checkpoint, and an error on one rank (out of memory above all)
stops every rank within seconds (checkpoint files themselves: `checkpoints.py`).

None of the checks empties the GPU's queue each step: the loss is checked on the device and looked at
every `trainer.log_every_n_steps` steps; the ranks agree on a signal through an asynchronous CPU (gloo)
all-reduce answered one step later.

Every failure here ends as one exception with a one-line message; `main.main` prints it and exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from .checkpoints import last_good_checkpoint
from .console import say
from .errors import NonFiniteError, TrainingInterrupted

# How often the non-finite check looks when logging is off (trainer.log_every_n_steps 0).
CHECK_EVERY_WITHOUT_LOGGING = 100
# The out-of-memory line: the same for torch's allocator, cuBLAS/cuDNN workspaces and NCCL buffers.
OUT_OF_MEMORY = ("out of memory; lower data.batch_size or data.block_size, use model.kernel chunked, "
                 "or check a setting first with `estimate`")  # fmt: skip
OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "can't allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError from a library that ran out of device or host memory
    (cuBLAS creating a handle or workspace: CUBLAS_STATUS_ALLOC_FAILED; "CUDA error: out of memory"; NCCL)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS)


def check_due(trainer) -> bool:
    """Whether this optimizer step is one where the device is asked (`.item()`): a logging step, the last step,
    or a stop. The GPU is synced there anyway when the metrics are logged."""
    every = trainer.log_every_n_steps or CHECK_EVERY_WITHOUT_LOGGING
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return trainer.global_step % every == 0 or last or trainer.should_stop


def last_checkpoint_path(trainer) -> str | None:
    """Where this run keeps last.ckpt (None when checkpointing is off)."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.dirpath:
        return None
    return callback.last_model_path or os.path.join(
        callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
    )


class StopOnSignal(Callback):
    """SIGTERM (pre-emption, `scancel`, `kill`) or Ctrl-C: finish the current optimizer step, save last.ckpt, stop.

    A second Ctrl-C aborts at once, without saving.
    """

    def __init__(self):
        self.signum: int | None = None
        self.trainer = None
        self.group = None  # a gloo process group for the ranks' vote (multi-process runs)
        self.vote = None  # (the all-reduce in flight, its tensor)

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed after Lightning's SIGTERM handler (set when fit starts), which would stop without saving;
        # Lightning puts the original handlers back when fit ends.
        self.signum = None
        self.trainer = trainer
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.vote = None
        if self.group is None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            try:  # CPU tensors over gloo: voting never touches the GPU (NCCL would sync it every step)
                self.group = dist.new_group(backend="gloo")
            except (RuntimeError, ValueError):
                self.group = None  # then the vote is a synchronous collective every step, as Lightning's own

    def request_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            # Not KeyboardInterrupt: Lightning turns that into exit code 1. A write cut short leaves no .part.
            found = last_good_checkpoint(self.trainer) if self.trainer is not None else None
            kept = (
                f"the last good checkpoint is {found[0]} (step {found[1]})" if found else "this run saved no checkpoint"
            )
            raise TrainingInterrupted(f"stopped by a second Ctrl-C without saving; {kept}", signal.SIGINT)
        self.signum = signum
        if (
            signum == signal.SIGINT
        ):  # someone at a terminal waits for the step to end; SIGTERM gets one line, at the stop
            say("Ctrl-C: saving a checkpoint after this step (Ctrl-C again aborts without saving)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # stop only between optimizer steps, where a checkpoint is complete
        if not self.stop_agreed(trainer):
            return
        signum = self.signum or signal.SIGTERM
        how = signal.Signals(signum).name if self.signum else "a signal to another rank"
        path = last_checkpoint_path(trainer)
        if path is None:
            raise TrainingInterrupted(
                f"stopped by {how} after step {trainer.global_step}; checkpointing is off, nothing saved", signum
            )
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(
            f"stopped by {how} after step {trainer.global_step}; saved {path}; continue with --ckpt_path last", signum
        )

    def stop_agreed(self, trainer) -> bool:
        """All ranks decide together: a signal that reached one rank stops every rank after the same step.

        One process: the flag itself. Several: each step sends this rank's flag in an asynchronous gloo
        all-reduce and reads the previous step's result, so every rank sees the same answer at the same step,
        one step after the signal, and nothing waits on the GPU."""
        if trainer.world_size == 1:
            return self.signum is not None
        if self.group is None:
            return trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        agreed = self.finish_vote()
        flag = torch.tensor([int(self.signum is not None)])
        self.vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        if agreed:
            self.finish_vote()  # every rank sent this one too: collect it before stopping
        return agreed

    def finish_vote(self) -> bool:
        if self.vote is None:
            return False
        work, flag = self.vote
        self.vote = None
        work.wait()
        return bool(flag.item())

    def on_train_end(self, trainer, pl_module) -> None:
        self.finish_vote()  # (the final step's last.ckpt: checkpoints.RunCheckpoint)


class StopOnNonFinite(Callback):
    """A NaN or infinite loss stops training, and neither it nor non-finite weights are ever saved, so the last
    good checkpoint stays as it was.

    The loss is checked on the device every step (no sync): the first non-finite one and its step are kept
    there, and read every `trainer.log_every_n_steps` steps, at the last step and before any checkpoint is
    written. The error names the step where the loss first went bad."""

    def __init__(self):
        self.bad_step: torch.Tensor | None = None  # -1, or the first step whose loss was not finite
        self.bad_loss: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bad_step = self.bad_loss = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        loss = loss.detach()
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, trainer.global_step, self.bad_step)
        self.bad_loss = torch.where(first, loss.float(), self.bad_loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and check_due(trainer):
            self.stop_if_non_finite(trainer)

    def stop_if_non_finite(self, trainer) -> None:
        """NonFiniteError if any rank saw a non-finite loss (all ranks decide together: none is left waiting)."""
        step = int(self.bad_step.item()) if self.bad_step is not None else -1
        if trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            seen = (
                f"training loss is {self.bad_loss.item()} at step {step}"
                if step >= 0
                else "training loss is not finite on another rank"
            )
            raise NonFiniteError(f"{seen}; stopped without saving; {self.advice(trainer)}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == "fit":  # every rank saves together (Lightning dumps the checkpoint on each)
            self.stop_if_non_finite(trainer)
        weights = [t for t in checkpoint["state_dict"].values() if torch.is_floating_point(t) and t.numel()]
        extremes = torch.stack(
            [torch.stack(torch.aminmax(t)) for t in weights]
        )  # NaN propagates; 5x faster than isfinite
        if not torch.isfinite(extremes).all():
            raise NonFiniteError(
                f"the weights became NaN or infinite at step {trainer.global_step}; not saving them; {self.advice(trainer)}"
            )

    @staticmethod
    def advice(trainer) -> str:
        found = last_good_checkpoint(trainer)  # one this run wrote: never another run's, nor the one it resumed from
        remedy = "a lower model.learning_rate, or trainer.precision bf16-mixed or 32-true"
        if found:
            return (
                f"the last good checkpoint is {found[0]} (step {found[1]}); resume from it (--ckpt_path) with {remedy}"
            )
        resumed = f" (it resumed from {trainer.ckpt_path})" if trainer.ckpt_path else ""
        return f"no checkpoint was saved in this run{resumed}; start again with {remedy}"


class StopEveryRank(Callback):
    """An error on one rank (out of memory, a CUDA error) stops every rank within seconds.

    Without it the other ranks wait in their next collective until the process group's timeout (30 minutes
    under Lightning's DDP): NCCL does not notice that a peer has gone. The failing rank writes what happened
    to the process group's key-value store (hosted by rank 0 or the launcher, not the GPU); a thread on
    every rank looks once a second and ends its process with one line when it sees the note, or when the
    store itself has gone (rank 0 stopped). Errors every rank raises together (a signal stop, a non-finite
    loss) are left to their own handling.
    """

    KEY = "bdh_lightning/stopped"
    POLL_SECONDS = 1.0
    STORE_LOST_AFTER = 3  # failed looks in a row before a gone store counts as rank 0 having stopped

    def __init__(self):
        self.store = None
        self.rank = 0
        self.done = threading.Event()

    def setup(self, trainer, pl_module, stage) -> None:
        self.done = threading.Event()
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            return  # no store to share a note through: a failure waits for the collective's timeout
        self.rank = trainer.global_rank
        threading.Thread(target=self.watch, name="bdh-stop-every-rank", daemon=True).start()

    def watch(self) -> None:
        lost = 0
        while not self.done.wait(self.POLL_SECONDS):
            try:
                if not self.store.check([self.KEY]):
                    lost = 0
                    continue
                what = self.store.get(self.KEY).decode()
            except (RuntimeError, OSError):  # the store is gone with the process that hosted it (DistStoreError)
                lost += 1
                if lost < self.STORE_LOST_AFTER:
                    continue
                what = "rank 0 stopped"
            if self.done.is_set():
                return  # this rank is ending on its own: its error is the one to print
            say(f"error: {what}; stopping rank {self.rank} too")
            os._exit(1)  # the main thread may be blocked inside a collective: nothing else would end it

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.done.set()
        if self.store is None or isinstance(exception, (TrainingInterrupted, NonFiniteError, KeyboardInterrupt)):
            return
        what = "ran out of memory" if is_out_of_memory(exception) else f"failed ({type(exception).__name__})"
        with contextlib.suppress(RuntimeError, OSError):  # the store is gone: the others notice that instead
            self.store.set(self.KEY, f"rank {self.rank} {what}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.done.set()  # what follows is the end of a good run; ranks may leave at slightly different times

    def teardown(self, trainer, pl_module, stage) -> None:
        self.done.set()


def peer_stopped(what: str) -> str:
    """The line for a run whose other process has gone, `what` saying how we know (main and RankWatch)."""
    return (
        f"another process of this run stopped ({what}); see its own output for why, then resume with --ckpt_path last"
    )


def watch_started_ranks() -> None:
    """Replace Lightning's watch over the ranks its DDP launcher starts as child processes of rank 0.

    Lightning's watch SIGKILLs every process, rank 0 included, within 5 s of a rank ending with a non-zero code:
    rank 0 then dies without a word (exit -9) even when it was about to say why, or was saving its stop
    checkpoint. Ours gives rank 0 `RankWatch.GRACE_SECONDS` to end on its own (a peer-lost collective error, a
    StopEveryRank note, an agreed signal stop), and only then says which rank ended and stops them all."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._launch_process_observer = lambda children: RankWatch(children).start()


class RankWatch(threading.Thread):
    POLL_SECONDS = 1.0
    GRACE_SECONDS = 15.0  # a collective with a gone peer fails (gloo) or hangs (NCCL); a stop's last save ends

    def __init__(self, children):
        super().__init__(name="bdh-rank-watch", daemon=True)  # ends with the main process
        self.children = list(children)

    def run(self) -> None:
        while True:
            time.sleep(self.POLL_SECONDS)
            codes = [child.poll() for child in self.children]
            if all(code == 0 for code in codes):
                return
            ended = [(rank, code) for rank, code in enumerate(codes, start=1) if code]
            if ended:
                break
        time.sleep(self.GRACE_SECONDS)  # still here: rank 0 is stuck, most likely inside a collective
        rank, code = ended[0]
        how = f"exit code {code}" if code > 0 else f"killed by {signal_name(-code)}"
        say(f"error: {peer_stopped(f'rank {rank}, {how}')}")
        for child in self.children:
            with contextlib.suppress(OSError):
                child.kill()
        os._exit(1)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
