"""Byte-level data: any corpus, random training windows, fixed validation and test windows.

A byte is a token (vocabulary 256). The files of a corpus are seen as one stream of bytes, in sorted
order, without being loaded: [0, train_end) is training data, [train_end, val_end) validation and
[val_end, end) the test split (empty unless data.test_fraction is set; data.test_path gives the test
split a corpus of its own instead). Bytes are read with pread through a small cache of open files, so a
corpus of any number of files holds at most MAX_OPEN_FILES descriptors, and a file that shrinks under a
running job is a one-line DataError rather than a SIGBUS.

A directory made by `prepare` (prepare.py) is streamed with LitData instead (litstream.py).
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import hashlib
import math
import os
import stat
import tempfile
import urllib.error
import urllib.request
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from . import litstream
from .errors import DataError, finite_float, is_int
from .litstream import human_bytes
from .streams import StreamBatches, StreamLayout, validation_streams

TINYSHAKESPEARE = "tinyshakespeare"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

MAX_OPEN_FILES = 64  # descriptors one process keeps open for reading (least recently used closed first)


# Listing: which files a data.path names, and what was left out and why.


class PathList(Sequence):
    """File paths kept compactly: one bytes blob of their names after a common prefix, and end offsets.

    About 25 bytes per file (its name inside the corpus folder plus an offset) instead of a few hundred
    for a list of str, so a listing of millions of files stays small and pickles cheaply to workers.
    """

    def __init__(self, prefix: str, blob: bytes, ends: np.ndarray):
        self.prefix, self.blob, self.ends = prefix, blob, ends

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        start = int(self.ends[i - 1]) if i else 0
        return self.prefix + os.fsdecode(self.blob[start : int(self.ends[i])])


class Listing:
    """The regular files behind a data.path, each once, in sorted order, and a count of what was left out.

    Files are recorded as they are found (name, size, device and inode, in compact arrays); `finish` drops
    second links to a file already taken (same device and inode: symbolic or hard links) and makes `files`
    (a PathList) and `sizes` (int64).
    """

    def __init__(self, path: str, prefix: str = ""):
        self.path, self.prefix = path, prefix
        self._prefix_bytes = os.fsencode(prefix)
        self._blob, self._ends = bytearray(), array("q")
        self._sizes, self._devices, self._inodes = array("q"), array("q"), array("q")
        self.left_out = Counter()  # reason -> count
        self.files, self.sizes = PathList(prefix, b"", np.zeros(0, np.int64)), np.zeros(0, np.int64)
        self.identities = None

    def add(self, file: str, info: os.stat_result) -> None:
        if info.st_size == 0:
            self.left_out["empty"] += 1
            return
        name = os.fsencode(file)
        self._blob += name[len(self._prefix_bytes) :] if name.startswith(self._prefix_bytes) else name
        self._ends.append(len(self._blob))
        self._sizes.append(info.st_size)
        self._devices.append(info.st_dev)
        self._inodes.append(info.st_ino)

    def finish(self) -> Listing:
        identities = np.stack([np.frombuffer(self._devices, np.int64), np.frombuffer(self._inodes, np.int64)], axis=1)
        keep = np.zeros(len(identities), bool)
        keep[np.unique(identities, axis=0, return_index=True)[1]] = True  # the first of each (device, inode)
        if not keep.all():
            self.left_out["already read through another link"] += int((~keep).sum())
        ends, kept = np.frombuffer(self._ends, np.int64), np.flatnonzero(keep)
        starts = np.concatenate([[0], ends[:-1]])
        lengths = (ends - starts)[kept]
        if keep.all():
            blob = bytes(self._blob)
        else:
            blob = b"".join(self._blob[a:b] for a, b in zip(starts[kept], ends[kept]))
        self.files = PathList(self.prefix, blob, np.cumsum(lengths))
        self.sizes = np.frombuffer(self._sizes, np.int64)[kept].copy()
        self.identities = identities[kept]
        self._blob = self._ends = self._sizes = self._devices = self._inodes = None
        return self

    def shared_with(self, other: Listing) -> list[str]:
        """Files of this listing that are the same files (device and inode) as files of `other`."""
        mine = {tuple(pair) for pair in self.identities.tolist()}
        theirs = {tuple(pair) for pair in other.identities.tolist()}
        return [self.files[i] for i, pair in enumerate(self.identities.tolist()) if tuple(pair) in theirs & mine]


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def short_kind(mode: int) -> str:
    return kind_of(mode).split(" (")[0].removeprefix("a ")


def excluded(relative: str, patterns: list[str]) -> bool:
    """Whether a data.exclude glob matches an entry's path (relative to the corpus root) or its name."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(
    directory: str, relative: str, listing: Listing, exclude: list[str], include_hidden: bool, visited: set
) -> None:
    """Add the files under `directory` to `listing`, depth first in sorted order (the order of sorted paths)."""
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as error:
        raise DataError(
            f"cannot list directory {directory}: {error.strerror or error}; fix its permissions, or leave it out "
            "with data.exclude"
        ) from None
    for entry in entries:
        rel = f"{relative}{entry.name}"
        if entry.name.startswith(".") and not include_hidden:
            listing.left_out["hidden"] += 1
            continue
        if excluded(rel, exclude):
            listing.left_out["excluded by data.exclude"] += 1
            continue
        try:
            info = os.stat(entry.path)  # follows links
        except FileNotFoundError:
            listing.left_out["broken link"] += 1
            continue
        except OSError as error:
            raise DataError(
                f"cannot read data file {entry.path}: {error.strerror or error}; fix it or leave it out with "
                "data.exclude"
            ) from None
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in visited:
                listing.left_out["directory already read through another link"] += 1
                continue
            visited.add((info.st_dev, info.st_ino))
            walk(entry.path, f"{rel}/", listing, exclude, include_hidden, visited)
        elif stat.S_ISREG(info.st_mode):
            listing.add(entry.path, info)
        else:
            listing.left_out[f"not regular files ({short_kind(info.st_mode)})"] += 1


def list_corpus(path: str, exclude: list[str] | None = None, include_hidden: bool = False) -> Listing:
    """The files behind `path`: a file, a directory searched recursively, or a glob (see Listing).

    Only names are listed and stat'ed (no file is read). Hidden entries (names starting with '.') inside a
    directory are left out unless `include_hidden`; `exclude` globs leave out more.
    """
    exclude = list(exclude or [])
    expanded = os.path.expanduser(path)
    listing = Listing(path, os.path.join(expanded, "") if os.path.isdir(expanded) else "")
    try:
        info = os.stat(expanded)
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise DataError(f"cannot read data.path {path!r}: {error.strerror or error}") from None
    if info is not None and stat.S_ISREG(info.st_mode):
        listing.add(expanded, info)
        if not len(listing.finish().files):
            raise DataError(f"data.path {path!r} is an empty file (0 bytes); point data.path at text files")
    elif info is not None and stat.S_ISDIR(info.st_mode):
        walk(expanded, "", listing, exclude, include_hidden, {(info.st_dev, info.st_ino)})
        if not len(listing.finish().files):
            raise DataError(
                f"data.path {path!r} is a directory with no files to read in it{left_out_words(listing)}; point "
                "data.path at text files"
            )
    elif info is not None:
        raise DataError(
            f"data.path {path!r} is {kind_of(info.st_mode)}, not a file or a directory; give a file, a "
            "directory or a glob"
        )
    elif os.path.islink(expanded):
        raise DataError(
            f"data.path {path!r} is a broken symbolic link (to {os.readlink(expanded)!r}); fix the link or give "
            "the file itself"
        )
    elif glob.has_magic(expanded):
        root = os.path.dirname(expanded.split("*")[0].split("?")[0].split("[")[0])
        for match in sorted(glob.glob(expanded, recursive=True)):
            rel = os.path.relpath(match, root) if root else match
            if excluded(rel, exclude):
                listing.left_out["excluded by data.exclude"] += 1
                continue
            try:
                info = os.stat(match)
            except FileNotFoundError:
                listing.left_out["broken link"] += 1
                continue
            except OSError as error:  # e.g. a link that loops: one line, as inside a directory
                raise DataError(
                    f"cannot read data file {match}: {error.strerror or error}; fix it or leave it out with "
                    "data.exclude"
                ) from None
            if stat.S_ISREG(info.st_mode):
                listing.add(match, info)
            elif stat.S_ISDIR(info.st_mode):
                listing.left_out["directories matched by the glob (use ** to read inside)"] += 1
            else:
                listing.left_out[f"not regular files ({short_kind(info.st_mode)})"] += 1
        if not len(listing.finish().files):
            raise DataError(
                f"data.path {path!r} is a glob that matches no files to read{left_out_words(listing)}; check "
                "the pattern"
            )
    else:
        raise DataError(f"data.path {path!r} does not exist; give a file, a directory or a glob")
    return listing


def left_out_words(listing: Listing) -> str:
    """'; left out: 2 hidden, 1 empty' (or '' when nothing was left out)."""
    if not listing.left_out:
        return ""
    return " (left out: " + ", ".join(f"{n} {reason}" for reason, n in sorted(listing.left_out.items())) + ")"


def corpus_files(path: str, exclude: list[str] | None = None, include_hidden: bool = False) -> list[str]:
    """The files behind `path` (a file, a directory searched recursively, or a glob), in sorted order."""
    return list(list_corpus(path, exclude, include_hidden).files)


# Reading: one stream of bytes over many files.


class ByteCorpus:
    """Files seen as one stream of bytes; nothing is read up front and at most MAX_OPEN_FILES stay open.

    Opening costs one open (and close) per file, so unreadable files are found before any model is built.
    """

    def __init__(self, files: Sequence[str], sizes: Sequence[int] | None = None):
        if sizes is None:
            sizes = []
            for file in files:
                try:
                    sizes.append(os.stat(file).st_size)
                except OSError as error:
                    raise DataError(
                        f"cannot read data file {file}: {error.strerror or error}; fix its permissions or leave it out"
                    ) from None
        for file in files:
            try:
                with open(file, "rb", buffering=0):
                    pass
            except OSError as error:
                raise DataError(
                    f"cannot read data file {file}: {error.strerror or error}; fix its permissions or leave it out"
                ) from None
        sizes = np.asarray(sizes, dtype=np.int64)
        if (sizes == 0).any():  # empty files add nothing (a listing has none)
            keep = np.flatnonzero(sizes)
            files, sizes = [str(files[i]) for i in keep], sizes[keep]
        self.files, self.sizes = files if isinstance(files, PathList) else [str(f) for f in files], sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # file i holds bytes [starts[i], starts[i+1])
        self._open = OrderedDict()  # file index -> descriptor, least recently used first

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        # Worker processes open their own descriptors.
        return {**self.__dict__, "_open": OrderedDict()}

    def __del__(self):
        self.close()

    def close(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)
        self._open = OrderedDict()

    def descriptor(self, i: int) -> int:
        fd = self._open.pop(i, None)
        if fd is None:
            if len(self._open) >= MAX_OPEN_FILES:
                os.close(self._open.popitem(last=False)[1])
            try:
                fd = os.open(self.files[i], os.O_RDONLY)
            except OSError as error:
                raise DataError(
                    f"cannot read data file {self.files[i]}: {error.strerror or error}; it changed during the run"
                ) from None
        self._open[i] = fd
        return fd

    def read(self, start: int, length: int) -> np.ndarray:
        """Bytes [start, start + length) of the stream as a new uint8 array (may span files)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"bytes [{start}, {start + length}) are outside the corpus of {len(self)} bytes")
        out = np.empty(length, dtype=np.uint8)
        i = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < length:
            local = start + done - int(self.starts[i])
            want = min(length - done, int(self.sizes[i]) - local)
            got = self.pread_into(i, out[done : done + want], local)
            if got < want:
                self.shrunk(i)
            done += want
            i += 1
        return out

    def pread_into(self, i: int, buffer: np.ndarray, offset: int) -> int:
        fd = self.descriptor(i)
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as error:
                raise DataError(f"cannot read data file {self.files[i]}: {error.strerror or error}") from None
            if n == 0:
                break
            done += n
        return done

    def shrunk(self, i: int):
        try:
            now = f"{os.stat(self.files[i]).st_size} bytes now"
        except OSError as error:
            now = error.strerror or str(error)
        raise DataError(
            f"data file {self.files[i]} changed during the run: it had {self.sizes[i]} bytes at the start, {now}; "
            "restore it (or start again: the run's windows were drawn from the old bytes)"
        )

    def windows(self, offsets: np.ndarray, length: int) -> torch.Tensor:
        """One window of `length` bytes per offset, as an int64 tensor (len(offsets), length)."""
        return torch.from_numpy(np.stack([self.read(int(o), length) for o in offsets]).astype(np.int64))


def read_corpus(path: str, exclude: list[str] | None = None, include_hidden: bool = False) -> ByteCorpus:
    """The corpus at a local `path` (file, directory or glob) as one stream of bytes."""
    listing = list_corpus(path, exclude, include_hidden)
    return ByteCorpus(listing.files, listing.sizes)


def cache_dir():
    from pathlib import Path

    return Path(os.environ.get("BDH_LIGHTNING_CACHE", "~/.cache/bdh_lightning")).expanduser()


def download_tinyshakespeare():
    """The cached tiny Shakespeare file, downloaded and checked once if it is not there yet."""
    target = cache_dir() / "tinyshakespeare.txt"
    if target.is_file():
        return target
    url = os.environ.get("BDH_LIGHTNING_TINYSHAKESPEARE_URL", TINYSHAKESPEARE_URL)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create the data cache {target.parent}: {error.strerror}; set BDH_LIGHTNING_CACHE to a "
            "writable directory"
        ) from None
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


# Batches.


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
        # Workers take turns (DataLoader reads them round-robin), so the stream is the same for any num_workers.
        worker = get_worker_info()
        k = self.start + (worker.id if worker else 0)
        step = worker.num_workers if worker else 1
        while True:
            yield self.batch(k)
            k += step


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
                model.carry_state, the paper's training on long streams; see streams.py).
        """
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("val_windows", val_windows)):
            if not is_int(value) or value <= 0:
                raise DataError(f"data.{name} must be a positive integer, got {value!r}")
        for name, value in (("seed", seed), ("num_workers", num_workers)):
            if not is_int(value) or value < 0:
                raise DataError(f"data.{name} must be a non-negative integer, got {value!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
        finite_float("data.test_fraction", test_fraction, 0.0, 1.0, high_open=True, error=DataError)
        if val_fraction + test_fraction >= 1.0:
            raise DataError(
                "data.val_fraction + data.test_fraction must be below 1 (training needs bytes too), got "
                f"{val_fraction} + {test_fraction}"
            )
        if test_fraction and test_path:
            raise DataError("set data.test_fraction or data.test_path, not both (the test split is one or the other)")
        if exclude is not None and (isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude)):
            raise DataError(f"data.exclude must be a list of globs, e.g. ['*.log'], got {exclude!r}")
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.val_fraction, self.val_windows, self.seed, self.num_workers = val_fraction, val_windows, seed, num_workers
        self.test_fraction, self.test_path = float(test_fraction), test_path
        self.exclude, self.include_hidden = list(exclude or []), include_hidden
        if sampling not in ("windows", "streams"):
            raise DataError(f"data.sampling must be windows or streams, got {sampling!r}")
        self.sampling = sampling
        self.listing = None
        self.corpus = None
        self.test_corpus = None
        self.stream = None  # a prepared directory (litstream.Prepared) instead of a corpus of files
        self.restored = None  # the data state of a checkpoint being resumed or evaluated
        # Local corpora are checked now (stat only), before a model is built; tiny Shakespeare once it is downloaded.
        if litstream.is_prepared(path):
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
            self.stream = litstream.open_prepared(path, block_size)
        elif path != TINYSHAKESPEARE:
            self.listing = list_corpus(path, self.exclude, include_hidden)
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
            file = str(download_tinyshakespeare())
            self.listing = list_corpus(file)
            self.corpus = ByteCorpus(self.listing.files, self.listing.sizes)
            self.open_test_corpus()
            self.check_sizes()
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
        text = f"corpus {self.path}: {files:,} file{'s' * (files != 1)}, {human_bytes(len(self.corpus))}"
        text += f" (train {human_bytes(sizes['train'])}, validation {human_bytes(sizes['validation'])}"
        if self.test_path:
            test_files = len(self.test_corpus.files)
            files_word = f"{test_files:,} file{'s' * (test_files != 1)}"
            text += f", test {human_bytes(sizes['test'])} from {self.test_path}: {files_word})"
        elif self.test_fraction:
            text += f", test {human_bytes(sizes['test'])})"
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
