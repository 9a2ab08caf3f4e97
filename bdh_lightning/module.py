"""`BDHLitModule`: the BDH model, its loss, AdamW and the learning-rate schedule, for Lightning."""

from __future__ import annotations

import math
import os
import sys
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from .devices import cuda_present
from .errors import ConfigError, finite_float, non_negative_int
from .kernels import resolve_kernel
from .model import BDH, BDHConfig
from .weights import weights_to_start_from


def check_optimizer_settings(learning_rate, weight_decay, betas, warmup_steps, decay_steps, min_learning_rate) -> None:
    """AdamW's and the schedule's rules, checked before anything is built or written (ConfigError, one line)."""
    finite_float("model.learning_rate", learning_rate, 0.0, low_open=True)
    finite_float("model.weight_decay", weight_decay, 0.0, hint=" (0 = none)")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"model.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    for i, beta in enumerate(betas):
        finite_float(f"model.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    non_negative_int("model.warmup_steps", warmup_steps, zero="0 = no warmup")
    non_negative_int("model.decay_steps", decay_steps, zero="0 = constant learning rate")
    finite_float("model.min_learning_rate", min_learning_rate, 0.0, float(learning_rate),
                 hint=" (the floor of the cosine decay, at most model.learning_rate)")  # fmt: skip


# Where a window lies in its stream, in windows: the buckets of the by-position validation (the first window
# has no context beyond itself; the later ones show what the carried state adds).
POSITION_BUCKETS = ((0, "0"), (1, "1-3"), (4, "4-15"), (16, "16-63"), (64, "64+"))


def position_bucket(window: int) -> str:
    """The name of the bucket of a window `window` windows into its stream."""
    return [name for first, name in POSITION_BUCKETS if window >= first][-1]


# The axis of each weight that is D wide: unit-wise clipping takes norms over it (one unit = one neuron or byte).
D_AXIS = {"embed.weight": 1, "encoder": 1, "encoder_v": 1, "decoder": 1, "lm_head": 0}


@torch.no_grad()
def clip_unitwise(model, clip: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021): each unit's gradient norm at most clip x its weight norm."""
    for name, weight in model.named_parameters():
        if weight.grad is None:
            continue
        axis = D_AXIS[name]
        most = clip * weight.norm(dim=axis, keepdim=True).clamp_min(eps)
        norm = weight.grad.norm(dim=axis, keepdim=True)
        weight.grad.mul_(torch.where(norm > most, most / norm.clamp_min(1e-12), torch.ones_like(norm)))


class BDHLitModule(L.LightningModule):
    """BDH with AdamW.

    Args:
        n_layer: Layers L: the one shared layer is applied L times, so compute and activation memory grow
            linearly with L and the parameters do not change.
        n_embd: Embedding width D. N = m * D / H grows with D, so parameters (about 3 * m * D^2) and the
            N-wide compute grow with D^2, the N-wide activations linearly.
        dropout: Dropout on the sparse product a*b while training, in [0, 1). Regularises small data; no
            cost at inference.
        n_head: Heads H; neurons per head N = mlp_internal_dim_multiplier * n_embd // n_head, so the total
            H * N stays about m * D; more heads mean more, smaller (T x T) attention maps.
        mlp_internal_dim_multiplier: Neuron multiplier m, the main lever: parameters (3 * H * N * D),
            compute and the N-wide activations all grow linearly with it. More neurons usually means lower
            loss.
        vocab_size: Bytes: must be 256.
        kernel: Layer implementation: reference (plain autograd, keeps the N-wide tensors for backward:
            most memory), chunked (recomputes them in backward, chunk by chunk: a tenth of the memory or
            less), fused (Triton, CUDA only, experimental: chunked's memory, GPU speed not yet measured) or
            auto (on CUDA the reference where its predicted peak fits the GPU with a margin, else chunked;
            on the CPU chunked from B * H * T * N = 2^23 elements up, the reference below). Checkpoints do
            not depend on it.
        chunk_size: Neurons per chunk for chunked (0 = automatic; fused has its own tiles). Smaller: less
            transient memory, more overhead.
        compile: Compile the model with torch.compile: faster steps after a compile pause (the shared layer
            is compiled once for all layers); checkpoint keys stay plain.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (applied to every parameter, as the reference does).
        betas: AdamW betas.
        warmup_steps: Linear warmup from 0 over this many optimizer steps (0 = none).
        decay_steps: Decay (of the shape `decay`) from learning_rate to min_learning_rate over this many
            steps after warmup (0 = constant learning rate, the reference run).
        min_learning_rate: Floor of the decay.
        init_from: Start from these weights instead of random ones, with a fresh optimizer and step 0
            (fine-tuning): a reference state_dict (.pt), a safetensors file or hf folder written by
            export, or another run's .ckpt. Their shapes must fit the model settings; read without
            unpickling code. On resume (--ckpt_path) the checkpoint's weights replace them.
        carry_state: Carry each layer's attention state from one window to the next (truncated
            backpropagation through time): needs data.sampling streams. Positions continue across
            windows; gradients stay within a window; a stream's state resets where the stream restarts.
            Costs batch x n_layer x H x N x D float32 numbers per device. No form tried has beaten random
            windows; the closest is data.stream_windows 8 with carry_half_lives and carry_mean
            (docs/carried-state.md).
        carry_half_lives: With carry_state: half-life in bytes of the carried state, one for all heads or
            one per head (None = never fades: the plain sum, what one pass over the whole stream computes,
            whose norm grows with the stream). Applied per window: before a window of T bytes reads it, the
            state is multiplied by 2^(-T/h). Stored with the weights. See docs/carried-state.md.
        carry_mean: With carry_state: read the carried state as the weighted mean of the earlier windows'
            contributions (divided by their accumulated weight), so the history weighs as one window
            however long the stream. Stored with the weights.
        decay: Shape of the decay after warmup over decay_steps: cosine, or linear to
            min_learning_rate.
        agc_clip: Adaptive gradient clipping, unit-wise (Brock et al. 2021): each
            neuron's (or byte's) gradient is scaled down to at most agc_clip times its weights' norm,
            both over the D-wide axis. 0 = off; 0.01-0.1 are usual. Lightning's
            trainer.gradient_clip_val clips the global norm instead (both may be used).
    """

    def __init__(
        self,
        n_layer: int = 6,
        n_embd: int = 256,
        dropout: float = 0.1,
        n_head: int = 4,
        mlp_internal_dim_multiplier: int = 128,
        vocab_size: int = 256,
        kernel: Literal["auto", "reference", "chunked", "fused"] = "auto",
        chunk_size: int = 0,
        compile: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        decay_steps: int = 0,
        min_learning_rate: float = 0.0,
        init_from: str | None = None,
        carry_state: bool = False,
        carry_half_lives: list[float] | None = None,
        carry_mean: bool = False,
        decay: Literal["cosine", "linear"] = "cosine",
        agc_clip: float = 0.0,
    ):
        super().__init__()
        check_optimizer_settings(learning_rate, weight_decay, betas, warmup_steps, decay_steps, min_learning_rate)
        # Not init_from: the checkpoint holds the weights themselves, and loading it (load_from_checkpoint, resume)
        # must not read, or need, the file they started from. config.yaml beside the run still names it.
        self.save_hyperparameters(ignore=["init_from"])
        self.config = BDHConfig(
            n_layer=n_layer,
            n_embd=n_embd,
            dropout=dropout,
            n_head=n_head,
            mlp_internal_dim_multiplier=mlp_internal_dim_multiplier,
            vocab_size=vocab_size,
            kernel=kernel,
            chunk_size=chunk_size,
            carry_half_lives=tuple(carry_half_lives or ()),
            carry_mean=carry_mean,
        )
        if kernel == "fused":  # refuse it now where this machine cannot run it, not at the first forward pass
            resolve_kernel(kernel, torch.device("cuda" if cuda_present() else "cpu"))
        self.model = BDH(self.config)
        if init_from is not None:
            self.start_from(init_from)
        self.eval_loss = MeanMetric()
        if decay not in ("cosine", "linear"):
            raise ConfigError(f"model.decay must be cosine or linear, got {decay!r}")
        finite_float("model.agc_clip", agc_clip, 0.0, hint=" (0 = off)")
        self.stream_states: list[torch.Tensor] | None = None  # carry_state: each layer's state after the last window

    def start_from(self, path: str) -> None:
        """Copy the weights of `path` into the model (cast to its dtype); say so if they had another depth."""
        tensors, settings = weights_to_start_from(path, self.config)
        self.model.load_state_dict(tensors)
        if settings.get("n_layer", self.config.n_layer) != self.config.n_layer and rank_zero_only.rank == 0:
            print(f"note: --model.init_from {path} was trained with n_layer={settings['n_layer']}; this model applies "
                  f"its layer {self.config.n_layer} times", file=sys.stderr)  # fmt: skip

    def choose_kernel(self, batch_size: int, block_size: int, precision: str, device: torch.device) -> str:
        """Resolve model.kernel for this run (once, before compiling): on CUDA `auto` becomes the reference
        where its predicted peak fits the GPU, else chunked (estimate.choose_kernel). On the CPU `auto`
        stays, decided per call by size. Returns the one-line reason, also kept as `kernel_reason`."""
        from .estimate import choose_kernel

        kernel, self.kernel_reason = choose_kernel(
            self.config, batch_size, block_size, precision, device, carry_state=self.hparams.carry_state
        )
        if torch.device(device).type == "cuda":
            self.config.kernel = kernel
        return self.kernel_reason

    def configure_model(self) -> None:
        trainer, data = self._trainer, getattr(self._trainer, "datamodule", None)
        if getattr(self, "kernel_reason", None) is None and data is not None and hasattr(data, "block_size"):
            self.choose_kernel(data.batch_size, data.block_size, str(trainer.precision), trainer.strategy.root_device)
        # Compile the forward only: parameters stay on `self.model`, so checkpoint keys stay plain.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.forward = torch.compile(self.model.forward)
            self.model.forward_stream = torch.compile(self.model.forward_stream)
            self._compiled = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        if logits.dtype != torch.float64:  # the loss in float32 even under 16-bit autocast
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Dropout draws from a seed made of (global seed, rank, step, micro-batch): a run resumed from a
        # checkpoint draws the same masks as an uninterrupted one, and every rank draws its own.
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(
            int(np.random.SeedSequence([seed, self.global_rank, self.global_step, micro_batch]).generate_state(1)[0])
        )

    def carried_loss(self, batch) -> torch.Tensor:
        """The loss of a window that continues each row's stream (data.sampling streams, model.carry_state):
        the layers read the state the previous window left, reset where a stream starts (position 0)."""
        x, y, start = batch
        states = self.stream_states
        if states is not None and states[0].shape[0] == x.shape[0]:
            keep = (start != 0).to(device=states[0].device, dtype=states[0].dtype).view(-1, 1, 1, 1)
            states = [state.mul_(keep) for state in states]  # in place: no third copy of the state during the step
        else:
            states = None
        logits, written = self.model.forward_stream(x, start, states)
        self.stream_states = [state.detach() for state in written]
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        if self.hparams.carry_state and getattr(data, "sampling", None) != "streams":
            raise ConfigError(
                "model.carry_state needs data.sampling streams (consecutive windows to carry the state across)"
            )

    def training_step(self, batch, batch_idx):
        loss = self.carried_loss(batch) if self.hparams.carry_state else self.loss(batch[:2])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # A mean over all windows weighted by their bytes, synced across devices by torchmetrics.
        self.eval_loss.update(self.loss(batch[:2]), weight=batch[1].numel())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")
        if self.hparams.carry_state and not self.trainer.sanity_checking:
            carried, windowed, by_position = self.stream_validation()
            self.log("val/bpb_carried", carried / math.log(2), sync_dist=True)
            self.log("val/bpb_windowed", windowed / math.log(2), sync_dist=True)
            for name, loss in by_position.items():  # e.g. val/bpb_carried/pos_4-15: the effect of context, unaveraged
                self.log(f"val/bpb_{name}", loss / math.log(2), sync_dist=True)

    @torch.no_grad()
    def stream_validation(self) -> tuple[float, float, dict[str, float]]:
        """(loss with carried state, loss of each window alone, both by position) on the same contiguous
        validation streams. By position: keys 'carried/pos_4-15', 'windowed/pos_4-15', ... (POSITION_BUCKETS:
        how many windows into its stream a window is), the mean over the windows there."""
        carried = windowed = 0.0
        states = None
        sums: dict[str, list[float]] = {}  # key -> [sum of window losses, windows]
        batches = self.trainer.datamodule.validation_streams()
        with self.trainer.precision_plugin.forward_context():
            for x, y, start in batches:
                x, y, start = x.to(self.device), y.to(self.device), start.to(self.device)
                if states is not None:  # a row that restarts (a file boundary) starts a fresh stream
                    keep = (start != 0).to(states[0].dtype).view(-1, 1, 1, 1)
                    states = [state * keep for state in states]
                logits, states = self.model.forward_stream(x, start, states)
                local = self.model(x)
                for name, out in (("carried", logits), ("windowed", local)):
                    rows = F.cross_entropy(out.float().transpose(1, 2), y, reduction="none").mean(1)  # (B,)
                    for row, window in zip(rows.tolist(), (start // x.shape[1]).tolist()):
                        total = sums.setdefault(f"{name}/pos_{position_bucket(window)}", [0.0, 0])
                        total[0], total[1] = total[0] + row, total[1] + 1
                    if name == "carried":
                        carried += rows.mean().item()
                    else:
                        windowed += rows.mean().item()
        by_position = {key: total / count for key, (total, count) in sorted(sums.items())}
        return carried / len(batches), windowed / len(batches), by_position

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank's carried state, so that a resumed run continues each stream exactly (collective: every
        # rank saves). A checkpoint without it starts the streams' states from zero.
        if self.stream_states is not None:
            stacked = torch.stack(self.stream_states)  # L, B, H, N, D
            gathered = self.all_gather(stacked) if self.trainer.world_size > 1 else stacked.unsqueeze(0)
            checkpoint["carried_state"] = gathered.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("carried_state")
        if self.hparams.carry_state and isinstance(saved, torch.Tensor) and saved.shape[0] > self.global_rank:
            self.stream_states = list(saved[self.global_rank].to(self.device).unbind(0))

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.agc_clip > 0:
            clip_unitwise(self.model, self.hparams.agc_clip)

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    def _log_eval_loss(self, split: str) -> None:
        loss = self.eval_loss.compute()
        self.eval_loss.reset()
        # Already the same on every rank (torchmetrics synced it): sync_dist only averages equal values,
        # and it tells Lightning the epoch-level value is global.
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/bpb", loss / math.log(2), sync_dist=True)  # bits per byte

    def learning_rate_at(self, step: int) -> float:
        """Learning rate after `step` optimizer steps: linear warmup, then cosine decay or constant."""
        hp = self.hparams
        if hp.warmup_steps and step < hp.warmup_steps:
            return hp.learning_rate * (step + 1) / hp.warmup_steps
        if not hp.decay_steps:
            return hp.learning_rate
        progress = min(1.0, (step - hp.warmup_steps) / hp.decay_steps)
        remaining = (
            1.0 - progress if hp.get("decay", "cosine") == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        )
        return hp.min_learning_rate + remaining * (hp.learning_rate - hp.min_learning_rate)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=hp.learning_rate, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.learning_rate_at(step) / hp.learning_rate
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}

    # FLOPs for throughput.ThroughputMonitor (FLOP/s and MFU): validation and test batches cost a forward.
    def forward_flops(self, batch_size: int, block_size: int) -> int:
        """FLOPs of one forward pass from the spec's cost formulas (2 per multiply-add of the matrix products)."""
        c = self.config
        H, D, N, T = c.n_head, c.n_embd, c.neurons_per_head, block_size
        per_token_layer = 6 * H * D * N + 2 * H * N * T + 2 * H * D * T
        return batch_size * T * (c.n_layer * per_token_layer + 2 * D * c.vocab_size)

    def training_flops(self, batch_size: int, block_size: int) -> int:
        """Training FLOPs of one batch: forward + backward (twice the forward's)."""
        return 3 * self.forward_flops(batch_size, block_size)
