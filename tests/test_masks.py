"""kernels/masks.py's two ways to a block of keep masks: the one expression compiled graphs and CUDA use, and the
CPU's row tiles (the same values, 5-7x faster eager). test_kernels.py checks both against the hash formula."""

import math

import pytest
import torch

from bdh_lightning.kernels import masks

SEED = 2**40 + 99


def counting_survives(monkeypatch) -> list:
    """Replace masks.survives with a wrapper that records the shape of every block it is called on."""
    calls, survives = [], masks.survives
    monkeypatch.setattr(masks, "survives", lambda h, p: calls.append(tuple(h.shape)) or survives(h, p))
    return calls


@pytest.mark.parametrize("start, stop", [(0, 70), (24, 48), (13, 14)])
def test_the_one_expression_path_equals_the_tiles(monkeypatch, start, stop):
    """What a compiled graph computes (is_compiling true: one keep_mask over the block) equals the eager tiles."""
    B, T, p = 3, 16, 0.25
    tiles = masks.block_keep(torch.tensor(SEED), 1, B, T, start, stop, p)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    asked = []
    keep_mask = masks.keep_mask
    monkeypatch.setattr(masks, "keep_mask", lambda *args: asked.append(args) or keep_mask(*args))
    whole = masks.block_keep(torch.tensor(SEED), 1, B, T, start, stop, p)
    assert len(asked) == 1  # the compiled path: one expression
    assert whole.dtype == torch.bool and whole.shape == (B, T, stop - start)
    assert torch.equal(whole, tiles)
    expected = masks.dropout_mask(SEED, B, 2, T, 70, p)[:, 1, :, start:stop]
    assert torch.equal(whole.float(), expected)


def test_eager_on_the_cpu_runs_tiles_of_about_cpu_tile_elements(monkeypatch):
    """The CPU's eager path never builds the whole block at once: it calls the last mix on row tiles of
    CPU_TILE_ELEMENTS // width rows (at least one)."""
    monkeypatch.setattr(masks, "keep_mask", lambda *args: pytest.fail("the CPU's eager path took the whole block"))
    for B, T, start, stop in ((4, 1024, 0, 100), (2, 64, 300, 812), (1, 4, 0, 40000), (1, 2**15, 5, 6)):
        calls = counting_survives(monkeypatch)
        keep = masks.block_keep(torch.tensor(SEED), 0, B, T, start, stop, 0.3)
        tile = max(1, masks.CPU_TILE_ELEMENTS // (stop - start))
        assert len(calls) == math.ceil(B * T / tile), (B, T, start, stop)
        assert calls[0] == (min(tile, B * T), stop - start)
        assert keep.shape == (B, T, stop - start) and keep.dtype == torch.bool


def test_an_entry_whose_24_bits_equal_the_threshold_is_kept():
    """Dropped means below the threshold (probability threshold / 2**24): an entry exactly at it survives."""
    h = masks.entry_hash(SEED, 0, 0, 0, 0)
    p = (h >> 8) / 2**24  # exact in a float: drop_threshold(p) == h >> 8
    assert masks.drop_threshold(p) == h >> 8
    assert masks.keep_mask(SEED, 0, 0, 0, 0, p)
    assert not masks.keep_mask(SEED, 0, 0, 0, 0, p + 2**-24)  # one step higher: dropped
    assert masks.dropout_mask(SEED, 1, 1, 1, 1, p).item() == 1.0
