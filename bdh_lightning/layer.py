"""The BDH layer's math, once: every schedule (reference, chunked, fused, recurrent, the monitors) uses these.

One layer (spec, `bdh.md`), x: (B, 1, T, D) the layer input:
    a = relu(x @ encoder)                      B, H, T, N   sparse, non-negative neurons
    y = ln(strict_lower(q qᵀ) @ x), q = rope(a) B, H, T, D   linear attention: no softmax, queries = keys
    b = relu(y @ encoder_v)                    B, H, T, N
    u = (a * b, dropped out) @ decoder         B, 1, T, D   heads major
    out = ln(x + ln(u))

`reference_layer` is that statement under plain autograd; `neuron_activations` gives a and b to whoever
needs them (the sparsity monitor, inspect), with the attention read supplied by the caller (the
recurrent generator reads a running state instead of the T x T scores).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

ROPE_THETA = 2.0**16
LN_EPS = 1e-5
# Positions from which the rotary phases are computed in float64 (see rope_cos_sin): past every window length
# the reference is run at, and where float32's error in t * f would reach 1e-3 rad.
EXACT_PHASES_FROM = 2**13

# read(q, x) -> y: the attention read of queries q (B, H, T, N) over layer inputs x (B, 1, T, D).
AttentionRead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with no learned scale or bias."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def rope_frequencies(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-channel frequency (turns per position), float32, in the reference's order of operations."""
    k = torch.div(torch.arange(n, dtype=torch.float32, device=device), 2, rounding_mode="floor") * 2
    return 1.0 / (ROPE_THETA ** (k / n)) / (2 * math.pi)


def rope_cos_sin(positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary phases at `positions` (any shape P), shape (*P, n), always float32.

    Below EXACT_PHASES_FROM the phase is the reference's: 2*pi*frac(t * f) with t * f in float32, so the
    reference's window lengths give the reference's bits. From there on (long streams, long generations)
    float32 has lost the phase (at t = 10^7 its spacing is about 0.1 of a turn), so t * f is taken in
    float64 before its fractional part: within 1e-6 rad of exact up to t = 10^9 and beyond.
    """
    f = rope_frequencies(n, positions.device)
    turns = positions.to(torch.float32).unsqueeze(-1) * f
    frac = turns % 1.0
    # Both are computed and selected per position: asking whether any position is large would be a host sync
    # every forward on a GPU (and a graph break under torch.compile); the float64 product is P x n numbers once.
    exact = ((positions.to(torch.float64).unsqueeze(-1) * f.to(torch.float64)) % 1.0).to(torch.float32)
    frac = torch.where(positions.unsqueeze(-1) >= EXACT_PHASES_FROM, exact, frac)
    phases = frac * (2 * math.pi)
    return torch.cos(phases), torch.sin(phases)


def rope(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of v by the phases: (v0, v1) -> (v0 c - v1 s, v1 c + v0 s)."""
    partner = torch.stack((-v[..., 1::2], v[..., 0::2]), dim=-1).flatten(-2)
    return (v * cos).to(v.dtype) + (partner * sin).to(v.dtype)


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and S @ x in float32 under float16: they pass float16's largest value, 65504."""
    return torch.float32 if dtype == torch.float16 else dtype


def causal_attention(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ln(strict_lower(q @ qᵀ) @ x), no softmax, no scaling: (B, H, T, N), (B, 1, T, D) -> (B, H, T, D).

    Computed in float32 when q is float16 (16-mixed, 16-true): the scores reach hundreds and S @ x sums
    T of them, past float16's largest value.
    """
    if q.dtype == torch.float16:
        with torch.autocast(q.device.type, enabled=False):
            return causal_attention(q.float(), x.float()).to(x.dtype)
    scores = (q @ q.transpose(-1, -2)).tril(diagonal=-1)  # strictly causal
    return layer_norm(scores @ x)


def stream_attention(state: torch.Tensor | None, states_out: list, exact: bool = False) -> AttentionRead:
    """The attention read of a window that continues a stream (a carried state, and generation).

    read(q, x) = ln(q M + strict_lower(q qᵀ) x), where M (B, H, N, D, float32 or wider) is the sum of qᵀ x over every
    earlier byte of the stream (None: the stream starts here). It is a constant: gradients stay within the
    window (truncated backpropagation through time). The state after the window, M + qᵀ x, is appended to
    `states_out`. Over a whole stream this is `causal_attention` of one long pass. `exact` computes in float32
    whatever the autocast (generation); otherwise the dtypes are causal_attention's.
    """

    def read(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if exact or q.dtype == torch.float16:
            wide = torch.promote_types(q.dtype, torch.float32)
            with torch.autocast(q.device.type, enabled=False):
                y = carried_read(q.to(wide), x.to(wide), state, states_out)
            return y if exact else y.to(x.dtype)
        return carried_read(q, x, state, states_out)

    return read


def carried_read(q: torch.Tensor, x: torch.Tensor, state: torch.Tensor | None, states_out: list) -> torch.Tensor:
    y = (q @ q.transpose(-1, -2)).tril(diagonal=-1) @ x  # within the window, strictly causal
    if state is not None:
        y = y + q @ state.to(q.dtype)  # every earlier window of the stream
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # the state accumulates: never in 16 bits
        wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 when computing in float64
        written = q.detach().to(wide).transpose(-1, -2) @ x.detach().to(wide)  # (B, H, N, D): this window's qᵀ x
        states_out.append(written if state is None else state + written)
    return layer_norm(y)


def neuron_activations(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    read: AttentionRead = causal_attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's two sparse activations a = relu(x E) and b = relu(read(rope(a), x) Ev), each (B, H, T, N)."""
    a = F.relu(x @ encoder)
    y = read(rope(a, cos, sin), x)
    b = F.relu(y @ encoder_v)
    return a, b


def decode(z: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """(B, H, T, N) neuron values -> (B, 1, T, D) through the (H*N, D) decoder, heads major."""
    B, H, T, N = z.shape
    return z.transpose(1, 2).reshape(B, 1, T, H * N) @ decoder


def layer_output(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The layer's tail: ln(x + ln(u)), the residual stream after the layer."""
    return layer_norm(x + layer_norm(u))


def reference_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
    read: AttentionRead = causal_attention,
) -> torch.Tensor:
    """One BDH layer, exactly as the spec writes it. x: (B, 1, T, D) -> (B, 1, T, D).

    Autograd keeps every N-wide intermediate; `kernels.py` has the memory-lean schedules.
    `dropout_mask` (B, H, T, N of 0/1), if given, replaces random dropout (for exactness tests).
    """
    a, b = neuron_activations(x, encoder, encoder_v, cos, sin, read)
    z = a * b
    if dropout_mask is not None:
        z = z * dropout_mask / (1.0 - dropout)
    elif training and dropout > 0:
        z = F.dropout(z, dropout, training=True)
    return layer_output(x, decode(z, decoder))
