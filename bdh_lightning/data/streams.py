"""Contiguous streams of windows, for training with carried state (`data.sampling: streams`).

Row b of rank r owns one stretch of the split: stretch i = r * batch_size + b of world_size * batch_size
equal stretches. Batch k gives every row its k-th window of block_size bytes, so window k + 1 continues
window k. A stream restarts at the start of its stretch when the stretch is used up, and at every file
boundary of a directory corpus (no window spans two files); a window at position 0 starts a new stream
(the model's carried state resets there). Batch k is a pure function of k: a resumed run continues the
same streams exactly. With data.stream_windows k (ShortStreams), each stream is instead k windows from a
random place of the split, so that every batch holds unrelated text, as random windows do.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError


class StreamLayout:
    """Where each row's windows lie: per row the pieces of its stretch between file boundaries, and how many
    whole windows (block_size + 1 bytes, the last one the next window's first) each piece holds."""

    def __init__(
        self, file_starts: np.ndarray, begin: int, end: int, rows: int, block_size: int, what: str = "training"
    ):
        self.block_size, self.rows = block_size, rows
        length = (end - begin) // rows
        if length < block_size + 1:
            raise DataError(
                f"data.sampling streams: the {what} split ({end - begin:,} bytes) gives each of {rows} streams "
                f"(devices x data.batch_size) {length:,} bytes, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller data.batch_size or data.block_size, or more data"
            )
        self.pieces, self.windows = [], []  # per row: piece starts, and windows per piece
        inner = [int(s) for s in file_starts]
        for row in range(rows):
            lo, hi = begin + row * length, begin + (row + 1) * length
            cuts = [lo, *[s for s in inner if lo < s < hi], hi]
            starts, counts = [], []
            for a, b in zip(cuts[:-1], cuts[1:]):
                n = (b - a - 1) // block_size  # windows whose inputs and targets stay inside [a, b)
                if n > 0:
                    starts.append(a)
                    counts.append(n)
            if not counts:
                raise DataError(
                    f"data.sampling streams: stream {row} ({lo:,}..{hi:,}) holds no whole window of "
                    f"{block_size + 1} bytes inside one file; use a smaller data.block_size, or data.sampling windows"
                )
            self.pieces.append(np.array(starts, dtype=np.int64))
            self.windows.append(np.cumsum([0, *counts]))  # windows before each piece; the last is the cycle

    def window(self, row: int, k: int) -> tuple[int, int]:
        """(offset in the corpus, position in its stream) of row's k-th window."""
        before = self.windows[row]
        m = k % int(before[-1])
        piece = int(np.searchsorted(before, m, side="right")) - 1
        position = (m - int(before[piece])) * self.block_size
        return int(self.pieces[row][piece]) + position, position


class StreamBatches(IterableDataset):
    """Endless batches (inputs, targets, start positions): row b reads window k of its own stream."""

    def __init__(self, corpus, layout: StreamLayout, first_row: int, batch_size: int, start: int):
        self.corpus, self.layout, self.first_row, self.batch_size, self.start = (
            corpus,
            layout,
            first_row,
            batch_size,
            start,
        )

    def place(self, row: int, k: int) -> tuple[int, int]:
        """(offset in the corpus, position in its stream) of row's k-th window."""
        return self.layout.window(row, k)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = range(self.first_row, self.first_row + self.batch_size)
        places = [self.place(row, k) for row in rows]
        windows = self.corpus.windows(np.array([offset for offset, _ in places]), self.layout.block_size + 1)
        positions = torch.tensor([position for _, position in places], dtype=torch.long)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), positions

    def __iter__(self):
        return (self.batch(k) for k in worker_turns(self.start))


class ShortStreams(StreamBatches):
    """Streams of `windows` windows from random places (data.stream_windows): row r (of all ranks) reads
    `windows` consecutive windows from a random window of the split, then as many from another, and so on.
    Row r's first stream is windows - r % windows long, so the rows start fresh streams on different steps.
    A stream also restarts at a file boundary. The place of row r's j-th stream is drawn from (seed, r, j):
    batch k is a pure function of k, as with random windows. `layout` is the split as one row."""

    def __init__(self, corpus, layout: StreamLayout, windows: int, seed: int, first_row: int, batch_size: int, start):
        super().__init__(corpus, layout, first_row, batch_size, start)
        self.windows, self.seed = windows, seed
        self.begins = max(1, int(layout.windows[0][-1]) - windows + 1)  # stream starts that end inside the split

    def place(self, row: int, k: int) -> tuple[int, int]:
        first = self.windows - row % self.windows
        stream, i = (0, k) if k < first else (1 + (k - first) // self.windows, (k - first) % self.windows)
        begin = np.random.default_rng([self.seed, row, stream]).integers(self.begins)
        offset, position = self.layout.window(0, int(begin) + i)
        return offset, min(position, i * self.layout.block_size)  # less where a file boundary restarted it


def worker_turns(start: int):
    """Batch numbers start, start+1, ... as this DataLoader worker's share: workers take turns (DataLoader reads
    them round-robin), so the batches come in the same order for any num_workers."""
    worker = get_worker_info()
    return itertools.count(start + (worker.id if worker else 0), worker.num_workers if worker else 1)


def validation_streams(corpus, begin: int, end: int, block_size: int, windows: int, max_streams: int = 8):
    """The validation split read as up to `max_streams` contiguous streams, `windows` windows in all: a list
    of batches (inputs, targets, start positions), consecutive in each row."""
    rows = max(1, min(max_streams, windows, (end - begin) // (block_size + 1)))
    layout = StreamLayout(corpus.starts, begin, end, rows, block_size, what="validation")
    per_row = max(1, windows // rows)
    per_row = min(per_row, min(int(w[-1]) for w in layout.windows))  # never wrap around within a validation
    batches = StreamBatches(corpus, layout, 0, rows, 0)
    return [batches.batch(k) for k in range(per_row)]
