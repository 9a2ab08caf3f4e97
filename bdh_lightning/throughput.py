"""Throughput and MFU: bytes, windows and FLOPs per second, and the fraction of the GPU's dense peak.

Why not Lightning's `ThroughputMonitor`: measured wrong for GPUs we run on. Its table has no "NVIDIA H200"
(the name torch reports; it needs "sxm1"/"nvl1") and gives 2:4-sparse peaks for the H200 and H100 NVL (twice
the dense figure); it charges validation the training FLOPs, reports rates only after 100 batches, and
synchronises the GPU after every batch. Here: dense peaks (`PEAKS`), forward FLOPs for evaluation, rates since
the previous report, and a sync only where a rate is logged. Metric names are Lightning's
(`train/device/items_per_sec`, `.../mfu`, `validate/...`).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback

from .precision import compute_dtype


@dataclass(frozen=True)
class Peak:
    """Dense (no 2:4 sparsity) tensor-core TFLOP/s of one GPU at its boost clock, float32 accumulate."""

    name: str
    sms: int  # streaming multiprocessors of the full part: a MIG slice or a cut-down part scales by its own
    bf16: float
    fp16: float
    tf32: float
    fp32: float  # plain float32 (no tensor cores): 32-true with TF32 off
    source: str


# Sources. Datasheets give the sparse figure ("*with sparsity"); the dense one is half of it.
_H100_WHITEPAPER = (
    "NVIDIA H100 Tensor Core GPU Architecture whitepaper, table 'NVIDIA H100 specifications' (dense column)"
)
_H100_DATASHEET = "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100), H100 NVL column, sparse figure / 2"
_H200_DATASHEET = "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), sparse figure / 2"
_GH200_DATASHEET = "NVIDIA GH200 Grace Hopper Superchip datasheet, GPU figures, sparse / 2"
_A100_DATASHEET = "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4), dense figures"
_ADA_WHITEPAPER = "NVIDIA Ada GPU Architecture whitepaper v2.1, appendix tables (FP16/BF16 with FP32 accumulate, dense)"
_L40S_DATASHEET = "NVIDIA L40S datasheet, sparse figure / 2"
_L40_DATASHEET = "NVIDIA L40 datasheet, sparse figure / 2"
_A10_DATASHEET = "NVIDIA A10 datasheet, dense figures"
_GA102_WHITEPAPER = (
    "NVIDIA Ampere GA102 GPU Architecture whitepaper v2, appendix A (FP16/BF16 with FP32 accumulate, dense)"
)
_GEFORCE_RATIO = ("NVIDIA's FP32 (shader) figure for the card; tensor figures at its architecture's GeForce ratio "
                  "(FP16/BF16 with FP32 accumulate = 2x FP32, TF32 = 1x), as the whitepaper's cards")  # fmt: skip

# (pattern on the lower-cased CUDA device name, peak): the first match wins, so specific names come first.
# Consumer cards count FP16/BF16 with FP32 accumulate (what PyTorch's matmuls use): half their FP16-accumulate rate.
PEAKS: list[tuple[str, Peak]] = [
    (r"gh200", Peak("GH200", 132, 989.5, 989.5, 494.5, 67.0, _GH200_DATASHEET)),
    (r"h200.*nvl", Peak("H200 NVL", 132, 835.5, 835.5, 417.5, 60.0, _H200_DATASHEET)),
    (r"h200", Peak("H200 SXM", 132, 989.5, 989.5, 494.5, 67.0, _H200_DATASHEET)),
    (r"h100.*nvl", Peak("H100 NVL", 132, 835.5, 835.5, 417.5, 60.0, _H100_DATASHEET)),
    (r"h100.*(pcie|hbm2e)", Peak("H100 PCIe", 114, 756.0, 756.0, 378.0, 51.2, _H100_WHITEPAPER)),
    (r"h100", Peak("H100 SXM", 132, 989.4, 989.4, 494.7, 66.9, _H100_WHITEPAPER)),  # "NVIDIA H100 80GB HBM3"
    (r"a100", Peak("A100", 108, 312.0, 312.0, 156.0, 19.5, _A100_DATASHEET)),  # SXM4 and PCIe, 40 and 80 GB
    (r"\bl40s\b", Peak("L40S", 142, 366.5, 366.5, 183.0, 91.6, _L40S_DATASHEET)),
    (r"\bl40\b", Peak("L40", 142, 181.05, 181.05, 90.5, 90.5, _L40_DATASHEET)),
    (r"\bl4\b", Peak("L4", 58, 121.0, 121.0, 60.0, 30.3, _ADA_WHITEPAPER)),
    (r"\ba10\b", Peak("A10", 72, 125.0, 125.0, 62.5, 31.2, _A10_DATASHEET)),
    (r"rtx 4090", Peak("GeForce RTX 4090", 128, 165.2, 165.2, 82.6, 82.6, _ADA_WHITEPAPER)),
    (r"rtx 4080 super", Peak("GeForce RTX 4080 SUPER", 80, 104.4, 104.4, 52.2, 52.2, _GEFORCE_RATIO)),
    (r"rtx 4080", Peak("GeForce RTX 4080", 76, 97.5, 97.5, 48.7, 48.7, _ADA_WHITEPAPER)),
    (r"rtx 3090 ti", Peak("GeForce RTX 3090 Ti", 84, 80.0, 80.0, 40.0, 40.0, _GEFORCE_RATIO)),
    (r"rtx 3090", Peak("GeForce RTX 3090", 82, 71.0, 71.0, 35.6, 35.6, _GA102_WHITEPAPER)),
    (r"rtx 3080 ti", Peak("GeForce RTX 3080 Ti", 80, 68.2, 68.2, 34.1, 34.1, _GEFORCE_RATIO)),
    (r"rtx 3080", Peak("GeForce RTX 3080", 68, 59.5, 59.5, 29.8, 29.8, _GA102_WHITEPAPER)),
    (r"rtx 3070", Peak("GeForce RTX 3070", 46, 40.6, 40.6, 20.3, 20.3, _GA102_WHITEPAPER)),
]


def find_peak(device_name: str) -> Peak | None:
    """The table's row for a CUDA device name (None if it has none; laptop parts are other chips)."""
    name = device_name.lower()
    if "laptop" in name or "mobile" in name:
        return None
    return next((peak for pattern, peak in PEAKS if re.search(pattern, name)), None)


def dense_peak_flops(peak: Peak, dtype: torch.dtype, tf32: bool, sms: int | None = None) -> float | None:
    """FLOP/s of `peak` for matmuls in `dtype` (float32: TF32 when allowed), scaled to `sms` multiprocessors
    (a MIG slice has a fraction of them); None for float64 (not in the table)."""
    per_dtype = {torch.bfloat16: peak.bf16, torch.float16: peak.fp16, torch.float32: peak.tf32 if tf32 else peak.fp32}
    if dtype not in per_dtype:
        return None
    scale = sms / peak.sms if sms else 1.0
    return per_dtype[dtype] * 1e12 * scale


def tf32_enabled() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def device_peak_flops(device: torch.device, precision) -> tuple[float | None, str | None]:
    """(dense peak FLOP/s of `device` at `precision`, None if unknown; a one-line note when a CUDA device has none)."""
    if device.type != "cuda":
        return None, None  # MFU is a GPU figure: nothing to say on the CPU
    name = torch.cuda.get_device_name(device)
    peak = find_peak(name)
    dtype = compute_dtype(precision)
    if peak is None:
        return None, (f"note: no MFU: {name!r} is not in the table of dense peak FLOP/s (bdh_lightning/throughput.py "
                      f"PEAKS); bytes/s and FLOP/s are still logged")  # fmt: skip
    flops = dense_peak_flops(
        peak, dtype, tf32_enabled(), torch.cuda.get_device_properties(device).multi_processor_count
    )
    if flops is None:
        return None, f"note: no MFU for {precision}: the table has no {dtype} peak for the {peak.name}"
    return flops, None


@dataclass
class Span:
    """What ran since the last report: the counts, and time spent elsewhere (validation inside fit)."""

    start: float
    batches: int = 0
    windows: int = 0
    bytes: int = 0
    flops: int = 0
    paused: float = 0.0

    def add(self, batch, flops: int) -> None:
        self.batches += 1
        self.windows += batch[0].shape[0]
        self.bytes += batch[0].numel()
        self.flops += flops


class ThroughputMonitor(Callback):
    """Bytes, windows, batches and FLOPs per second and MFU, per device and (several devices) in all.

    Reports training every `trainer.log_every_n_steps` optimizer steps (and at the last step) over the
    steps since the previous report, minus validation time; each validation or test pass at its end.
    The GPU is synchronized only at those points. Rank 0 measures and logs (Lightning's convention:
    the global figures assume every device ran as fast).
    """

    def __init__(self):
        self.available_flops: float | None = None
        self.world_size = 1
        self.train: Span | None = None
        self.evaluation: Span | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.world_size = trainer.world_size
        self.available_flops, note = device_peak_flops(trainer.strategy.root_device, trainer.precision)
        if note and trainer.is_global_zero:
            sys.stderr.write(note + "\n")

    @staticmethod
    def now(trainer) -> float:
        """The time once the device has finished what was queued (a GPU sync: only at report points)."""
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @staticmethod
    def batch_flops(pl_module, batch, training: bool) -> int:
        """FLOPs of this batch from the module's cost formulas: forward + backward when training, else forward."""
        count = getattr(pl_module, "training_flops" if training else "forward_flops", None)
        return count(*batch[0].shape) if count else 0

    def report(self, trainer, stage: str, span: Span, end: float, step: int) -> None:
        seconds = end - span.start - span.paused
        if seconds <= 0 or not span.batches:
            return
        per_device = {
            "batches_per_sec": span.batches / seconds,
            "samples_per_sec": span.windows / seconds,
            "items_per_sec": span.bytes / seconds,
        }
        if span.flops:
            per_device["flops_per_sec"] = span.flops / seconds
        metrics = {f"{stage}/device/{key}": value for key, value in per_device.items()}
        if span.flops and self.available_flops:
            metrics[f"{stage}/device/mfu"] = per_device["flops_per_sec"] / self.available_flops
        if self.world_size > 1:
            metrics.update({f"{stage}/{key}": value * self.world_size for key, value in per_device.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def log_step(trainer) -> int:
        """The step Lightning logs this step's `train/loss` at (optimizer steps done before it)."""
        return max(0, trainer.global_step - 1)

    # Training
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.train = Span(self.now(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self.train = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or self.train is None:
            return
        self.train.add(batch, self.batch_flops(pl_module, batch, training=True))
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # report between optimizer steps only
        every = trainer.log_every_n_steps
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (every and trainer.global_step % every == 0) or last or trainer.should_stop:
            end = self.now(trainer)
            self.report(trainer, "train", self.train, end, self.log_step(trainer))
            self.train = Span(end)

    # Validation (inside fit or alone) and test
    def _evaluation_start(self, trainer) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.evaluation = Span(self.now(trainer))

    def _evaluation_batch_end(self, trainer, pl_module, batch) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and self.evaluation is not None:
            self.evaluation.add(batch, self.batch_flops(pl_module, batch, training=False))

    def _evaluation_end(self, trainer, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or self.evaluation is None:
            return
        end = self.now(trainer)
        self.report(trainer, stage, self.evaluation, end, self.log_step(trainer))
        if self.train is not None and stage == "validate":  # validation inside fit: not training time
            self.train.paused += end - self.evaluation.start
        self.evaluation = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(trainer, pl_module, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(trainer, pl_module, batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "test")
