"""BDH, the model: settings, weights and the parallel forward pass (see the spec, `bdh.md`).

Everything the other modules need about the math lives here: `layer_norm`, the rotary phases, one
BDH layer written plainly (`reference_layer`), and `BDH`, which applies the shared layer `n_layer`
times. Faster layer implementations live in `kernels.py` and must agree with `reference_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 2.0**16
LN_EPS = 1e-5
Kernel = Literal["auto", "reference", "chunked", "fused"]


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the setting and the rule."""


@dataclass
class BDHConfig:
    """BDH model settings (the BDH configuration guide's names and defaults).

    Args:
        n_layer: How many times the one shared layer is applied (L). Costs compute and activation
            memory, never parameters.
        n_embd: Embedding width D. Parameters and compute grow linearly with it.
        dropout: Dropout probability on the sparse product a*b during training, in [0, 1).
        n_head: Number of heads H. Neurons per head are N = mlp_internal_dim_multiplier * n_embd // n_head.
        mlp_internal_dim_multiplier: Neuron multiplier m; total neurons H*N is about m*D. The main
            driver of parameters, compute and memory.
        vocab_size: Vocabulary size; byte-level data needs exactly 256.
        kernel: Layer implementation: reference (plain autograd), chunked (recomputes the N-wide
            activations in backward, chunk by chunk: far less memory), fused (Triton, CUDA only), or
            auto (the best available). Checkpoints do not depend on it.
        chunk_size: Neurons per chunk for the chunked/fused kernels (0 = choose automatically).
    """

    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256
    kernel: Kernel = "auto"
    chunk_size: int = 0

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.vocab_size != 256:
            raise ConfigError(
                f"model.vocab_size must be 256 for byte-level data (one token per byte value), got {self.vocab_size!r}"
            )
        if self.neurons_per_head <= 0 or self.neurons_per_head % 2:
            raise ConfigError(
                "model.mlp_internal_dim_multiplier * model.n_embd // model.n_head (neurons per head, N) must be "
                f"a positive even number for the rotary pairs, got {self.neurons_per_head}"
            )
        if self.kernel not in ("auto", "reference", "chunked", "fused"):
            raise ConfigError(f"model.kernel must be one of auto, reference, chunked, fused; got {self.kernel!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(f"model.chunk_size must be a non-negative integer (0 = automatic), got {self.chunk_size!r}")

    @property
    def neurons_per_head(self) -> int:
        """N in the spec."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        return 3 * self.n_head * self.neurons_per_head * self.n_embd + 2 * self.vocab_size * self.n_embd


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with no learned scale or bias."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def rope_frequencies(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-channel frequency (turns per position), float32, in the reference's order of operations."""
    k = torch.div(torch.arange(n, dtype=torch.float32, device=device), 2, rounding_mode="floor") * 2
    return 1.0 / (ROPE_THETA ** (k / n)) / (2 * math.pi)


def rope_cos_sin(positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary phases, shape (len(positions), n), always float32.

    The phase is 2*pi*frac(t * f) computed in float32: the fractional part is taken before the
    multiplication by 2*pi so that large positions keep their precision.
    """
    turns = positions.to(torch.float32).unsqueeze(-1) * rope_frequencies(n, positions.device)
    phases = (turns % 1.0) * (2 * math.pi)
    return torch.cos(phases), torch.sin(phases)


def rope(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of v by the phases: (v0, v1) -> (v0 c - v1 s, v1 c + v0 s)."""
    partner = torch.stack((-v[..., 1::2], v[..., 0::2]), dim=-1).flatten(-2)
    return (v * cos).to(v.dtype) + (partner * sin).to(v.dtype)


def causal_attention(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ln(strict_lower(q @ qᵀ) @ x), no softmax, no scaling: (B, H, T, N), (B, 1, T, D) -> (B, H, T, D).

    Computed in float32 when q is float16 (16-mixed): the scores reach hundreds and S @ x sums T of them,
    past float16's largest value, 65504.
    """
    if q.dtype == torch.float16:
        with torch.autocast(q.device.type, enabled=False):
            return causal_attention(q.float(), x.float()).to(x.dtype)
    scores = (q @ q.transpose(-1, -2)).tril(diagonal=-1)  # strictly causal
    return layer_norm(scores @ x)


def reference_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dropout: float,
    training: bool,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One BDH layer, exactly as the spec writes it. x: (B, 1, T, D) -> (B, 1, T, D).

    Autograd keeps every N-wide intermediate; `kernels.py` has the memory-lean versions.
    `dropout_mask` (B, H, T, N of 0/1), if given, replaces random dropout (for exactness tests).
    """
    B, _, T, D = x.shape
    H, _, N = encoder.shape
    a = F.relu(x @ encoder)  # B, H, T, N
    q = rope(a, cos, sin)
    y = causal_attention(q, x)  # B, H, T, D
    b = F.relu(y @ encoder_v)  # B, H, T, N
    z = a * b
    if dropout_mask is not None:
        z = z * dropout_mask / (1.0 - dropout)
    elif training and dropout > 0:
        z = F.dropout(z, dropout, training=True)
    u = z.transpose(1, 2).reshape(B, 1, T, H * N) @ decoder  # heads major
    return layer_norm(x + layer_norm(u))


class BDH(nn.Module):
    """The BDH language model: bytes (B, T) in, next-byte logits (B, T, 256) out."""

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        H, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))
        self.decoder = nn.Parameter(torch.empty(H * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def embed_bytes(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, 1, T, D) layer-0 input."""
        return layer_norm(self.embed(idx)).unsqueeze(1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        from .kernels import bdh_layer  # the one switch between implementations

        T = idx.shape[1]
        cos, sin = rope_cos_sin(torch.arange(T, device=idx.device), self.config.neurons_per_head)
        x = self.embed_bytes(idx)
        for _ in range(self.config.n_layer):
            x = bdh_layer(x, self, cos, sin)
        return x.squeeze(1) @ self.lm_head
