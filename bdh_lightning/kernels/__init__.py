"""How a layer is computed (`model.kernel`), behind one entry point, `apply_layer`: `reference` (layer.py under
autograd), `chunked` (chunked.py, recomputing the N-wide tensors in backward) or `fused` (fused.py, Triton,
experimental: `auto` never picks it). All compute the same function with the same weights.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import ConfigError
from ..layer import causal_attention, reference_layer, stream_attention
from .chunked import chunked_layer

# The layer implementations `model.kernel` can name; `auto` picks one of the others per device and size.
KERNELS = ("auto", "reference", "chunked", "fused")

# Where `auto` switches to `chunked` on the CPU, in elements of one B x H x T x N tensor: above it the reference's
# N-wide tensors stop fitting in cache (measured, BENCHMARKS.md).
CPU_CHUNKED_FROM = 2**23


def resolve_kernel(kernel: str, device: torch.device, n_wide: int = 0) -> str:
    """The implementation `kernel` stands for on `device`; `ConfigError` if it cannot run there.

    `auto` on the CPU: `reference` below CPU_CHUNKED_FROM elements of one B x H x T x N tensor (`n_wide`), else
    `chunked`. On CUDA a training run resolves `auto` by predicted memory (`estimate.choose_kernel`); where
    nothing did (a bare `BDH` on a GPU) it is `chunked`, the kernel that fits.
    """
    if kernel == "auto":
        return "reference" if device.type == "cpu" and n_wide < CPU_CHUNKED_FROM else "chunked"
    if kernel == "fused":
        reason = fused_unavailable(device)
        if reason:
            raise ConfigError(f"model.kernel=fused cannot run here: {reason}; use model.kernel=chunked (or auto)")
        return kernel
    if kernel not in KERNELS:
        raise ConfigError(f"model.kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    return kernel


def fused_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on `device`'s tensors, or None if it can (triton is not imported here)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"it needs a CUDA device; on {device.type} tensors it runs only under TRITON_INTERPRET=1 "
        "(Triton's interpreter: slow, for tests)"
    )


def apply_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    kernel: str = "auto",
    dropout: float = 0.0,
    training: bool = False,
    chunk_size: int = 0,
    stream: bool = False,
    state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One layer on x: (B, 1, T, D) with the implementation `kernel` stands for here (weights in, not a module).

    With `stream` the window continues a stream: the attention also reads `state` (B, H, N, D, the earlier
    windows' sum of qᵀ x; None = a new stream) and the call returns (output, the state after the window)
    (see layer.stream_attention). The fused kernel does not read a carried state: `fused` runs chunked then.
    """
    B, _, T, _ = x.shape
    H, _, N = encoder.shape
    chosen = resolve_kernel(kernel, x.device, n_wide=B * H * T * N)
    p = dropout if training else 0.0  # the dropout applied
    if chosen == "fused" and not stream:  # experimental: never run inside a compile region yet
        from .fused import fused_layer  # imports triton: only when asked for

        return fused_layer(x, encoder, encoder_v, decoder, cos, sin, p, chunk_size=chunk_size)
    return layer_region(x, encoder, encoder_v, decoder, cos, sin, chosen, p, chunk_size, stream, state)


# `torch.compile` traces BDH's layers (one set of weights, the same shapes) as one nested region compiled once
# and stamped out n_layer times, instead of unrolling every layer into one graph: the chunked kernel's heads and
# chunks unroll into many kernels, and compiling them for every layer took minutes (BENCHMARKS.md). Outside
# torch.compile the wrapper just calls the function.
@getattr(torch.compiler, "nested_compile_region", lambda fn: fn)  # torch >= 2.8
def layer_region(x, encoder, encoder_v, decoder, cos, sin, kernel, p, chunk_size, stream, state):
    """`apply_layer` once the kernel is resolved (reference, or chunked for the others) and `p` is the dropout
    applied: a function without side effects, so it can be a compile region."""
    written: list[torch.Tensor] | None = [] if stream else None
    if kernel == "reference":
        read = stream_attention(state, written) if stream else causal_attention
        x = reference_layer(x, encoder, encoder_v, decoder, cos, sin, p, training=True, read=read)
    else:
        x = chunked_layer(
            x, encoder, encoder_v, decoder, cos, sin, p, chunk_size=chunk_size, state=state, states_out=written
        )
    return (x, written[0]) if stream else x
