"""The chunked kernel: the reference layer's function, keeping only D-wide tensors and the T x T scores for
backward and recomputing the N-wide activations there one head and one chunk of neurons at a time. Dropout
masks come from a seed (masks.py): no Python RNG, no host sync, so `torch.compile` traces it whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import LN_EPS, attention_dtype, layer_output, rope
from .masks import block_keep

# chunk_size 0 picks the largest chunk (whole heads preferred: no recomputation between the two passes
# over a head) whose B x T x chunk tensors stay under this many elements; else equal chunks of N.
AUTO_CHUNK_ELEMENTS = 2**26


def draw_seed() -> torch.Tensor:
    """A dropout seed for one layer call: an int64 scalar tensor in [0, 2**62) from torch's global CPU
    generator (so `seed_everything` and the module's per-step reseeding govern it). A tensor, not an int:
    no host sync, and `torch.compile` traces the draw instead of breaking the graph."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def chunk_width(chunk_size: int, batch_tokens: int, n: int) -> int:
    """Neurons per chunk, an even number (rotary pairs stay in one chunk), at most N.

    0 = automatic: a whole head if its B x T x N tensors fit in AUTO_CHUNK_ELEMENTS, else N split into
    the fewest equal chunks that do. Any other size is used as given (rounded down to even, at least 2);
    the last chunk of a head takes what is left.
    """
    if chunk_size == 0:
        if batch_tokens * n <= AUTO_CHUNK_ELEMENTS:
            return n
        pieces = -(-batch_tokens * n // AUTO_CHUNK_ELEMENTS)
        chunk_size = -(-n // pieces)
        chunk_size += chunk_size % 2
    return min(n, max(2, chunk_size - chunk_size % 2))


def chunked_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dropout: float = 0.0,
    seed: int | torch.Tensor | None = None,
    chunk_size: int = 0,
    state: torch.Tensor | None = None,
    states_out: list | None = None,
) -> torch.Tensor:
    """The same function as `reference_layer`, without keeping N-wide tensors for backward.

    With `states_out`, the window continues a stream as in `apply_layer`: the attention adds q @ state, and
    the state after the window is appended to `states_out`.

    `dropout` is the probability actually applied (0 outside training); masks come from `seed` (an int
    or int64 tensor; `masks.dropout_mask(seed, ...)` is the full mask), drawn by `draw_seed` when None.
    x: (B, 1, T, D) -> (B, 1, T, D).
    """
    if seed is None:
        seed = draw_seed() if dropout > 0 else torch.zeros((), dtype=torch.int64)
    seed = torch.as_tensor(seed, dtype=torch.int64)
    B, _, T, D = x.shape
    N = encoder.shape[-1]
    width = chunk_width(chunk_size, B * T, N)
    if cos.dim() == 4:  # per-row positions (B, 1, T, N): the kernel works on (B, T, chunk) tensors
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    u = ChunkedLayer.apply(x, encoder, encoder_v, decoder, cos, sin, seed, float(dropout), width, state, states_out)
    return layer_output(x, u)


def compute_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the products, dtype of layer norms and accumulations). The products: autocast's dtype
    when it is on, else x's. Norms and accumulations: float32 (float64 for float64 inputs), so that
    neither 16-true's float16 nor bf16-true's 8-bit mantissa reaches a norm or a sum over chunks."""
    device_type = x.device.type
    low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return low, torch.float64 if x.dtype == torch.float64 and low == torch.float64 else torch.float32


def chunk_bounds(n: int, width: int) -> list[tuple[int, int]]:
    return [(n0, min(n0 + width, n)) for n0 in range(0, n, width)]


def read_backward(dy, y, rstd, S, xc, att):
    """Back through y = ln(S x): (the gradient before the norm, x's share through S x, dS); dS is symmetrised
    because S = tril(q qᵀ) holds each product twice."""
    dy_pre = (rstd * (dy - dy.mean(-1, keepdim=True) - y * (dy * y).mean(-1, keepdim=True))).to(att)
    dS = (dy_pre @ xc.to(att).transpose(-1, -2)).tril_(diagonal=-1)
    return dy_pre, S.transpose(-1, -2) @ dy_pre, dS + dS.transpose(-1, -2)


class ChunkedLayer(torch.autograd.Function):
    """u = (relu(x E) * relu(ln(tril(q q^T) x) Ev) * mask) @ Dec for all heads, q = rope(relu(x E)).

    Per head: pass 1 over neuron chunks accumulates S = sum_c q_c q_c^T; then y = ln(tril(S) x);
    pass 2 recomputes a_c (kept from pass 1 if the head is one chunk) and adds z_c @ Dec_c to u.
    Saved: x, S (B, H, T, T), y (B, H, T, D, float32) and its rstd; the dropout seed, never a mask.
    Shapes and chunk bounds are Python values, so `torch.compile` unrolls the loops into one graph.
    """

    @staticmethod
    def forward(ctx, x, encoder, encoder_v, decoder, cos, sin, seed, dropout, width, state=None, states_out=None):
        dtype, acc = compute_dtypes(x)
        att = attention_dtype(dtype)
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        chunks = chunk_bounds(N, width)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype)
            enc, enc_v, dec = encoder.to(dtype), encoder_v.to(dtype), decoder.to(dtype).view(H, N, D)
            device_seed = seed.to(x.device)
            scores, ys, rstds = [], [], []
            u = torch.zeros(B, T, D, dtype=acc, device=x.device)
            if states_out is not None:  # the state after this window, in float32 (or wider)
                wide = torch.promote_types(dtype, torch.float32)
                written = (
                    torch.zeros(B, H, N, D, dtype=wide, device=x.device) if state is None else state.to(wide).clone()
                )
            for h in range(H):
                S = torch.zeros(B, T, T, dtype=acc, device=x.device)
                carried = torch.zeros(B, T, D, dtype=acc, device=x.device) if state is not None else None
                for n0, n1 in chunks:
                    a = F.relu(xc @ enc[h, :, n0:n1])
                    q = rope(a, cos[..., n0:n1], sin[..., n0:n1]).to(att)
                    S += q @ q.transpose(-1, -2)
                    if state is not None:  # what the earlier windows of the stream give this chunk's queries
                        carried += q @ state[:, h, n0:n1].to(att)
                    if states_out is not None:
                        written[:, h, n0:n1] += q.to(wide).transpose(-1, -2) @ xc.to(wide)
                S = S.tril_(diagonal=-1).to(att)
                # The attention read in `att` (float32 under float16), its norm always in float32.
                read = (S @ xc.to(att)).to(acc)
                if carried is not None:
                    read = read + carried
                y, _, rstd = torch.native_layer_norm(read, (D,), None, None, LN_EPS)
                scores.append(S), ys.append(y), rstds.append(rstd)
                yc = y.to(dtype)
                for n0, n1 in chunks:
                    if len(chunks) > 1:
                        a = F.relu(xc @ enc[h, :, n0:n1])
                    z = a * F.relu(yc @ enc_v[h, :, n0:n1])
                    if dropout > 0:
                        z = z * block_keep(device_seed, h, B, T, n0, n1, dropout, x.device)
                    u += z @ dec[h, n0:n1]
            u /= 1.0 - dropout  # dropout's scale, applied to the D-wide sum instead of every z
        scores, ys, rstds = torch.stack(scores, 1), torch.stack(ys, 1), torch.stack(rstds, 1)
        if states_out is not None:
            states_out.append(written)
        ctx.save_for_backward(x, encoder, encoder_v, decoder, cos, sin, seed, scores, ys, rstds, state)
        ctx.dropout, ctx.width, ctx.dtypes = dropout, width, (dtype, acc)
        return u.to(dtype).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad_u):
        x, encoder, encoder_v, decoder, cos, sin, seed, scores, ys, rstds, state = ctx.saved_tensors
        dtype, acc = ctx.dtypes  # the forward's: the backward runs outside autocast
        att = attention_dtype(dtype)
        dropout, width = ctx.dropout, ctx.width
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        chunks = chunk_bounds(N, width)
        one_chunk = len(chunks) == 1
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype)
            enc, enc_v, dec = encoder.to(dtype), encoder_v.to(dtype), decoder.to(dtype).view(H, N, D)
            device_seed = seed.to(x.device)
            du = (grad_u.squeeze(1).to(acc) / (1.0 - dropout)).to(dtype)  # dropout's scale, as in forward
            dx = torch.zeros(B, T, D, dtype=acc, device=x.device)
            d_enc = torch.zeros(H, D, N, dtype=acc, device=x.device)
            d_enc_v = torch.zeros(H, D, N, dtype=acc, device=x.device)
            d_dec = torch.zeros(H, N, D, dtype=acc, device=x.device)
            x_flat, du_flat = xc.reshape(B * T, D), du.reshape(B * T, D)
            for h in range(H):
                S, y, rstd = scores[:, h], ys[:, h], rstds[:, h]
                yc = y.to(dtype)
                dy = torch.zeros(B, T, D, dtype=acc, device=x.device)
                # Pass A: the z = a * b * mask path, giving dy, d_dec, d_enc_v and a's share from z.
                for n0, n1 in chunks:
                    a = F.relu(xc @ enc[h, :, n0:n1])
                    b = F.relu(yc @ enc_v[h, :, n0:n1])
                    dz = du @ dec[h, n0:n1].T
                    z = a * b
                    if dropout > 0:
                        keep = block_keep(device_seed, h, B, T, n0, n1, dropout, x.device)
                        z, dz = z * keep, dz * keep
                    d_dec[h, n0:n1] += z.reshape(B * T, -1).T @ du_flat
                    db = dz * a * (b > 0)
                    d_enc_v[h, :, n0:n1] += yc.reshape(B * T, D).T @ db.reshape(B * T, -1)
                    dy += db @ enc_v[h, :, n0:n1].T
                    da_from_z = dz * b * (a > 0)
                    if not one_chunk:  # else it joins the rope path's share below: one product, not two
                        d_enc[h, :, n0:n1] += x_flat.T @ da_from_z.reshape(B * T, -1)
                        dx += da_from_z @ enc[h, :, n0:n1].T
                # y = ln(S x), S = tril(q q^T): back to S, then through q = rope(a) to a.
                dy_pre, dx_read, dS = read_backward(dy, y, rstd, S, xc, att)
                dx += dx_read
                # Pass B: the rope/score path.
                for n0, n1 in chunks:
                    if not one_chunk:
                        a = F.relu(xc @ enc[h, :, n0:n1])
                    q = rope(a, cos[..., n0:n1], sin[..., n0:n1])
                    dq = dS @ q.to(att)
                    if state is not None:  # y's pre-norm input also holds q @ state (a constant)
                        dq = dq + dy_pre @ state[:, h, n0:n1].to(att).transpose(-1, -2)
                    dq = dq.to(dtype)
                    da = rope(dq, cos[..., n0:n1], -sin[..., n0:n1]) * (a > 0)  # rope's inverse rotation
                    if one_chunk:
                        da = da + da_from_z
                    d_enc[h, :, n0:n1] += x_flat.T @ da.reshape(B * T, -1)
                    dx += da @ enc[h, :, n0:n1].T
        grads = dx.unsqueeze(1).to(x.dtype), d_enc.to(encoder.dtype), d_enc_v.to(encoder_v.dtype)
        return *grads, d_dec.view(H * N, D).to(decoder.dtype), None, None, None, None, None, None, None
