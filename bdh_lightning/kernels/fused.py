"""The fused BDH layer (`model.kernel: fused`, experimental): Triton kernels that keep every N-wide tensor on chip.

The same function, signature and dropout masks as `kernels.chunked_layer`. The D-wide and T x T parts (y = ln(S x)
and its backward, the layer norms) stay in PyTorch; a, b, q, z and their gradients are tiles made in registers from
x, y, the weights and the seed, never written out. docs/fused-kernel.md has each kernel's job, the tiling, why the
interpreter's products are rounded to the compute precision (`_round`, `_mm`), and the cost at the configs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from ..layer import LN_EPS, attention_dtype, layer_output
from . import masks
from .chunked import compute_dtypes, read_backward

# Decided when the kernels are decorated, as Triton decides it (it reads the variable at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes: `rows` positions (BT), `pairs` rotary pairs = 2 * pairs neurons (BP), `depth` of the
    D contraction (BD). `wide_rows` is BT for the decode and rows_z kernels: they hold (BT, D) float32
    accumulators but never remake q, so small row tiles cost them no FLOPs and spare registers. Powers
    of two, at least 16 (tl.dot's smallest). Untuned: no GPU has run them."""

    rows: int = 64
    pairs: int = 32
    depth: int = 64
    wide_rows: int = 32
    num_warps: int = 8

    def __post_init__(self) -> None:
        for name in ("rows", "pairs", "depth", "wide_rows"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"Tiles.{name} must be a power of two of at least 16, got {size}")


# --------------------------------------------------------------------------------------------------
# Elementwise helpers (inlined into the kernels)


@triton.jit
def _round(v, PREC: tl.constexpr):
    """fp32 v rounded to PREC's precision (to nearest even), kept in fp32."""
    if PREC == "bf16":
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif PREC == "fp16":
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _mm(a, b, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b for fp32 tiles, operands rounded to PREC, fp32 accumulation."""
    a = _round(a, PREC)
    b = _round(b, PREC)
    if EMULATE or PREC == "fp32":
        return tl.dot(a, b, input_precision="ieee")
    elif PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _mix32(h):
    """masks.mix32 on uint32 (wrapping multiplies, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0x735A2D97
    h = h ^ (h >> 15)
    return h


@triton.jit
def _row_hash(SEED_HASH, head, row):
    """The hash prefix shared by one (head, batch row): masks.entry_hash up to the row."""
    return _mix32(_mix32(tl.cast(SEED_HASH, tl.uint32) ^ tl.cast(head, tl.uint32)) ^ tl.cast(row, tl.uint32))


@triton.jit
def _keep_pairs(row_hash, positions, pairs, THRESHOLD):
    """Dropout keep masks of the even and odd neurons of each pair: two bool (BT, BP) tiles."""
    h_pos = _mix32(row_hash ^ positions.to(tl.uint32))
    even = (2 * pairs).to(tl.uint32)
    h_even = _mix32(h_pos[:, None] ^ even[None, :])
    h_odd = _mix32(h_pos[:, None] ^ (even + 1)[None, :])
    return (h_even >> 8) >= THRESHOLD, (h_odd >> 8) >= THRESHOLD


@triton.jit
def _pair_product(
    A,
    rows,
    row_ok,
    W,
    w_d,
    w_n,
    pairs,
    pair_ok,
    D,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """(A[rows] @ W[:, 2p], A[rows] @ W[:, 2p + 1]) for pairs p: A is (T, D) row-major, W[d, n] sits at
    W + d * w_d + n * w_n. Two (BT, BP) fp32 tiles, rounded to PREC as the product's output is."""
    even = tl.zeros((BT, BP), dtype=tl.float32)
    odd = tl.zeros((BT, BP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < D
        a = tl.load(A + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        a = a.to(tl.float32)
        w = W + d[:, None] * w_d + (2 * pairs)[None, :] * w_n
        w_ok = d_ok[:, None] & pair_ok[None, :]
        even += _mm(a, tl.load(w, mask=w_ok, other=0.0).to(tl.float32), PREC, EMULATE)
        odd += _mm(a, tl.load(w + w_n, mask=w_ok, other=0.0).to(tl.float32), PREC, EMULATE)
    return _round(even, PREC), _round(odd, PREC)


@triton.jit
def _cos_sin(COS, SIN, rows, row_ok, pairs, pair_ok, N):
    """cos and sin at (rows, even channels) and (rows, odd channels): four (BT, BP) fp32 tiles."""
    at = rows[:, None] * N + (2 * pairs)[None, :]
    ok = row_ok[:, None] & pair_ok[None, :]
    cos_even = tl.load(COS + at, mask=ok, other=0.0)
    sin_even = tl.load(SIN + at, mask=ok, other=0.0)
    cos_odd = tl.load(COS + at + 1, mask=ok, other=0.0)
    sin_odd = tl.load(SIN + at + 1, mask=ok, other=0.0)
    return cos_even, sin_even, cos_odd, sin_odd


@triton.jit
def _activations(
    A,
    rows,
    row_ok,
    W,
    pairs,
    pair_ok,
    D,
    N,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """relu(A[rows] @ W) for an (H-sliced) encoder W of shape (D, N): the even and odd halves."""
    even, odd = _pair_product(A, rows, row_ok, W, N, 1, pairs, pair_ok, D, BT, BP, BD, PREC, EMULATE)
    return tl.maximum(even, 0.0), tl.maximum(odd, 0.0)


@triton.jit
def _queries(
    X,
    E,
    COS,
    SIN,
    rows,
    row_ok,
    pairs,
    pair_ok,
    D,
    N,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """q = rope(relu(x E)) for rows and pairs."""
    a_even, a_odd = _activations(X, rows, row_ok, E, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
    return _rotate(a_even, a_odd, COS, SIN, rows, row_ok, pairs, pair_ok, N, PREC)


@triton.jit
def _rotate(a_even, a_odd, COS, SIN, rows, row_ok, pairs, pair_ok, N, PREC: tl.constexpr):
    """rope(a) for rows and pairs, rounded as layer.rope rounds: (v c).to + (partner s).to."""
    cos_even, sin_even, cos_odd, sin_odd = _cos_sin(COS, SIN, rows, row_ok, pairs, pair_ok, N)
    q_even = _round(_round(a_even * cos_even, PREC) + _round(-a_odd * sin_even, PREC), PREC)
    q_odd = _round(_round(a_odd * cos_odd, PREC) + _round(a_even * sin_odd, PREC), PREC)
    return q_even, q_odd


@triton.jit
def _query_grads(
    X,
    E,
    COS,
    SIN,
    G,
    a_even,
    a_odd,
    row_start,
    rows,
    row_ok,
    pairs,
    pair_ok,
    T,
    D,
    N,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    ATT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """da's share through the scores for rows and pairs: rope^T(G q) * (a > 0), G = dS + dS^T (T, T);
    a = relu(x E) of the rows, which start at row_start.

    q is made again for every other column tile of G: the price of never storing it.
    """
    q_rows_even, q_rows_odd = _rotate(a_even, a_odd, COS, SIN, rows, row_ok, pairs, pair_ok, N, PREC)
    dq_even = tl.zeros((BT, BP), dtype=tl.float32)
    dq_odd = tl.zeros((BT, BP), dtype=tl.float32)
    for s0 in range(0, T, BT):
        cols = s0 + tl.arange(0, BT)
        col_ok = cols < T
        g = tl.load(G + rows[:, None] * T + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        if s0 == row_start:
            q_even, q_odd = q_rows_even, q_rows_odd
        else:
            q_even, q_odd = _queries(X, E, COS, SIN, cols, col_ok, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
        dq_even += _mm(g, q_even, ATT, EMULATE)
        dq_odd += _mm(g, q_odd, ATT, EMULATE)
    dq_even = _round(dq_even, PREC)
    dq_odd = _round(dq_odd, PREC)
    cos_even, sin_even, cos_odd, sin_odd = _cos_sin(COS, SIN, rows, row_ok, pairs, pair_ok, N)
    # rope's transpose is the rotation by -phase: (g0, g1) -> (g0 c + g1 s, g1 c - g0 s)
    da_even = _round(_round(dq_even * cos_even, PREC) + _round(dq_odd * sin_even, PREC), PREC)
    da_odd = _round(_round(dq_odd * cos_odd, PREC) - _round(dq_even * sin_odd, PREC), PREC)
    return tl.where(a_even > 0, da_even, 0.0), tl.where(a_odd > 0, da_odd, 0.0)


@triton.jit
def _z_path(
    X,
    Y,
    DU,
    E,
    EV,
    DEC,
    rows,
    row_ok,
    pairs,
    pair_ok,
    row_hash,
    THRESHOLD,
    D,
    N,
    DROPOUT: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """The z = a * b * mask path of one (rows, pairs) tile: a, z, db = dz a (b > 0), da_z = dz b (a > 0),
    each as (even, odd); dz = du Dec^T (du already carries dropout's 1 / (1 - p))."""
    a_even, a_odd = _activations(X, rows, row_ok, E, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
    b_even, b_odd = _activations(Y, rows, row_ok, EV, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
    # Dec is (N, D): as W[d, n] its strides are (1, D)
    dz_even, dz_odd = _pair_product(DU, rows, row_ok, DEC, 1, D, pairs, pair_ok, D, BT, BP, BD, PREC, EMULATE)
    z_even = _round(a_even * b_even, PREC)
    z_odd = _round(a_odd * b_odd, PREC)
    if DROPOUT:
        keep_even, keep_odd = _keep_pairs(row_hash, rows, pairs, THRESHOLD)
        z_even = tl.where(keep_even, z_even, 0.0)
        z_odd = tl.where(keep_odd, z_odd, 0.0)
        dz_even = tl.where(keep_even, dz_even, 0.0)
        dz_odd = tl.where(keep_odd, dz_odd, 0.0)
    db_even = tl.where(b_even > 0, _round(dz_even * a_even, PREC), 0.0)
    db_odd = tl.where(b_odd > 0, _round(dz_odd * a_odd, PREC), 0.0)
    da_even = tl.where(a_even > 0, _round(dz_even * b_even, PREC), 0.0)
    da_odd = tl.where(a_odd > 0, _round(dz_odd * b_odd, PREC), 0.0)
    return a_even, a_odd, z_even, z_odd, db_even, db_odd, da_even, da_odd


@triton.jit
def _weight_rows(W, pairs, pair_ok, dims, dim_ok, N):
    """W[:, 2p] and W[:, 2p + 1] of a (D, N) weight as (BP, DP) tiles: W^T for `tile @ W^T` products."""
    at = W + (2 * pairs)[:, None] + dims[None, :] * N
    ok = pair_ok[:, None] & dim_ok[None, :]
    return tl.load(at, mask=ok, other=0.0).to(tl.float32), tl.load(at + 1, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _full_rows(A, rows, row_ok, dims, dim_ok, D):
    """A[rows, :] of a (T, D) row-major tensor as a (BT, DP) fp32 tile."""
    tile = tl.load(A + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    return tile.to(tl.float32)


# --------------------------------------------------------------------------------------------------
# Kernels. Shapes: X (B, T, D); E, EV (H, D, N); DEC (H, N, D); Y (B, H, T, D); COS, SIN (T, N) fp32;
# S, G (B, H, T, T); DU (B, T, D). All contiguous.


@triton.jit
def _scores_kernel(
    X,
    E,
    COS,
    SIN,
    S,
    H,
    T,
    D,
    N,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    ATT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """S[b, h, i-tile, j-tile] = strict_lower(sum over neuron tiles of q_i q_j^T); tiles above the diagonal
    are left as allocated (zeros)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    if j <= i:
        b = bh // H
        h = bh % H
        X_b = X + b * T * D
        E_h = E + h * D * N
        rows = i * BT + tl.arange(0, BT)
        cols = j * BT + tl.arange(0, BT)
        row_ok = rows < T
        col_ok = cols < T
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for p0 in range(0, N // 2, BP):
            pairs = p0 + tl.arange(0, BP)
            pair_ok = pairs < N // 2
            qr_even, qr_odd = _queries(
                X_b, E_h, COS, SIN, rows, row_ok, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE
            )
            if i == j:  # a diagonal tile: the columns are the rows
                qc_even, qc_odd = qr_even, qr_odd
            else:
                qc_even, qc_odd = _queries(
                    X_b, E_h, COS, SIN, cols, col_ok, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE
                )
            acc += _mm(qr_even, tl.trans(qc_even), ATT, EMULATE)
            acc += _mm(qr_odd, tl.trans(qc_odd), ATT, EMULATE)
        acc = tl.where(rows[:, None] > cols[None, :], _round(acc, ATT), 0.0)  # strictly causal
        tl.store(S + bh * T * T + rows[:, None] * T + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["SEED_HASH", "THRESHOLD"])
def _decode_kernel(
    X,
    Y,
    E,
    EV,
    DEC,
    U,
    SEED_HASH,
    THRESHOLD,
    SCALE,
    H,
    T,
    D,
    N,
    DROPOUT: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """U[b, i-tile] = SCALE * sum over heads and neuron tiles of (a * b * mask) @ Dec, fp32."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = i * BT + tl.arange(0, BT)
    row_ok = rows < T
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    X_b = X + b * T * D
    u = tl.zeros((BT, DP), dtype=tl.float32)
    for h in range(H):
        Y_bh = Y + (b * H + h) * T * D
        E_h = E + h * D * N
        EV_h = EV + h * D * N
        DEC_h = DEC + h * N * D
        row_hash = _row_hash(SEED_HASH, h, b)
        for p0 in range(0, N // 2, BP):
            pairs = p0 + tl.arange(0, BP)
            pair_ok = pairs < N // 2
            a_even, a_odd = _activations(X_b, rows, row_ok, E_h, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
            b_even, b_odd = _activations(Y_bh, rows, row_ok, EV_h, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
            z_even = _round(a_even * b_even, PREC)
            z_odd = _round(a_odd * b_odd, PREC)
            if DROPOUT:
                keep_even, keep_odd = _keep_pairs(row_hash, rows, pairs, THRESHOLD)
                z_even = tl.where(keep_even, z_even, 0.0)
                z_odd = tl.where(keep_odd, z_odd, 0.0)
            dec = DEC_h + (2 * pairs)[:, None] * D + dims[None, :]
            dec_ok = pair_ok[:, None] & dim_ok[None, :]
            u += _mm(z_even, tl.load(dec, mask=dec_ok, other=0.0).to(tl.float32), PREC, EMULATE)
            u += _mm(z_odd, tl.load(dec + D, mask=dec_ok, other=0.0).to(tl.float32), PREC, EMULATE)
    tl.store(U + b * T * D + rows[:, None] * D + dims[None, :], u * SCALE, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["SEED_HASH", "THRESHOLD"])
def _rows_z_kernel(
    X,
    Y,
    DU,
    E,
    EV,
    DEC,
    DY,
    DXZ,
    SEED_HASH,
    THRESHOLD,
    H,
    T,
    D,
    N,
    DROPOUT: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """For one (row tile, b, h): DY = sum_n db Ev^T (the gradient at y) and DXZ = sum_n da_z E^T, fp32."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BT + tl.arange(0, BT)
    row_ok = rows < T
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    X_b = X + b * T * D
    Y_bh = Y + bh * T * D
    DU_b = DU + b * T * D
    E_h = E + h * D * N
    EV_h = EV + h * D * N
    DEC_h = DEC + h * N * D
    row_hash = _row_hash(SEED_HASH, h, b)
    dy = tl.zeros((BT, DP), dtype=tl.float32)
    dx = tl.zeros((BT, DP), dtype=tl.float32)
    for p0 in range(0, N // 2, BP):
        pairs = p0 + tl.arange(0, BP)
        pair_ok = pairs < N // 2
        _, _, _, _, db_even, db_odd, da_even, da_odd = _z_path(
            X_b,
            Y_bh,
            DU_b,
            E_h,
            EV_h,
            DEC_h,
            rows,
            row_ok,
            pairs,
            pair_ok,
            row_hash,
            THRESHOLD,
            D,
            N,
            DROPOUT,
            BT,
            BP,
            BD,
            PREC,
            EMULATE,
        )
        ev_even, ev_odd = _weight_rows(EV_h, pairs, pair_ok, dims, dim_ok, N)
        dy += _mm(db_even, ev_even, PREC, EMULATE) + _mm(db_odd, ev_odd, PREC, EMULATE)
        e_even, e_odd = _weight_rows(E_h, pairs, pair_ok, dims, dim_ok, N)
        dx += _mm(da_even, e_even, PREC, EMULATE) + _mm(da_odd, e_odd, PREC, EMULATE)
    out = bh * T * D + rows[:, None] * D + dims[None, :]
    ok = row_ok[:, None] & dim_ok[None, :]
    tl.store(DY + out, dy, mask=ok)
    tl.store(DXZ + out, dx, mask=ok)


@triton.jit
def _rows_q_kernel(
    X,
    E,
    COS,
    SIN,
    G,
    DX,
    H,
    T,
    D,
    N,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    ATT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """For one (row tile, b, h): DX += sum_n da_q E^T, x's gradient through the scores, fp32 (DX holds
    the share through z from _rows_z_kernel; this program owns the tile, so no other writes it)."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BT + tl.arange(0, BT)
    row_ok = rows < T
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    X_b = X + b * T * D
    E_h = E + h * D * N
    G_bh = G + bh * T * T
    dx = tl.zeros((BT, DP), dtype=tl.float32)
    for p0 in range(0, N // 2, BP):
        pairs = p0 + tl.arange(0, BP)
        pair_ok = pairs < N // 2
        a_even, a_odd = _activations(X_b, rows, row_ok, E_h, pairs, pair_ok, D, N, BT, BP, BD, PREC, EMULATE)
        da_even, da_odd = _query_grads(
            X_b,
            E_h,
            COS,
            SIN,
            G_bh,
            a_even,
            a_odd,
            i * BT,
            rows,
            row_ok,
            pairs,
            pair_ok,
            T,
            D,
            N,
            BT,
            BP,
            BD,
            PREC,
            ATT,
            EMULATE,
        )
        e_even, e_odd = _weight_rows(E_h, pairs, pair_ok, dims, dim_ok, N)
        dx += _mm(da_even, e_even, PREC, EMULATE) + _mm(da_odd, e_odd, PREC, EMULATE)
    at = DX + bh * T * D + rows[:, None] * D + dims[None, :]
    ok = row_ok[:, None] & dim_ok[None, :]
    tl.store(at, tl.load(at, mask=ok, other=0.0) + dx, mask=ok)


@triton.jit(do_not_specialize=["SEED_HASH", "THRESHOLD"])
def _cols_kernel(
    X,
    Y,
    DU,
    E,
    EV,
    DEC,
    COS,
    SIN,
    G,
    D_E,
    D_EV,
    D_DEC,
    SEED_HASH,
    THRESHOLD,
    B,
    H,
    T,
    D,
    N,
    DROPOUT: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    ATT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """For one (neuron tile, h): the gradients of E, Ev (D, 2 BP) and Dec (2 BP, D), summed over b and rows."""
    pb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pairs = pb * BP + tl.arange(0, BP)
    pair_ok = pairs < N // 2
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    E_h = E + h * D * N
    EV_h = EV + h * D * N
    DEC_h = DEC + h * N * D
    d_dec_even = tl.zeros((BP, DP), dtype=tl.float32)
    d_dec_odd = tl.zeros((BP, DP), dtype=tl.float32)
    d_ev_even = tl.zeros((DP, BP), dtype=tl.float32)
    d_ev_odd = tl.zeros((DP, BP), dtype=tl.float32)
    d_e_even = tl.zeros((DP, BP), dtype=tl.float32)
    d_e_odd = tl.zeros((DP, BP), dtype=tl.float32)
    for b in range(B):
        X_b = X + b * T * D
        Y_bh = Y + (b * H + h) * T * D
        DU_b = DU + b * T * D
        G_bh = G + (b * H + h) * T * T
        row_hash = _row_hash(SEED_HASH, h, b)
        for t0 in range(0, T, BT):
            rows = t0 + tl.arange(0, BT)
            row_ok = rows < T
            a_even, a_odd, z_even, z_odd, db_even, db_odd, da_even, da_odd = _z_path(
                X_b,
                Y_bh,
                DU_b,
                E_h,
                EV_h,
                DEC_h,
                rows,
                row_ok,
                pairs,
                pair_ok,
                row_hash,
                THRESHOLD,
                D,
                N,
                DROPOUT,
                BT,
                BP,
                BD,
                PREC,
                EMULATE,
            )
            dq_even, dq_odd = _query_grads(
                X_b,
                E_h,
                COS,
                SIN,
                G_bh,
                a_even,
                a_odd,
                t0,
                rows,
                row_ok,
                pairs,
                pair_ok,
                T,
                D,
                N,
                BT,
                BP,
                BD,
                PREC,
                ATT,
                EMULATE,
            )
            da_even = _round(da_even + dq_even, PREC)
            da_odd = _round(da_odd + dq_odd, PREC)
            du = _full_rows(DU_b, rows, row_ok, dims, dim_ok, D)
            d_dec_even += _mm(tl.trans(z_even), du, PREC, EMULATE)
            d_dec_odd += _mm(tl.trans(z_odd), du, PREC, EMULATE)
            y = tl.trans(_full_rows(Y_bh, rows, row_ok, dims, dim_ok, D))
            d_ev_even += _mm(y, db_even, PREC, EMULATE)
            d_ev_odd += _mm(y, db_odd, PREC, EMULATE)
            x = tl.trans(_full_rows(X_b, rows, row_ok, dims, dim_ok, D))
            d_e_even += _mm(x, da_even, PREC, EMULATE)
            d_e_odd += _mm(x, da_odd, PREC, EMULATE)
    # D_E, D_EV: (H, D, N) at [h, d, 2p (+1)]; D_DEC: (H, N, D) at [h, 2p (+1), d]
    at = h * D * N + dims[:, None] * N + (2 * pairs)[None, :]
    ok = dim_ok[:, None] & pair_ok[None, :]
    tl.store(D_E + at, d_e_even, mask=ok)
    tl.store(D_E + at + 1, d_e_odd, mask=ok)
    tl.store(D_EV + at, d_ev_even, mask=ok)
    tl.store(D_EV + at + 1, d_ev_odd, mask=ok)
    at = h * N * D + (2 * pairs)[:, None] * D + dims[None, :]
    ok = pair_ok[:, None] & dim_ok[None, :]
    tl.store(D_DEC + at, d_dec_even, mask=ok)
    tl.store(D_DEC + at + D, d_dec_odd, mask=ok)


# --------------------------------------------------------------------------------------------------
# The autograd Function and the entry point


def _meta(dtype: torch.dtype, D: int, tiles: Tiles) -> dict:
    if dtype not in TRITON_TYPES:
        raise ConfigError(
            f"model.kernel=fused computes in float32, bfloat16 or float16, not {dtype}; "
            "use model.kernel=chunked for other precisions"
        )
    meta = {
        "BT": tiles.rows,
        "BP": tiles.pairs,
        "BD": tiles.depth,
        "DP": triton.next_power_of_2(D),
        "PREC": TRITON_TYPES[dtype],
        "ATT": TRITON_TYPES[attention_dtype(dtype)],
        "EMULATE": INTERPRETED,
    }
    if not INTERPRETED:
        meta["num_warps"] = tiles.num_warps
    return meta


def _without(meta: dict, *names: str) -> dict:
    return {k: v for k, v in meta.items() if k not in names}


class FusedLayer(torch.autograd.Function):
    """u = (relu(x E) * relu(ln(tril(q q^T) x) Ev) * mask) @ Dec for all heads, by the Triton kernels.

    Saved for backward, as chunked: x, S (B, H, T, T), y (B, H, T, D) and its rstd, the seed; no mask
    and no N-wide tensor.
    """

    @staticmethod
    def forward(ctx, x, encoder, encoder_v, decoder, cos, sin, dropout, seed, tiles):
        dtype, acc = compute_dtypes(x)
        att = attention_dtype(dtype)
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        meta = _meta(dtype, D, tiles)
        rows = triton.cdiv(T, tiles.rows)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype).contiguous()
            enc, enc_v = encoder.to(dtype).contiguous(), encoder_v.to(dtype).contiguous()
            dec = decoder.to(dtype).contiguous()
            cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
            scores = torch.zeros(B, H, T, T, dtype=att, device=x.device)
            _scores_kernel[(rows, rows, B * H)](xc, enc, cos, sin, scores, H, T, D, N, **_without(meta, "DP"))
            y, _, rstd = torch.native_layer_norm((scores @ xc.to(att).unsqueeze(1)).to(acc), (D,), None, None, LN_EPS)
            y = y.contiguous()
            u = torch.empty(B, T, D, dtype=torch.float32, device=x.device)
            _decode_kernel[(triton.cdiv(T, tiles.wide_rows), B)](
                xc,
                y,
                enc,
                enc_v,
                dec,
                u,
                masks.seed_hash(seed),
                masks.drop_threshold(dropout),
                1.0 / (1.0 - dropout),
                H,
                T,
                D,
                N,
                DROPOUT=dropout > 0,
                **{**_without(meta, "ATT"), "BT": tiles.wide_rows},
            )
        ctx.save_for_backward(x, encoder, encoder_v, decoder, cos, sin, scores, y, rstd)
        ctx.dropout, ctx.seed, ctx.tiles, ctx.dtypes = dropout, seed, tiles, (dtype, acc)
        return u.to(dtype).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad_u):
        x, encoder, encoder_v, decoder, cos, sin, scores, y, rstd = ctx.saved_tensors
        dtype, acc = ctx.dtypes
        att = attention_dtype(dtype)
        dropout, seed, tiles = ctx.dropout, ctx.seed, ctx.tiles
        B, _, T, D = x.shape
        H, _, N = encoder.shape
        meta = _meta(dtype, D, tiles)
        rows = triton.cdiv(T, tiles.rows)
        seed_hash, threshold = masks.seed_hash(seed), masks.drop_threshold(dropout)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.squeeze(1).to(dtype).contiguous()
            enc, enc_v = encoder.to(dtype).contiguous(), encoder_v.to(dtype).contiguous()
            dec = decoder.to(dtype).contiguous()
            du = (grad_u.squeeze(1) / (1.0 - dropout)).to(dtype).contiguous()  # dropout's scale, as in forward
            dy = torch.empty(B, H, T, D, dtype=torch.float32, device=x.device)
            dx_heads = torch.empty_like(dy)  # per head: the share through z, then through the scores
            z_args = (xc, y, du, enc, enc_v, dec, dy, dx_heads, seed_hash, threshold, H, T, D, N)
            z_meta = {**_without(meta, "ATT"), "BT": tiles.wide_rows}
            _rows_z_kernel[(triton.cdiv(T, tiles.wide_rows), B * H)](*z_args, DROPOUT=dropout > 0, **z_meta)
            # y = ln(S x) with S = tril(q q^T): back through the layer norm to S x, then to x and S.
            _, dx_s, g = read_backward(dy.to(acc), y, rstd, scores, xc.unsqueeze(1), att)
            dx_s, g = dx_s.to(acc).sum(1), g.contiguous()  # g: S's gradient, as seen by q q^T
            _rows_q_kernel[(rows, B * H)](xc, enc, cos, sin, g, dx_heads, H, T, D, N, **meta)
            d_enc = torch.empty(H, D, N, dtype=torch.float32, device=x.device)
            d_enc_v = torch.empty_like(d_enc)
            d_dec = torch.empty(H, N, D, dtype=torch.float32, device=x.device)
            col_args = (
                xc,
                y,
                du,
                enc,
                enc_v,
                dec,
                cos,
                sin,
                g,
                d_enc,
                d_enc_v,
                d_dec,
                seed_hash,
                threshold,
                B,
                H,
                T,
                D,
                N,
            )
            _cols_kernel[(triton.cdiv(N // 2, tiles.pairs), H)](*col_args, DROPOUT=dropout > 0, **meta)
            dx = dx_s + dx_heads.sum(1).to(acc)
        grads = dx.unsqueeze(1).to(x.dtype), d_enc.to(encoder.dtype), d_enc_v.to(encoder_v.dtype)
        return *grads, d_dec.view(H * N, D).to(decoder.dtype), *[None] * 5


@torch.compiler.disable  # Triton launches from a Python autograd Function: torch.compile runs it as it is
def fused_layer(
    x: torch.Tensor,
    encoder: torch.Tensor,
    encoder_v: torch.Tensor,
    decoder: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dropout: float = 0.0,
    seed: int | None = None,
    chunk_size: int = 0,
    *,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """The same function as `reference_layer` and `chunked_layer`, by the Triton kernels. x: (B, 1, T, D).

    `dropout` is the probability applied (0 outside training), masks from `seed` (int or int64 tensor)
    as chunked's (`masks.dropout_mask`), drawn from torch's global generator when None. `chunk_size` is accepted for
    the common signature and unused: the kernel's neuron tile is `tiles.pairs` (tests pass small tiles).
    """
    del chunk_size
    if x.device.type != "cuda" and not INTERPRETED:
        raise ConfigError(
            "model.kernel=fused runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before the first import (tests), or use a CUDA device"
        )
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item()) if dropout > 0 else 0  # as kernels.draw_seed
    seed = int(seed)  # an int or an int64 tensor (kernels.draw_seed's): the kernels take its hash as a scalar
    u = FusedLayer.apply(x, encoder, encoder_v, decoder, cos, sin, float(dropout), int(seed), tiles or Tiles())
    return layer_output(x, u)
