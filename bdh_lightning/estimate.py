"""Predict the memory of a training step before a run starts, and choose the kernel that fits.

Every tensor autograd keeps for backward is counted below with its size and dtype (an inventory taken with
saved-tensor hooks; tests/measure.py holds the two within 15% of real CPU steps), plus weights, gradients,
AdamW state, the largest transient working set and, on CUDA, the context and allocator overheads.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

import torch

from .console import format_bytes
from .devices import device_memory
from .errors import ConfigError
from .errors import UsageError as EstimateError
from .kernels import CPU_CHUNKED_FROM, resolve_kernel
from .kernels.chunked import chunk_width
from .model import BDHConfig
from .precision import PRECISIONS, precision

# The kernels whose memory is modelled (fused keeps chunked's tensors).
MODELLED_KERNELS = ("reference", "chunked")


def byte_sizes(name: str) -> tuple[int, int, bool]:
    """(bytes per parameter, bytes per activation element, autocast on) of a Lightning precision."""
    row = PRECISIONS[name]
    return row.param_bytes, row.activation_bytes, row.autocast


def normalize_precision(name) -> str:
    try:
        return precision(name).name
    except ConfigError as error:
        raise EstimateError(str(error)) from None


# What a CUDA process holds beyond its tensors (sources' figures; none measured for BDH yet):
# the context, driver state and torch's kernel images: 300-600 MiB in nvidia-smi with lazy loading (CUDA >= 11.7);
CUDA_CONTEXT_BYTES = 600 * 2**20
# cuBLAS workspaces: :4096:8 (32 MiB) on Hopper, one for the forward's thread and one for autograd's;
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20
# the caching allocator's rounding and blocks it cannot reuse: reserved is 5-20% above the allocated peak;
ALLOCATOR_SLACK = 0.15
# NCCL's own buffers: NCCL_BUFFSIZE (4 MiB) per channel, peer and direction, up to 32 channels on one node.
NCCL_BUFFER_BYTES = 256 * 2**20
PREDICTION_NOTE = (
    "predicted, not measured: tensors within 15% of measured CPU steps; the CUDA context, cuBLAS workspaces, "
    "allocator slack and NCCL buffers are modelled, not yet checked on a GPU"
)


@dataclass
class KernelMemory:
    saved_bytes: int  # kept for the backward pass, all layers and the head
    transient_bytes: int  # the largest working set on top of that, gradients included
    peak_bytes: int  # weights + AdamW state (+ DDP buckets) + saved + transient: torch.cuda.max_memory_allocated
    device_bytes: int = 0  # what the device must have: the peak plus the CUDA overheads (= the peak on the CPU)


def device_bytes(peak_bytes: int, device_type: str, world_size: int = 1) -> int:
    """Device memory a run whose tensors peak at `peak_bytes` needs: on CUDA, the peak with the allocator's
    slack, the context and cuBLAS workspaces, and NCCL's buffers when there are several ranks."""
    if device_type != "cuda":
        return peak_bytes
    total = peak_bytes * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES
    return int(total + (NCCL_BUFFER_BYTES if world_size > 1 else 0))


@dataclass
class MemoryReport:
    parameters: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    batch_size: int
    block_size: int
    precision: str
    device_type: str
    kernels: dict[str, KernelMemory] = field(default_factory=dict)
    world_size: int = 1
    bucket_bytes: int = 0  # DDP's gradient buckets (several ranks): a second copy of the gradients
    state_bytes: int = 0  # model.carry_state: the state carried between windows (kept between steps)


def carried_state_bytes(cfg: BDHConfig, batch: int, precision: str) -> int:
    """Bytes of the state model.carry_state keeps between windows: per layer and batch row, per head the N x D
    sum of qᵀ x, B·L·H·N·D numbers in float32 (float64 under 64-true; never 16 bits, it accumulates)."""
    wide = 8 if byte_sizes(precision)[1] == 8 else 4
    return batch * cfg.n_layer * cfg.n_head * cfg.neurons_per_head * cfg.n_embd * wide


def saved_bytes(kernel: str, cfg: BDHConfig, batch: int, length: int, precision: str, device_type: str) -> int:
    """Bytes autograd keeps for backward in one training step (dropout on), from the measured inventory."""
    p, e, autocast = byte_sizes(precision)
    B, T, D, H, N, V, L = batch, length, cfg.n_embd, cfg.n_head, cfg.neurons_per_head, cfg.vocab_size, cfg.n_layer
    BT, BTD, BHT, BHTD, BHTN = B * T, B * T * D, B * H * T, B * H * T * D, B * H * T * N
    wide = 4 if autocast else e  # float32 where autocast keeps float32: the layers' residual stream
    ln = 4 if autocast and device_type == "cuda" else e  # layer norm of a low-precision input
    # Once per step: the bytes and targets, the embedding's layer norm, cos/sin, the head and the loss.
    head = 16 * BT + BTD * p + 2 * BT * (4 if autocast and device_type == "cuda" else p) + 2 * T * N * 4
    head += (BTD + D * V) * e if autocast else BTD * wide  # lm_head's input (and its cast weight)
    head += BT * V * 4  # log_softmax of the float32 logits
    # Per layer, both kernels: ln(u) and ln(x + ln(u)) keep their inputs and mean/rstd.
    tail = BTD * (ln + wide) + 2 * BT * (ln + wide)
    att = 4 if precision.startswith("16-") else e  # the attention read's dtype: float32 under float16 (attention_dtype)
    if kernel == "reference":
        dropout_mask = 1 if device_type == "cuda" else e  # CUDA: bool mask; CPU: float noise
        ln_att = 4 if att == 4 else ln  # the read's layer norm runs in its dtype
        # a, rope(a), b, z moved heads-major (and the dropout mask), q in the read's dtype for q qT; x broadcast
        # over heads for x @ encoder and for S @ x, y cast for y @ encoder_v, ln's input; the scores; ln's stats.
        n_wide = BHTN * (3 * e + att + (dropout_mask if cfg.dropout > 0 else 0))
        layer = n_wide + BHTD * (att + ln_att) + B * H * T * T * att + 2 * BHT * ln_att
        # x broadcast over heads: a copy each when B > 1; at B = 1 views, B x T x D numbers (measured): x's, or
        # under bf16-mixed those of its two bfloat16 casts (16-mixed reads S @ x in float32: one cast)
        layer += 2 * BHTD * e if B > 1 else (2 if autocast and att == e else 1) * BTD * e
        # The encoders as the matmuls keep them: broadcast over the batch (a copy each) when B > 1, else their
        # low-precision casts; and the decoder's cast. Per layer: Lightning's autocast keeps no cast cache
        # (cache_enabled=False), so every layer casts the shared weights again and keeps its own copies.
        layer += 2 * B * H * D * N * e if B > 1 else (2 * H * D * N * e if autocast else 0)
        layer += H * N * D * e if autocast else 0
    else:
        acc = 8 if e == 8 else 4  # y and its rstd: float32 whatever the weights (float64 under 64-true)
        # x (the layer input), S (the scores), y and its rstd.
        layer = BTD * wide + B * H * T * T * att + BHTD * acc + BHT * acc
    return head + L * (layer + tail)


def transient_bytes(kernel: str, cfg: BDHConfig, batch: int, length: int, precision: str, chunk_size: int) -> int:
    """The largest working set on top of the weights, AdamW state and saved tensors: either the loss's
    gradients at the start of the backward, or the gradient buffers plus one layer's backward."""
    p, e, autocast = byte_sizes(precision)
    B, T, D, H, N, V = batch, length, cfg.n_embd, cfg.n_head, cfg.neurons_per_head, cfg.vocab_size
    loss = B * T * V * (8 + (e if autocast else 0))  # float32 gradients of log_softmax and the logits
    grads = cfg.num_parameters * p
    if kernel == "reference":
        # Measured: the backward frees the saved N-wide tensors about as fast as it makes their gradients.
        return max(loss, grads)
    weights = 3 * H * D * N  # elements of the three N-wide weights
    width = chunk_width(chunk_size, B * T, N)
    # Per chunk (measured on the CPU): about 11 B x T x chunk tensors live at once in the backward (a, b,
    # z, dz, db, da, the dropout mask, rope's temporaries, two of them float32 under autocast); the
    # T x T score gradients of one head; under autocast, the weights' low-precision copies (the float32
    # gradient accumulators become the gradients).
    att = 4 if precision.startswith("16-") else e  # T x T score gradients in the read's dtype (float32 under float16)
    # Under 16-true and bf16-true, the float32 accumulators of the N-wide weights' gradients (cast at the end).
    low_true = weights * 4 if not autocast and e < 4 else 0
    working = B * T * width * (11 * e + 8) + 3 * B * T * T * att + (weights * e if autocast else 0) + low_true
    return max(loss, grads + working)


def estimate_memory(
    model_kwargs: dict,
    batch_size: int,
    block_size: int,
    precision="32-true",
    device_type: str = "cuda",
    world_size: int = 1,
) -> MemoryReport:
    """Predicted memory of one training step (forward, backward, AdamW) for each implementation, per device
    when `world_size` devices train together (DDP)."""
    precision = normalize_precision(precision)
    cfg = BDHConfig.from_dict(model_kwargs)
    p = byte_sizes(precision)[0]
    params = cfg.num_parameters
    report = MemoryReport(
        params, params * p, params * p, 2 * params * p, batch_size, block_size, precision, device_type
    )
    # DDP (gradient_as_bucket_view=False, as Lightning builds it) copies the gradients into its all-reduce
    # buckets, in the parameters' dtype: "the saved memory size will be equal to the total gradients size"
    # with bucket views on (torch.nn.parallel.DistributedDataParallel's documentation).
    report.world_size, report.bucket_bytes = world_size, (params * p if world_size > 1 else 0)
    static = report.weight_bytes + report.optimizer_bytes + report.bucket_bytes  # gradients: in the transient
    if model_kwargs.get("carry_state"):
        # During a step two states live per layer: the incoming one (saved for backward: the read uses it) and
        # the one the window writes (kept for the next step); between steps only the written states. (A layer's
        # qᵀ x, made while it writes, is gone before the backward's peak: measured.)
        report.state_bytes = carried_state_bytes(cfg, batch_size, precision)
        static += 2 * report.state_bytes
    for kernel in MODELLED_KERNELS:
        saved = saved_bytes(kernel, cfg, batch_size, block_size, precision, device_type)
        if report.state_bytes:
            # Each row continues its stream at its own position: cos/sin per row (B x T x N, float32), not shared.
            saved += 2 * (batch_size - 1) * block_size * cfg.neurons_per_head * 4
            if kernel == "reference" and precision.startswith("bf16-"):
                saved += report.state_bytes // 2  # the read's bfloat16 copy of it (float16 reads in float32)
        transient = transient_bytes(kernel, cfg, batch_size, block_size, precision, cfg.chunk_size)
        peak = static + saved + transient
        report.kernels[kernel] = KernelMemory(saved, transient, peak, device_bytes(peak, device_type, world_size))
    return report


def largest_batch(
    model_kwargs: dict, block_size: int, precision, device_type: str, kernel: str, budget: int, world_size: int = 1
) -> int:
    """The largest batch size whose predicted device memory (`device_bytes`: on CUDA, the overheads included)
    fits `budget` (0 if none does)."""

    def peak(batch: int) -> int:
        report = estimate_memory(model_kwargs, batch, block_size, precision, device_type, world_size)
        return report.kernels[kernel].device_bytes

    if peak(1) > budget:
        return 0
    low = 1
    while peak(low * 2) <= budget:
        low *= 2
    # peak(low) fits, peak(2 * low) does not: the batches in between that fit come first
    return low - 1 + bisect.bisect_right(range(low, 2 * low), budget, key=peak)


def render(report: MemoryReport, model_kwargs: dict, budget: int | None) -> str:
    """The table `estimate` prints."""
    r = report
    lines = [
        f"parameters: {r.parameters:,}",
        f"weights: {format_bytes(r.weight_bytes)}   gradients: {format_bytes(r.grad_bytes)}   "
        f"AdamW state: {format_bytes(r.optimizer_bytes)}",
        f"batch {r.batch_size} x block {r.block_size}, precision {r.precision}, device {r.device_type}",
    ]
    if r.state_bytes:
        lines.append(
            f"carried state (model.carry_state): {format_bytes(r.state_bytes)} kept between steps, twice that "
            "during a step (the incoming and the written state), in every kernel's peak"
        )
    lines.append(
        f"{'kernel':<10} {'saved for backward':>20} {'transient':>12} {'predicted peak':>16} {'device needs':>14}"
        + ("   fits" if budget else "")
    )
    for kernel, mem in r.kernels.items():
        row = (f"{kernel:<10} {format_bytes(mem.saved_bytes):>20} {format_bytes(mem.transient_bytes):>12} "
               f"{format_bytes(mem.peak_bytes):>16} {format_bytes(mem.device_bytes):>14}")  # fmt: skip
        if budget:
            fits = mem.device_bytes <= budget
            most = largest_batch(model_kwargs, r.block_size, r.precision, r.device_type, kernel, budget, r.world_size)
            row += f"   {'yes' if fits else 'no '} (largest batch that fits {format_bytes(budget)}: {most})"
        lines.append(row)
    if r.device_type == "cuda":
        nccl = f" + {format_bytes(NCCL_BUFFER_BYTES)} NCCL buffers" if r.world_size > 1 else ""
        lines.append(
            f"device needs = predicted peak x {1 + ALLOCATOR_SLACK:.2f} (allocator rounding and fragmentation) + "
            f"{format_bytes(CUDA_CONTEXT_BYTES)} CUDA context + {format_bytes(CUBLAS_WORKSPACE_BYTES)} cuBLAS workspaces{nccl}"
            + (f"; DDP's gradient buckets ({format_bytes(r.bucket_bytes)}) are in the peak" if r.bucket_bytes else "")
        )
    lines.append(PREDICTION_NOTE)
    lines.append(
        "model.kernel auto on CUDA uses the reference where its predicted peak fits the GPU with a margin, else "
        "chunked; on the CPU the reference for small layers (B*H*T*N under 2**23) and chunked above; never fused "
        "(Triton, keeps chunked's bytes; its GPU speed is not measured)."
    )
    return "\n".join(lines)


# `auto` on CUDA runs the reference kernel (the fastest: nothing recomputed) where its predicted peak fits
# the device with room to spare: the peak plus AUTO_ERROR_MARGIN of it (the estimate's tolerance against
# measurement) plus AUTO_FIXED_MARGIN (CUDA context, cuBLAS workspaces, allocator rounding). Else chunked.
AUTO_ERROR_MARGIN = 0.15
AUTO_FIXED_MARGIN = 2**30


def fits_device(peak_bytes: int, device_bytes: int) -> bool:
    return peak_bytes * (1 + AUTO_ERROR_MARGIN) + AUTO_FIXED_MARGIN <= device_bytes


def choose_kernel(
    config: BDHConfig,
    batch_size: int,
    block_size: int,
    precision: str,
    device: torch.device | str,
    device_bytes: int | None = None,
    carry_state: bool = False,
) -> tuple[str, str]:
    """(kernel, one-line reason for the run's header) for what `config.kernel` stands for in this run. `auto` on
    CUDA: the reference if its predicted peak fits `device_bytes` (default: the device's) with the margins above,
    else chunked; on the CPU kernels.resolve_kernel's rule. `carry_state`: the carried state's bytes count."""
    device = torch.device(device)
    B, T, H, N = batch_size, block_size, config.n_head, config.neurons_per_head
    if config.kernel != "auto":
        return resolve_kernel(config.kernel, device), f"kernel {config.kernel}: set by model.kernel"
    if device.type != "cuda":
        kernel = resolve_kernel("auto", device, n_wide=B * H * T * N)
        side = "below" if kernel == "reference" else "from"
        return kernel, (f"kernel {kernel}: on the {device.type.upper()}, {side} 2**{CPU_CHUNKED_FROM.bit_length() - 1} "
                        f"elements per B x H x T x N tensor (this run: {B * H * T * N:,}), measured faster")  # fmt: skip
    total = device_bytes if device_bytes is not None else device_memory(device)[0]
    if total is None:  # NVML unreadable: ask torch, which creates a CUDA context; no GPU visible: Lightning refuses
        total = torch.cuda.get_device_properties(device).total_memory if torch.cuda.device_count() else 0
    settings = {**dataclasses.asdict(config), "carry_state": carry_state}  # the carried state's bytes count too
    peaks = {k: m.peak_bytes for k, m in estimate_memory(settings, B, T, precision, "cuda").kernels.items()}
    if fits_device(peaks["reference"], total):
        return "reference", (f"kernel reference: it needs {format_bytes(peaks['reference'])} (predicted), "
                             f"the GPU has {format_bytes(total)}")  # fmt: skip
    reason = f"kernel chunked: reference needs {format_bytes(peaks['reference'])}, the GPU has {format_bytes(total)}"
    if not fits_device(peaks["chunked"], total):
        reason += f"; chunked needs {format_bytes(peaks['chunked'])} and may not fit either: lower data.batch_size"
    return "chunked", reason
