"""BDH layer implementations behind one switch, `BDHConfig.kernel`.

- `reference`: `layer.reference_layer` under plain autograd. It keeps several B x H x T x N tensors per
  layer for the backward pass.
- `chunked`: `ChunkedLayer`, a `torch.autograd.Function` in plain PyTorch (CPU and CUDA). It keeps only
  the D-wide layer input, the attention read-out y (normalised) and the T x T scores S, and recomputes
  the N-wide activations in the backward pass, one head and one chunk of neurons at a time, so the
  transient working set is a few B x T x chunk tensors. Dropout masks are regenerated from a seed.
- `fused` (Triton) does not ship: no kernel has been verified, so asking for it is a `ConfigError`.

All of them compute the same function with the same weights, so checkpoints do not depend on the choice.
The tests check `chunked` against `reference_layer`, outputs and every gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .layer import LN_EPS, attention_dtype, layer_output, reference_layer, rope

# The layer implementations `model.kernel` can name; `auto` picks one of the others per device and size.
KERNELS = ("auto", "reference", "chunked", "fused")

# Dropout masks are drawn per head and per block of this many neurons, each block from its own
# seeded generator, so a mask does not depend on the chunk size. Chunks are whole blocks; a head
# whose N is not a multiple of MASK_BLOCK is one block (and one chunk).
MASK_BLOCK = 64
# chunk_size 0 picks the largest chunk (whole heads preferred: no recomputation between the two passes
# over a head) whose B x T x chunk tensors stay under this many elements.
AUTO_CHUNK_ELEMENTS = 2**26
# Where `auto` switches to `chunked` on the CPU, in elements of one B x H x T x N tensor. Measured with
# benchmarks/train_step.py, 2 threads (BENCHMARKS.md): tiny (2.1 M) equal speed; 8gb at batch 2 (6.3 M)
# reference 12% faster; 14gb at batch 1 (9.4 M) chunked 30% faster. Above it the reference's N-wide
# tensors stop fitting in cache and memory traffic dominates.
CPU_CHUNKED_FROM = 2**23


def resolve_kernel(kernel: str, device: torch.device, n_wide: int = 0) -> str:
    """The implementation `kernel` stands for on `device`; `ConfigError` if it cannot run there.

    `auto` on CUDA: `chunked`, chosen for memory (it keeps about a tenth of the bytes); its GPU speed is
    not measured yet. On the CPU it depends on `n_wide`, the elements of one B x H x T x N tensor:
    `reference` below CPU_CHUNKED_FROM, `chunked` from there up (see CPU_CHUNKED_FROM).
    """
    if kernel == "auto":
        return "reference" if device.type == "cpu" and n_wide < CPU_CHUNKED_FROM else "chunked"
    if kernel == "fused":
        raise ConfigError(
            "model.kernel=fused is not available: no verified Triton kernel ships with this version; "
            "use model.kernel=chunked (or auto)"
        )
    if kernel not in KERNELS:
        raise ConfigError(f"model.kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    return kernel


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
) -> torch.Tensor:
    """One layer on x: (B, 1, T, D) with the implementation `kernel` stands for here (weights in, not a module)."""
    B, _, T, _ = x.shape
    H, _, N = encoder.shape
    if resolve_kernel(kernel, x.device, n_wide=B * H * T * N) == "reference":
        return reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout, training)
    return chunked_layer(x, encoder, encoder_v, decoder, cos, sin, dropout if training else 0.0, chunk_size=chunk_size)


def draw_seed() -> int:
    """A dropout seed for one layer call, from torch's global CPU generator (so `seed_everything` governs it)."""
    return int(torch.randint(0, 2**62, ()).item())


def chunk_width(chunk_size: int, batch_tokens: int, n: int) -> int:
    """Neurons per chunk: `chunk_size` rounded down to whole mask blocks (at least one), at most N.

    0 = automatic: a whole head if its B x T x N tensors fit in AUTO_CHUNK_ELEMENTS, else the largest
    number of whole blocks that does.
    """
    if chunk_size == 0:
        if batch_tokens * n <= AUTO_CHUNK_ELEMENTS:
            return n
        chunk_size = AUTO_CHUNK_ELEMENTS // batch_tokens
    if chunk_size >= n or n % MASK_BLOCK:
        return n
    return max(MASK_BLOCK, chunk_size // MASK_BLOCK * MASK_BLOCK)


def dropout_keep(seed: int, head: int, start: int, stop: int, batch: int, length: int, p: float, device) -> torch.Tensor:
    """Which of neurons [start, stop) of `head` survive dropout: bool (batch, length, blocks, block width).

    Block i comes from a generator seeded by (seed, head, i), so a seed gives the same mask whatever
    the chunking. The result is a permuted view: multiply it into z.view(batch, length, blocks, width).
    """
    width = MASK_BLOCK if (stop - start) % MASK_BLOCK == 0 else stop - start
    first = start // width
    generator = torch.Generator(device=device)
    uniform = torch.empty((stop - start) // width, batch, length, width, device=device)
    for i, block in enumerate(uniform):
        generator.manual_seed(hash((seed, head, first + i)) % 2**63)
        block.uniform_(generator=generator)
    return (uniform >= p).permute(1, 2, 0, 3)


def dropout_mask(seed: int, batch: int, n_head: int, length: int, n: int, p: float, device=None) -> torch.Tensor:
    """The full (B, H, T, N) 0/1 float mask that the chunked layer uses for `seed`; pass it to
    `reference_layer(..., dropout_mask=...)` to reproduce a chunked forward exactly."""
    heads = [dropout_keep(seed, h, 0, n, batch, length, p, device).reshape(batch, length, n) for h in range(n_head)]
    return torch.stack(heads, dim=1).float()


def apply_keep(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """z (B, T, chunk) times the chunk's dropout keep mask from `dropout_keep` (the 1/(1-p) is applied elsewhere)."""
    return (z.view(keep.shape) * keep).view(z.shape)


@torch.compiler.disable  # Python loops and seeded generators: torch.compile runs it as it is
def chunked_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dropout: float = 0.0,
    seed: int | None = None,
    chunk_size: int = 0,
) -> torch.Tensor:
    """The same function as `reference_layer`, without keeping N-wide tensors for backward.

    `dropout` is the probability actually applied (0 outside training); masks come from `seed`
    (see `dropout_mask`), drawn from torch's global generator when None. x: (B, 1, T, D) -> (B, 1, T, D).
    """
    if seed is None:
        seed = draw_seed() if dropout > 0 else 0
    B, _, T, D = x.shape
    N = encoder.shape[-1]
    width = chunk_width(chunk_size, B * T, N)
    u = ChunkedLayer.apply(x, encoder, encoder_v, decoder, cos, sin, float(dropout), int(seed), width)
    return layer_output(x, u)


def compute_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the products, dtype of layer norms and accumulations): autocast's dtype when it is on,
    as the reference gets from autocast, with layer norm in float32 as autocast runs it."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        return low, torch.float32
    return x.dtype, x.dtype


class ChunkedLayer(torch.autograd.Function):
    """u = (relu(x E) * relu(ln(tril(q q^T) x) Ev) * mask) @ Dec for all heads, q = rope(relu(x E)).

    Per head: pass 1 over neuron chunks accumulates S = sum_c q_c q_c^T; then y = ln(tril(S) x);
    pass 2 recomputes a_c (kept from pass 1 if the head is one chunk) and adds z_c @ Dec_c to u.
    Saved: x, S (B, H, T, T), y (B, H, T, D) and its rstd; the dropout seed, never a mask.
    """

    @staticmethod
    def forward(ctx, x, encoder, encoder_v, decoder, cos, sin, dropout, seed, width):
        dtype, acc = compute_dtypes(x)
        att = attention_dtype(dtype)
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype)
            enc, enc_v, dec = encoder.to(dtype), encoder_v.to(dtype), decoder.to(dtype).view(H, N, D)
            chunks = [(n0, min(n0 + width, N)) for n0 in range(0, N, width)]
            scores = torch.empty(B, H, T, T, dtype=att, device=x.device)
            ys = torch.empty(B, H, T, D, dtype=acc, device=x.device)
            rstds = torch.empty(B, H, T, 1, dtype=acc, device=x.device)
            u = torch.zeros(B, T, D, dtype=acc, device=x.device)
            for h in range(H):
                S = torch.zeros(B, T, T, dtype=acc, device=x.device)
                for n0, n1 in chunks:
                    a = F.relu(xc @ enc[h, :, n0:n1])
                    q = rope(a, cos[:, n0:n1], sin[:, n0:n1]).to(att)
                    S += q @ q.transpose(-1, -2)
                S = S.tril_(diagonal=-1).to(att)
                y, _, rstd = torch.native_layer_norm((S @ xc.to(att)).to(acc), (D,), None, None, LN_EPS)
                scores[:, h], ys[:, h], rstds[:, h] = S, y, rstd
                for n0, n1 in chunks:
                    if len(chunks) > 1:
                        a = F.relu(xc @ enc[h, :, n0:n1])
                    z = a * F.relu(y.to(dtype) @ enc_v[h, :, n0:n1])
                    if dropout > 0:
                        z = apply_keep(z, dropout_keep(seed, h, n0, n1, B, T, dropout, x.device))
                    u += z @ dec[h, n0:n1]
        u /= 1.0 - dropout  # dropout's scale, applied to the D-wide sum instead of every z
        ctx.save_for_backward(x, encoder, encoder_v, decoder, cos, sin, scores, ys, rstds)
        ctx.dropout, ctx.seed, ctx.width, ctx.dtypes = dropout, seed, width, (dtype, acc)
        return u.to(dtype).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad_u):
        x, encoder, encoder_v, decoder, cos, sin, scores, ys, rstds = ctx.saved_tensors
        dtype, acc = ctx.dtypes
        att = attention_dtype(dtype)
        dropout, seed, width = ctx.dropout, ctx.seed, ctx.width
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype)
            enc, enc_v, dec = encoder.to(dtype), encoder_v.to(dtype), decoder.to(dtype).view(H, N, D)
            du = (grad_u.squeeze(1) / (1.0 - dropout)).to(dtype)  # dropout's scale, as in forward
            chunks = [(n0, min(n0 + width, N)) for n0 in range(0, N, width)]
            one_chunk = len(chunks) == 1
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
                        keep = dropout_keep(seed, h, n0, n1, B, T, dropout, x.device)
                        z, dz = apply_keep(z, keep), apply_keep(dz, keep)
                    d_dec[h, n0:n1] += z.reshape(B * T, -1).T @ du_flat
                    db = dz * a * (b > 0)
                    d_enc_v[h, :, n0:n1] += yc.reshape(B * T, D).T @ db.reshape(B * T, -1)
                    dy += db @ enc_v[h, :, n0:n1].T
                    da_from_z = dz * b * (a > 0)
                    if not one_chunk:  # else it joins the rope path's share below: one product, not two
                        d_enc[h, :, n0:n1] += x_flat.T @ da_from_z.reshape(B * T, -1)
                        dx += da_from_z @ enc[h, :, n0:n1].T
                # y = ln(S x), S = tril(q q^T): back to S, then through q = rope(a) to a.
                dy_pre = rstd * (dy - dy.mean(-1, keepdim=True) - y * (dy * y).mean(-1, keepdim=True))
                dy_pre = dy_pre.to(att)
                dx += S.transpose(-1, -2) @ dy_pre
                dS = (dy_pre @ xc.to(att).transpose(-1, -2)).tril_(diagonal=-1)
                dS = dS + dS.transpose(-1, -2)
                # Pass B: the rope/score path.
                for n0, n1 in chunks:
                    if not one_chunk:
                        a = F.relu(xc @ enc[h, :, n0:n1])
                    q = rope(a, cos[:, n0:n1], sin[:, n0:n1])
                    dq = (dS @ q.to(att)).to(dtype)
                    da = rope(dq, cos[:, n0:n1], -sin[:, n0:n1]) * (a > 0)  # rope's inverse rotation
                    if one_chunk:
                        da = da + da_from_z
                    d_enc[h, :, n0:n1] += x_flat.T @ da.reshape(B * T, -1)
                    dx += da @ enc[h, :, n0:n1].T
        grads = dx.unsqueeze(1).to(x.dtype), d_enc.to(encoder.dtype), d_enc_v.to(encoder_v.dtype)
        return *grads, d_dec.view(H * N, D).to(decoder.dtype), None, None, None, None, None
