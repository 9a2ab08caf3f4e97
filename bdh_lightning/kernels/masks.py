"""Dropout masks from a counter-based hash of (seed, head, row, position, neuron): the same seed gives the same
mask for any chunking, device or default dtype, compiled or in a Triton kernel (HASH.md states the formula).
"""

from __future__ import annotations

import torch

# Unsigned 32-bit values held in int64 tensors (or Python ints), masked with M32 after every multiply: the
# multipliers are below 2**31, so a 32-bit value times one fits in int64.
M32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
# keep compares the top 24 bits of the hash with int(p * 2**24).
THRESHOLD_BITS = 24


def mix32(h):
    """A 2-round 32-bit integer finalizer (hash-prospector constants); h: int or int64 tensor in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * MIX_MUL_1) & M32
    h = h ^ (h >> 15)
    h = (h * MIX_MUL_2) & M32
    h = h ^ (h >> 15)
    return h


def drop_threshold(p: float) -> int:
    """Entries whose 24-bit hash is below this are dropped: probability threshold / 2**24, about p."""
    return int(p * 2**THRESHOLD_BITS)


def seed_hash(seed):
    """The hash of the seed alone (both 32-bit halves), the common prefix of every entry's hash.
    seed: a non-negative int below 2**62 or an int64 tensor of one."""
    h = mix32(seed & M32)
    return mix32(h ^ ((seed >> 32) & M32))


def keep_mask(seed, head, rows, positions, neurons, p: float) -> torch.Tensor:
    """Which entries survive dropout: bool, the broadcast shape of head, rows, positions and neurons.

    seed: int or int64 tensor (one per layer call); head, rows, positions, neurons: ints or int64
    tensors that broadcast, e.g. head an int, rows (B, 1, 1), positions (T, 1), neurons (chunk,) for one
    (B, T, chunk) block. Each mix runs on the shape of the indices so far, so the prefix up to the
    position is computed once per (head, row, position) and only the last mix runs over the whole block.
    """
    return survives(entry_hash(seed, head, rows, positions, neurons), p)


def position_hash(seed, head, rows, positions):
    """The hash of (seed, head, row, position): every neuron's hash starts from it."""
    h = mix32(seed_hash(seed) ^ head)
    h = mix32(h ^ rows)
    return mix32(h ^ positions)


def entry_hash(seed, head, rows, positions, neurons):
    """The 32-bit hash behind `keep_mask` (the values another implementation must reproduce bit for bit)."""
    return mix32(position_hash(seed, head, rows, positions) ^ neurons)


def survives(h, p: float):
    return (h >> 8) >= drop_threshold(p)


# Eager on the CPU, the last mix's dozen integer passes run over row tiles of about this many elements,
# which stay in cache: 5-7x faster than whole-block passes on the 2-core machine, same values. Compiled
# (the passes fuse into one loop) and on CUDA the block is one expression.
CPU_TILE_ELEMENTS = 2**15


def block_keep(seed, head, batch: int, length: int, start: int, stop: int, p: float, device=None) -> torch.Tensor:
    """The keep mask of neurons [start, stop) of `head` for every row and position: bool (batch, length, stop - start)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    rows = torch.arange(batch, dtype=torch.int64, device=device).view(batch, 1, 1)
    positions = torch.arange(length, dtype=torch.int64, device=device).view(length, 1)
    neurons = torch.arange(start, stop, dtype=torch.int64, device=device)
    if device.type != "cpu" or torch.compiler.is_compiling():
        return keep_mask(seed, head, rows, positions, neurons, p)
    prefix = position_hash(seed, head, rows, positions).view(batch * length, 1)
    keep = torch.empty(batch * length, stop - start, dtype=torch.bool)
    tile = max(1, CPU_TILE_ELEMENTS // max(1, stop - start))
    for r in range(0, batch * length, tile):
        keep[r : r + tile] = survives(mix32(prefix[r : r + tile] ^ neurons), p)
    return keep.view(batch, length, stop - start)


def dropout_mask(seed, B: int, H: int, T: int, N: int, p: float, device=None) -> torch.Tensor:
    """The full (B, H, T, N) float 0/1 mask for `seed`, the one the chunked and fused kernels apply;
    pass it to `layer.reference_layer(..., dropout_mask=...)` to reproduce their forward exactly."""
    heads = torch.arange(H, dtype=torch.int64, device=device).view(1, H, 1, 1)
    rows = torch.arange(B, dtype=torch.int64, device=device).view(B, 1, 1, 1)
    positions = torch.arange(T, dtype=torch.int64, device=device).view(T, 1)
    neurons = torch.arange(N, dtype=torch.int64, device=device)
    return keep_mask(seed, heads, rows, positions, neurons, p).to(torch.float32)
