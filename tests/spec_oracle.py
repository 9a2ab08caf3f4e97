"""A second, independent BDH forward pass, written only from the spec (/work/shared/spec/bdh.md).

It is deliberately plain: explicit per-head loops, a hand-written layer norm, an explicit strictly
lower-triangular mask, explicit head-major concatenation, no dropout. Tests compare the model and
every fast path against it. It works in whatever float dtype the weights have (float64 for gradient
checks); only the rope phases are always float32, as the spec demands.

Shapes: x is B x T x D (the spec's broadcast "head" axis of size 1 is dropped), encoder and
encoder_v are H x D x N, decoder is (H*N) x D, lm_head is D x V, embed is V x D.
"""

import math

import torch

ROPE_THETA = 2.0**16
LN_EPS = 1e-5


def oracle_layer_norm(z):
    """LayerNorm over the last axis, no learned scale or bias, biased variance, eps 1e-5."""
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + LN_EPS)


def oracle_rope_frequencies(N):
    """f_n for channels n = 0..N-1, float32; pairs (2i, 2i+1) share k = 2*floor(n/2).

    The spec writes f_n = 1 / (2*pi * theta^(k/N)); the public reference computes it as
    (1 / theta^(k/N)) / (2*pi) in float32, and the spec says the reference's arithmetic is the
    truth, so this follows the reference's order of operations (the two differ by float32 rounding).
    """
    n = torch.arange(N, dtype=torch.float32)
    k = 2.0 * torch.floor(n / 2.0)
    theta_power = torch.pow(torch.tensor(ROPE_THETA, dtype=torch.float32), k / N)
    return (1.0 / theta_power) / (2.0 * math.pi)


def oracle_rope_phases(positions, N):
    """Phases phi[t, n] = 2*pi * frac(t * f_n), all in float32, for absolute 0-based positions."""
    t = positions.to(torch.float32).reshape(-1, 1)
    turns = t * oracle_rope_frequencies(N).reshape(1, -1)
    return (turns - torch.floor(turns)) * (2.0 * math.pi)


def oracle_rope(a, positions):
    """Rotate channel pairs (v0, v1) -> (v0 cos - v1 sin, v1 cos + v0 sin); a is ... x T x N."""
    phases = oracle_rope_phases(positions, a.shape[-1])
    cos = torch.cos(phases).to(a.dtype)
    sin = torch.sin(phases).to(a.dtype)
    v0 = a[..., 0::2]
    v1 = a[..., 1::2]
    cos_pair = cos[..., 0::2]  # both channels of a pair share one phase
    sin_pair = sin[..., 0::2]
    r0 = v0 * cos_pair - v1 * sin_pair
    r1 = v1 * cos_pair + v0 * sin_pair
    return torch.stack([r0, r1], dim=-1).reshape(a.shape)


def oracle_layer(x, encoder, encoder_v, decoder):
    """One BDH layer (no dropout): x is B x T x D, returns the next B x T x D."""
    B, T, D = x.shape
    H, _, N = encoder.shape
    positions = torch.arange(T)
    strictly_lower = torch.tril(torch.ones(T, T, dtype=x.dtype), diagonal=-1)
    z_per_head = []
    for h in range(H):
        a = torch.relu(x @ encoder[h])  # B x T x N
        q = oracle_rope(a, positions)
        scores = (q @ q.transpose(-1, -2)) * strictly_lower  # B x T x T, s < t only, no softmax
        y = oracle_layer_norm(scores @ x)  # values are x itself
        b = torch.relu(y @ encoder_v[h])
        z_per_head.append(a * b)
    z = torch.cat(z_per_head, dim=-1)  # B x T x (H*N): neuron n of head h is column h*N + n
    u = z @ decoder
    return oracle_layer_norm(x + oracle_layer_norm(u))


def oracle_logits(idx, embed, encoder, encoder_v, decoder, lm_head, n_layer):
    """Byte logits B x T x V for idx (B x T integer bytes); embed is the V x D weight tensor."""
    x = oracle_layer_norm(embed[idx])
    for _ in range(n_layer):
        x = oracle_layer(x, encoder, encoder_v, decoder)
    return x @ lm_head


def oracle_logits_of(model, idx):
    """oracle_logits with the weights (and n_layer) of a `BDH` model."""
    return oracle_logits(
        idx, model.embed.weight, model.encoder, model.encoder_v, model.decoder, model.lm_head, model.config.n_layer
    )


def oracle_loss(logits, targets):
    """Mean cross-entropy of B x T x V logits against B x T target bytes, written out."""
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = torch.gather(log_probs, -1, targets.unsqueeze(-1)).squeeze(-1)
    return -picked.mean()
