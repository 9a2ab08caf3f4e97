"""Byte-level data: any corpus read through memory maps, random training windows, fixed validation windows.

A byte is a token (vocabulary 256). Files are concatenated into one stream of bytes without being
loaded; the first (1 - val_fraction) of the stream is training data, the rest validation.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .errors import DataError, is_int

TINYSHAKESPEARE = "tinyshakespeare"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def corpus_files(path: str) -> list[Path]:
    """The files behind `path` (a file, a directory searched recursively, or a glob), in sorted order."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        return [Path(expanded)]
    if os.path.isdir(expanded):
        files = sorted(p for p in Path(expanded).rglob("*") if p.is_file())
        if not files:
            raise DataError(f"data.path {path!r} is a directory with no files in it; point data.path at text files")
        return files
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"data.path {path!r} is a glob that matches no files; check the pattern")
        return files
    raise DataError(f"data.path {path!r} does not exist; give a file, a directory or a glob")


class ByteCorpus:
    """Files seen as one stream of bytes through read-only memory maps; nothing is read up front.

    Opening costs one stat and one open per file, so bad files are found before any model is built.
    """

    def __init__(self, files: list[Path]):
        self.files, sizes = [], []
        for file in files:
            try:
                with open(file, "rb"):
                    pass
                size = os.stat(file).st_size
            except OSError as error:
                raise DataError(f"cannot read data file {file}: {error.strerror or error}; fix its permissions or leave it out") from None
            if size:  # empty files add nothing (and cannot be memory-mapped)
                self.files.append(file)
                sizes.append(size)
        self.starts = [0, *np.cumsum(sizes).tolist()]  # file i holds bytes [starts[i], starts[i+1])
        self._maps = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        # A pickled memmap would carry all its bytes; worker processes reopen the files instead.
        return {**self.__dict__, "_maps": None}

    def read(self, start: int, length: int) -> np.ndarray:
        """Bytes [start, start + length) of the stream as a new uint8 array (may span files)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"bytes [{start}, {start + length}) are outside the corpus of {len(self)} bytes")
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=np.uint8, mode="r", shape=(self.starts[i + 1] - self.starts[i],)) for i, f in enumerate(self.files)]
        out = np.empty(length, dtype=np.uint8)
        i = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < length:
            local = start + done - self.starts[i]
            piece = self._maps[i][local : local + length - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            i += 1
        return out

    def windows(self, offsets: np.ndarray, length: int) -> torch.Tensor:
        """One window of `length` bytes per offset, as an int64 tensor (len(offsets), length)."""
        return torch.from_numpy(np.stack([self.read(int(o), length) for o in offsets]).astype(np.int64))


def read_corpus(path: str) -> ByteCorpus:
    """The corpus at a local `path` (file, directory or glob) as one memory-mapped stream of bytes."""
    return ByteCorpus(corpus_files(path))


def cache_dir() -> Path:
    return Path(os.environ.get("BDH_LIGHTNING_CACHE", "~/.cache/bdh_lightning")).expanduser()


def download_tinyshakespeare() -> Path:
    """The cached tiny Shakespeare file, downloaded and checked once if it is not there yet."""
    target = cache_dir() / "tinyshakespeare.txt"
    if target.is_file():
        return target
    url = os.environ.get("BDH_LIGHTNING_TINYSHAKESPEARE_URL", TINYSHAKESPEARE_URL)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data cache {target.parent}: {error.strerror}; set BDH_LIGHTNING_CACHE to a writable directory") from None
    # Download to a temporary file and rename: an interrupted or concurrent download never leaves a partial file.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".tinyshakespeare.", suffix=".part")
    try:
        sha256 = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc="tinyshakespeare") as progress:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            sha256.update(chunk)
                            progress.update(len(chunk))
            except (urllib.error.URLError, OSError) as error:
                reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
                raise DataError(
                    f"could not download tiny Shakespeare from {url} ({reason}); use a local copy instead, e.g. "
                    "--data.path data/tinyshakespeare.txt (a file, a directory or a glob also work)"
                ) from None
        if sha256.hexdigest() != TINYSHAKESPEARE_SHA256:
            raise DataError(
                f"the file downloaded from {url} has sha256 {sha256.hexdigest()}, expected {TINYSHAKESPEARE_SHA256}; "
                "check BDH_LIGHTNING_TINYSHAKESPEARE_URL or use a local copy with --data.path"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


class TrainBatches(IterableDataset):
    """Endless random training batches; batch k on rank r comes from an RNG seeded with (seed, r, k)."""

    def __init__(self, corpus: ByteCorpus, train_size: int, block_size: int, batch_size: int, seed: int, rank: int, start: int):
        self.corpus, self.train_size, self.block_size, self.batch_size = corpus, train_size, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, k])
        offsets = rng.integers(0, self.train_size - self.block_size, size=self.batch_size)  # whole window in the split
        return split_window(self.corpus.windows(offsets, self.block_size + 1))

    def __iter__(self):
        # Workers take turns (DataLoader reads them round-robin), so the stream is the same for any num_workers.
        worker = get_worker_info()
        k = self.start + (worker.id if worker else 0)
        step = worker.num_workers if worker else 1
        while True:
            yield self.batch(k)
            k += step


class ValBatches(IterableDataset):
    """Fixed validation windows, in batches of up to batch_size."""

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
    ):
        """Byte-level language-model data: every byte of the corpus is one token.

        Args:
            path: The corpus: a file, a directory (all files in it, recursively, in sorted order), or a glob;
                files are concatenated. "tinyshakespeare" downloads tiny Shakespeare once into
                $BDH_LIGHTNING_CACHE (default ~/.cache/bdh_lightning).
            block_size: Context length T: bytes per training window (the model's block_size follows it).
            batch_size: Windows per batch on each device.
            val_fraction: Share of the corpus, taken from its end, held out for validation, in (0, 1).
            val_windows: Validation windows, fixed and evenly spaced over the held-out bytes, split across devices.
            seed: Seed of the random training windows; batch k on device rank r is drawn from (seed, r, k),
                so a resumed run draws the same windows as an uninterrupted one.
            num_workers: DataLoader worker processes (0 = read in the main process; windows are cheap).
        """
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("val_windows", val_windows)):
            if not is_int(value) or value <= 0:
                raise DataError(f"data.{name} must be a positive integer, got {value!r}")
        for name, value in (("seed", seed), ("num_workers", num_workers)):
            if not is_int(value) or value < 0:
                raise DataError(f"data.{name} must be a non-negative integer, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.val_fraction, self.val_windows, self.seed, self.num_workers = val_fraction, val_windows, seed, num_workers
        # Local corpora are checked now (stat only), before a model is built; tiny Shakespeare once it is downloaded.
        self.corpus = None
        if path != TINYSHAKESPEARE:
            self.corpus = read_corpus(path)
            self.check_sizes()

    def prepare_data(self) -> None:
        if self.path == TINYSHAKESPEARE:
            download_tinyshakespeare()

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = ByteCorpus([download_tinyshakespeare()])
            self.check_sizes()

    @property
    def train_size(self) -> int:
        """Bytes in the training split: [0, train_size); validation is [train_size, len(corpus))."""
        return int(len(self.corpus) * (1.0 - self.val_fraction))

    def check_sizes(self) -> None:
        window = self.block_size + 1
        train, val = self.train_size, len(self.corpus) - self.train_size
        if min(train, val) < window:
            raise DataError(
                f"data.path {self.path!r} has {len(self.corpus)} bytes, split into {train} for training and {val} for "
                f"validation, but each split needs at least block_size + 1 = {window}; use a smaller data.block_size, "
                "a different data.val_fraction, or more data"
            )

    @property
    def val_offsets(self) -> np.ndarray:
        """Start offsets (into the whole corpus) of the validation windows, evenly spaced, no duplicates."""
        self.setup()
        last = len(self.corpus) - (self.block_size + 1)
        return np.unique(np.linspace(self.train_size, last, self.val_windows).round().astype(np.int64))

    def rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, _ = self.rank_and_world_size()
        # Batches already consumed: a run resumed at step s continues exactly where step s left off.
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0
        batches = TrainBatches(self.corpus, self.train_size, self.block_size, self.batch_size, self.seed, rank, start)
        return self.loader(batches)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self.rank_and_world_size()
        offsets = self.val_offsets
        if len(offsets) < world_size:
            raise DataError(
                f"validation has {len(offsets)} distinct windows for {world_size} devices; raise data.val_windows "
                "(or data.val_fraction) to at least the number of devices"
            )
        # Each rank takes a disjoint share, so no window is counted twice and Lightning adds no sampler.
        return self.loader(ValBatches(self.corpus, offsets[rank::world_size], self.block_size, self.batch_size))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def loader(self, batches: IterableDataset) -> DataLoader:
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
