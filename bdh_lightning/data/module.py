"""Batches of a byte corpus and the DataModule: random training windows, fixed validation and test windows.

A byte is a token (vocabulary 256). [0, train_size) of the corpus is training data, [train_size, val_end)
validation and [val_end, end) the test split (empty unless data.test_fraction is set; data.test_path gives
the test split a corpus of its own instead). A directory made by `prepare` is streamed with LitData
instead (litdata.py).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..console import format_bytes
from ..errors import DataError, finite_float, is_int
from . import litdata
from .corpus import TINYSHAKESPEARE, ByteCorpus, download_tinyshakespeare, list_corpus
from .streams import ShortStreams, StreamBatches, StreamLayout, validation_streams, worker_turns


class TrainBatches(IterableDataset):
    """Endless random training batches; batch k on rank r comes from an RNG seeded with (seed, r, k)."""

    def __init__(
        self, corpus: ByteCorpus, train_size: int, block_size: int, batch_size: int, seed: int, rank: int, start: int
    ):
        self.corpus, self.train_size, self.block_size, self.batch_size = corpus, train_size, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, k])
        offsets = rng.integers(0, self.train_size - self.block_size, size=self.batch_size)  # whole window in the split
        return split_window(self.corpus.windows(offsets, self.block_size + 1))

    def __iter__(self):
        return (self.batch(k) for k in worker_turns(self.start))


class ValBatches(IterableDataset):
    """Fixed evaluation windows (validation or test), in batches of up to batch_size."""

    def __init__(self, corpus: ByteCorpus, offsets: np.ndarray, block_size: int, batch_size: int):
        self.corpus, self.offsets, self.block_size, self.batch_size = corpus, offsets, block_size, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.offsets) / self.batch_size)

    def __iter__(self):
        worker = get_worker_info()
        for i in range(worker.id if worker else 0, len(self), worker.num_workers if worker else 1):
            offsets = self.offsets[i * self.batch_size : (i + 1) * self.batch_size]
            yield split_window(self.corpus.windows(offsets, self.block_size + 1))


def split_window(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets from windows of block_size + 1 bytes."""
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def even_offsets(first: int, last: int, count: int) -> np.ndarray:
    """Up to `count` window offsets evenly spaced over [first, last], no duplicates."""
    return np.unique(np.linspace(first, last, count).round().astype(np.int64))


NO_TEST_SPLIT = (
    "no test split: `test` scores bytes that training, validation and checkpoint selection never saw; set "
    "data.test_fraction (e.g. 0.05, the end of the corpus) or data.test_path (a corpus of its own) when training, "
    "and pass the same setting to `test`"
)


MAX_VAL_WINDOWS = 2**24


def check_settings(settings: dict) -> None:
    """ByteDataModule's arguments, each checked on its own and against the others: one DataError if not."""
    for name in ("block_size", "batch_size", "val_windows"):
        if not is_int(settings[name]) or settings[name] <= 0:
            raise DataError(f"data.{name} must be a positive integer, got {settings[name]!r}")
    if settings["val_windows"] > MAX_VAL_WINDOWS:  # each window's offset is held in memory
        raise DataError(f"data.val_windows must be at most {MAX_VAL_WINDOWS:,}, got {settings['val_windows']:,}")
    for name in ("seed", "num_workers"):
        if not is_int(settings[name]) or settings[name] < 0:
            raise DataError(f"data.{name} must be a non-negative integer, got {settings[name]!r}")
    val_fraction, test_fraction = settings["val_fraction"], settings["test_fraction"]
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    finite_float("data.test_fraction", test_fraction, 0.0, 1.0, high_open=True, error=DataError)
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            "data.val_fraction + data.test_fraction must be below 1 (training needs bytes too), got "
            f"{val_fraction} + {test_fraction}"
        )
    if test_fraction and settings["test_path"]:
        raise DataError("set data.test_fraction or data.test_path, not both (the test split is one or the other)")
    exclude = settings["exclude"]
    if exclude is not None and (isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude)):
        raise DataError(f"data.exclude must be a list of globs, e.g. ['*.log'], got {exclude!r}")
    if settings["sampling"] not in ("windows", "streams"):
        raise DataError(f"data.sampling must be windows or streams, got {settings['sampling']!r}")
    if not is_int(settings["stream_windows"]) or settings["stream_windows"] < 0:
        raise DataError(f"data.stream_windows must be a non-negative integer, got {settings['stream_windows']!r}")
    if settings["stream_windows"] and settings["sampling"] != "streams":
        raise DataError("data.stream_windows needs data.sampling streams (it sets how long each stream is)")


def open_prepared_path(path: str, block_size: int, test_fraction: float, test_path, sampling: str):
    """A prepared directory as data.path, refusing the settings it makes itself."""
    if test_fraction or test_path:
        raise DataError(
            f"data.path {path!r} is a prepared directory, which holds its own test split; leave out "
            "data.test_fraction and data.test_path"
        )
    if sampling != "windows":
        raise DataError(
            f"data.sampling {sampling} reads files directly; data.path {path!r} is a prepared directory, "
            "which streams its own shuffled windows: use data.sampling windows, or the source files"
        )
    return litdata.open_prepared(path, block_size)


class ByteDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str = TINYSHAKESPEARE,
        block_size: int = 512,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        val_windows: int = 64,
        seed: int = 1337,
        num_workers: int = 0,
        test_fraction: float = 0.0,
        test_path: str | None = None,
        exclude: list[str] | None = None,
        include_hidden: bool = False,
        sampling: Literal["windows", "streams"] = "windows",
        stream_windows: int = 0,
    ):
        """Byte-level language-model data: every byte of the corpus is one token.

        Args:
            path: The corpus: a file, a directory (all files in it, recursively, in sorted order), or a glob;
                files are concatenated. "tinyshakespeare" downloads tiny Shakespeare once into
                $BDH_LIGHTNING_CACHE (default ~/.cache/bdh_lightning). A directory made by `prepare`
                (or its s3:// or gs:// URL) is streamed with LitData, with the splits made there.
            block_size: Context length T: bytes per training window (the model's block_size follows it).
            batch_size: Windows per batch on each device.
            val_fraction: Share of the corpus held out for validation, in (0, 1): the bytes after the
                training split (before the test split, if any).
            val_windows: Validation (and test) windows, fixed and evenly spaced over their split, split across devices.
            seed: Seed of the random training windows; batch k on device rank r is drawn from (seed, r, k),
                so a resumed run draws the same windows as an uninterrupted one.
            num_workers: DataLoader worker processes (0 = read in the main process; windows are cheap).
            test_fraction: Share of the corpus, taken from its end, held out for `test` only, in [0, 1);
                0 = no test split (unless test_path is given).
            test_path: A corpus of its own (file, directory or glob) for `test`; instead of test_fraction.
            exclude: Globs of files and folders to leave out of a directory or glob corpus, matched against
                the path inside data.path and against the name (e.g. ["*.log", "drafts/*"]).
            include_hidden: Also read hidden files and folders (names starting with '.', e.g. .git) inside a directory.
            sampling: Training windows: `windows`, drawn at random (the reference's way), or `streams`: each
                batch row reads its own contiguous stretch of the training split window after window (for
                model.carry_state; see streams.py and docs/carried-state.md).
            stream_windows: With sampling streams: 0 = each row reads its whole stretch in order; k = each row
                reads k consecutive windows from a random place of the training split, then k from another
                (the carried state starts fresh each time), the rows out of step, so that every batch holds
                unrelated text as random windows do. See docs/carried-state.md for the measured choice.
        """
        super().__init__()
        check_settings(locals())  # the arguments by name
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.val_fraction, self.val_windows, self.seed, self.num_workers = val_fraction, val_windows, seed, num_workers
        self.test_fraction, self.test_path = float(test_fraction), test_path
        self.exclude, self.include_hidden, self.sampling = list(exclude or []), include_hidden, sampling
        self.stream_windows = stream_windows
        self.listing = self.corpus = self.test_corpus = None
        self.stream = None  # a prepared directory (litdata.Prepared) instead of a corpus of files
        self.restored = None  # the data state of a checkpoint being resumed or evaluated
        # Local corpora are checked now (stat only), before a model is built; tiny Shakespeare once it is downloaded.
        if litdata.is_prepared(path):
            self.stream = open_prepared_path(path, block_size, test_fraction, test_path, sampling)
        elif path != TINYSHAKESPEARE:
            self.open_corpus(path)

    def open_corpus(self, path: str) -> None:
        self.listing = list_corpus(path, self.exclude, self.include_hidden)
        self.corpus = ByteCorpus(self.listing.files, self.listing.sizes)
        self.open_test_corpus()
        self.check_sizes()

    def open_test_corpus(self) -> None:
        if not self.test_path:
            return
        listing = list_corpus(self.test_path, self.exclude, self.include_hidden)
        shared = listing.shared_with(self.listing)
        if shared:
            raise DataError(
                f"data.test_path {self.test_path!r} shares {len(shared)} file(s) with data.path (e.g. {shared[0]}); "
                "the test split must hold bytes that training never sees: give it other files"
            )
        self.test_listing = listing
        self.test_corpus = ByteCorpus(listing.files, listing.sizes)

    def prepare_data(self) -> None:
        if self.path == TINYSHAKESPEARE:
            download_tinyshakespeare()

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None and self.stream is None:
            self.open_corpus(str(download_tinyshakespeare()))
        if stage == "test" and not self.has_test_split:
            raise DataError(NO_TEST_SPLIT)

    # The splits of a corpus of files: train [0, train_size), validation [train_size, val_end), test [val_end, len).

    @property
    def train_size(self) -> int:
        """Bytes in the training split: [0, train_size); validation follows it."""
        return int(len(self.corpus) * (1.0 - self.val_fraction - self.test_fraction))

    @property
    def val_end(self) -> int:
        """End of the validation split; the test split (data.test_fraction) is [val_end, len(corpus))."""
        return len(self.corpus) if not self.test_fraction else int(len(self.corpus) * (1.0 - self.test_fraction))

    @property
    def has_test_split(self) -> bool:
        if self.stream is not None:
            return self.stream.has("test")
        return bool(self.test_fraction or self.test_path)

    def split_sizes(self) -> dict[str, int]:
        """Bytes in each split: {"train": ..., "validation": ..., "test": ...}."""
        if self.stream is not None:
            return self.stream.split_bytes()
        self.setup()
        test = len(self.test_corpus) if self.test_corpus is not None else len(self.corpus) - self.val_end
        return {"train": self.train_size, "validation": self.val_end - self.train_size, "test": test}

    def check_sizes(self) -> None:
        window = self.block_size + 1
        sizes = self.split_sizes()
        needed = {name: size for name, size in sizes.items() if name != "test" or self.has_test_split}
        if min(needed.values()) < window:
            parts = [f"{size} for {'training' if name == 'train' else name}" for name, size in needed.items()]
            splits = " and ".join(parts) if len(parts) == 2 else f"{parts[0]}, {parts[1]} and {parts[2]}"
            test_hint = ", data.test_fraction" if self.test_fraction else ""
            if self.test_path and sizes["test"] < window:
                raise DataError(
                    f"data.test_path {self.test_path!r} has {sizes['test']} bytes, but the test split needs at least "
                    f"block_size + 1 = {window}; use a smaller data.block_size or more test data"
                )
            raise DataError(
                f"data.path {self.path!r} has {len(self.corpus)} bytes, split into {splits}, but each split needs at "
                f"least block_size + 1 = {window}; use a smaller data.block_size, a different data.val_fraction"
                f"{test_hint}, or more data"
            )

    def describe(self) -> str:
        """One line saying what the corpus is: files read, bytes, the splits, what was left out and why."""
        if self.stream is not None:
            return self.stream.describe()
        self.setup()
        sizes = self.split_sizes()
        files = len(self.corpus.files)
        text = f"corpus {self.path}: {files:,} file{'s' * (files != 1)}, {format_bytes(len(self.corpus))}"
        text += f" (train {format_bytes(sizes['train'])}, validation {format_bytes(sizes['validation'])}"
        if self.test_path:
            test_files = len(self.test_corpus.files)
            files_word = f"{test_files:,} file{'s' * (test_files != 1)}"
            text += f", test {format_bytes(sizes['test'])} from {self.test_path}: {files_word})"
        elif self.test_fraction:
            text += f", test {format_bytes(sizes['test'])})"
        else:
            text += ", no test split)"
        left_out = self.listing.left_out + (self.test_listing.left_out if self.test_path else Counter())
        if left_out:
            text += "; left out: " + ", ".join(f"{n:,} {reason}" for reason, n in sorted(left_out.items()))
            if "hidden" in left_out:
                text += " (data.include_hidden reads hidden ones)"
        return text

    def window_offsets(self, first: int, end: int) -> np.ndarray:
        """Start offsets of data.val_windows windows evenly spaced over bytes [first, end)."""
        return even_offsets(first, end - (self.block_size + 1), self.val_windows)

    @property
    def val_offsets(self) -> np.ndarray:
        """Start offsets (into the whole corpus) of the validation windows, evenly spaced, no duplicates."""
        self.setup()
        return self.window_offsets(self.train_size, self.val_end)

    @property
    def test_offsets(self) -> np.ndarray:
        """Start offsets of the test windows: into the test corpus (data.test_path) or the whole corpus."""
        self.setup()
        if self.test_corpus is not None:
            return self.window_offsets(0, len(self.test_corpus))
        return self.window_offsets(self.val_end, len(self.corpus))

    def rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def batches_consumed(self) -> int:
        """Training batches this rank has drawn: a run resumed at step s continues exactly where step s left off."""
        return self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0

    def train_dataloader(self):
        self.setup()
        rank, _ = self.rank_and_world_size()
        if self.stream is not None:
            return self.stream.train_loader(self.batch_size, self.seed, self.num_workers, self.batches_consumed())
        if self.sampling == "streams" and self.stream_windows:
            layout = StreamLayout(self.corpus.starts, 0, self.train_size, 1, self.block_size)
            rows = ShortStreams(
                self.corpus, layout, self.stream_windows, self.seed, rank * self.batch_size, self.batch_size,
                self.batches_consumed(),
            )  # fmt: skip
            return self.loader(rows)
        if self.sampling == "streams":
            _, world_size = self.rank_and_world_size()
            layout = StreamLayout(self.corpus.starts, 0, self.train_size, world_size * self.batch_size, self.block_size)
            rows = StreamBatches(self.corpus, layout, rank * self.batch_size, self.batch_size, self.batches_consumed())
            return self.loader(rows)
        batches = TrainBatches(
            self.corpus, self.train_size, self.block_size, self.batch_size, self.seed, rank, self.batches_consumed()
        )
        return self.loader(batches)

    def validation_streams(self) -> list:
        """The validation split as contiguous streams (data.val_windows windows in all), for the carried-state
        figure beside the window-local one (see BDHLitModule.stream_validation)."""
        self.setup()
        return validation_streams(self.corpus, self.train_size, self.val_end, self.block_size, self.val_windows)

    def eval_loader(self, split: str, corpus: ByteCorpus | None, offsets: np.ndarray | None):
        rank, world_size = self.rank_and_world_size()
        if self.stream is not None:
            return self.stream.eval_loader(split, self.val_windows, self.batch_size, rank, world_size, self.num_workers)
        if len(offsets) < world_size:
            raise DataError(
                f"{split} has {len(offsets)} distinct windows for {world_size} devices; raise data.val_windows "
                "(or the split's share of the corpus) to at least the number of devices"
            )
        # Each rank takes a disjoint share, so no window is counted twice and Lightning adds no sampler.
        return self.loader(ValBatches(corpus, offsets[rank::world_size], self.block_size, self.batch_size))

    def val_dataloader(self):
        if self.stream is not None:
            return self.eval_loader("validation", None, None)
        return self.eval_loader("validation", self.corpus, self.val_offsets)

    def test_dataloader(self):
        self.setup()
        if not self.has_test_split:
            raise DataError(NO_TEST_SPLIT)
        if self.stream is not None:
            return self.eval_loader("test", None, None)
        return self.eval_loader("test", self.test_corpus or self.corpus, self.test_offsets)

    def loader(self, batches: IterableDataset) -> DataLoader:
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    # Checkpoints: where the training stream stands, and which bytes each split held.

    def split_ranges(self) -> dict:
        """What the splits were, to check later runs against: bytes of the corpus and the split boundaries."""
        if self.stream is not None:
            return {"kind": "prepared", "id": self.stream.identity()}
        self.setup()
        test = [self.val_end, len(self.corpus)] if self.test_fraction else None
        return {
            "kind": "files",
            "bytes": len(self.corpus),
            "train": [0, self.train_size],
            "validation": [self.train_size, self.val_end],
            "test": test,
            "test_path": self.test_path,
        }

    def state_dict(self) -> dict:
        state = {"splits": self.split_ranges(), "train_batches": self.batches_consumed()}
        if self.stream is not None and self.trainer is not None:
            state["stream"] = self.stream.position(self.batches_consumed())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.restored = state
        self.check_test_split_was_held_out(state.get("splits") or {})

    def check_test_split_was_held_out(self, before: dict) -> None:
        """Refuse a test split whose bytes the checkpoint's run trained or validated on (same corpus, other splits)."""
        now = self.split_ranges()
        if not self.has_test_split or now.get("kind") != "files" or before.get("kind") != "files":
            return
        if before.get("bytes") != now["bytes"] or now["test"] is None:
            return
        seen_end = before["validation"][1]  # the checkpoint's run used bytes [0, seen_end) for training and validation
        if now["test"][0] < seen_end:
            raise DataError(
                f"the test split (bytes {now['test'][0]:,} to {now['test'][1]:,} of {self.path}) overlaps bytes the "
                f"checkpoint's run trained or validated on (0 to {seen_end:,}: it had data.test_fraction "
                f"{1 - seen_end / now['bytes']:.3g}); test with the data.val_fraction and data.test_fraction it "
                "was trained with"
            )
