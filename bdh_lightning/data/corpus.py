"""A corpus of files: which files a data.path names, and their bytes read (pread, never loaded) as one stream
through at most MAX_OPEN_FILES open descriptors; a file that shrinks under a running job is a DataError, not a SIGBUS.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import hashlib
import os
import stat
import tempfile
import urllib.error
import urllib.request
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError

TINYSHAKESPEARE = "tinyshakespeare"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

MAX_OPEN_FILES = 64  # descriptors one process keeps open for reading (least recently used closed first)


# Listing: which files a data.path names, and what was left out and why.


class PathList(Sequence):
    """File paths kept compactly (one bytes blob of their names after a common prefix, and end offsets): a listing
    of millions of files stays small and pickles cheaply to workers."""

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
    """The regular files behind a data.path, each once, in sorted order, and a count of what was left out. `add`
    records them in compact arrays; `finish` drops second links to a file (same device and inode) and makes `files`
    (a PathList), `sizes` (int64) and `identities` (device, inode)."""

    def __init__(self, path: str, prefix: str = ""):
        self.path, self.prefix = path, prefix
        self._prefix_bytes = os.fsencode(prefix)
        self._blob, self._ends = bytearray(), array("q")
        self._sizes, self._devices, self._inodes = array("q"), array("q"), array("q")
        self.left_out = Counter()  # reason -> count

    def add(self, file: str, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            self.left_out[f"not regular files ({short_kind(info.st_mode)})"] += 1
            return
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
        blob = bytes(self._blob) if keep.all() else b"".join(self._blob[a:b] for a, b in zip(starts[kept], ends[kept]))
        self.files = PathList(self.prefix, blob, np.cumsum(lengths))
        self.sizes = np.frombuffer(self._sizes, np.int64)[kept].copy()
        self.identities = identities[kept]
        self._blob = self._ends = self._sizes = self._devices = self._inodes = None
        return self

    def shared_with(self, other: Listing) -> list[str]:
        """Files of this listing that are the same files (device and inode) as files of `other`."""
        theirs = {tuple(pair) for pair in other.identities.tolist()}
        return [self.files[i] for i, pair in enumerate(self.identities.tolist()) if tuple(pair) in theirs]


FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
              stat.S_IFBLK: "a device", stat.S_IFDIR: "a directory"}  # fmt: skip


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


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
        info = stat_entry(entry.path, listing)
        if info is None:
            continue
        if not stat.S_ISDIR(info.st_mode):
            listing.add(entry.path, info)
        elif (info.st_dev, info.st_ino) in visited:
            listing.left_out["directory already read through another link"] += 1
        else:
            visited.add((info.st_dev, info.st_ino))
            walk(entry.path, f"{rel}/", listing, exclude, include_hidden, visited)


def stat_entry(path: str, listing: Listing) -> os.stat_result | None:
    """os.stat of a listed entry (following links); None for a broken link (counted), one line if unreadable."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        listing.left_out["broken link"] += 1
        return None
    except OSError as error:  # e.g. a link that loops
        raise DataError(
            f"cannot read data file {path}: {error.strerror or error}; fix it or leave it out with data.exclude"
        ) from None


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
        nothing = "is an empty file (0 bytes); point data.path at text files"
    elif info is not None and stat.S_ISDIR(info.st_mode):
        walk(expanded, "", listing, exclude, include_hidden, {(info.st_dev, info.st_ino)})
        nothing = "is a directory with no files to read in it{}; point data.path at text files"
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
        list_glob(expanded, listing, exclude)
        nothing = "is a glob that matches no files to read{}; check the pattern"
    else:
        raise DataError(f"data.path {path!r} does not exist; give a file, a directory or a glob")
    if not len(listing.finish().files):  # a single file's "empty" goes without the count
        raise DataError(f"data.path {path!r} " + nothing.format(left_out_words(listing)))
    return listing


def list_glob(pattern: str, listing: Listing, exclude: list[str]) -> None:
    """Add the regular files a glob matches to `listing`; count what else it matched."""
    root = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0])
    for match in sorted(glob_matches(pattern, listing)):
        rel = os.path.relpath(match, root) if root else match
        if excluded(rel, exclude):
            listing.left_out["excluded by data.exclude"] += 1
            continue
        info = stat_entry(match, listing)
        if info is not None and stat.S_ISDIR(info.st_mode):
            listing.left_out["directories matched by the glob (use ** to read inside)"] += 1
        elif info is not None:
            listing.add(match, info)


def glob_matches(pattern: str, listing: Listing) -> set[str]:
    """What glob.glob(pattern, recursive=True) matches, except that `**` enters each folder once (by device and
    inode): glob follows links to folders, so a link back to a parent would be walked round and round."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return set(glob.glob(pattern))
    i = parts.index("**")
    head, rest = os.sep.join(parts[:i]), os.sep.join(parts[i + 1 :])
    if i == 0 or head:
        tops = glob.glob(head) if glob.has_magic(head) else [head]
    else:
        tops = [os.sep]  # the pattern starts with /**
    found = set()
    for top in tops:
        folders = folders_below(top, listing)
        if folders and top and not rest:  # a trailing ** matches its folder too, as glob gives it: with a /
            found.add(os.path.join(top, ""))
        for folder in folders:
            found |= glob_matches(os.path.join(glob.escape(folder), rest or "*"), listing)
    return found


def folders_below(top: str, listing: Listing) -> list[str]:
    """`top` and the folders below it that are not hidden (what `**` matches), each once by device and inode."""
    try:
        info = os.stat(top or ".")
    except OSError:
        return []
    found, seen, todo = [], set(), [(top, info)] if stat.S_ISDIR(info.st_mode) else []
    while todo:
        folder, info = todo.pop()
        if (info.st_dev, info.st_ino) in seen:
            listing.left_out["directory already read through another link"] += 1
            continue
        seen.add((info.st_dev, info.st_ino))
        found.append(folder)
        try:
            with os.scandir(folder or ".") as scan:
                entries = sorted((e for e in scan if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)
                todo += [(os.path.join(folder, e.name), e.stat()) for e in entries]
        except OSError:  # a folder glob cannot list either: nothing below it matches
            continue
    return found


def left_out_words(listing: Listing) -> str:
    """' (left out: 2 hidden, 1 empty)', or '' when nothing was left out."""
    if not listing.left_out:
        return ""
    return " (left out: " + ", ".join(f"{n} {reason}" for reason, n in sorted(listing.left_out.items())) + ")"


# Reading: one stream of bytes over many files.


class ByteCorpus:
    """Files seen as one stream of bytes; nothing is read up front and at most MAX_OPEN_FILES stay open.

    Opening costs one open (and close) per file, so unreadable files are found before any model is built.
    """

    def __init__(self, files: Sequence[str], sizes: Sequence[int] | None = None):
        opened_sizes = [size_if_readable(file) for file in files]
        sizes = np.asarray(opened_sizes if sizes is None else sizes, dtype=np.int64)
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


def size_if_readable(file: str) -> int:
    """The size of a file that opens for reading; a one-line DataError if it does not."""
    try:
        with open(file, "rb") as handle:
            return os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise DataError(
            f"cannot read data file {file}: {error.strerror or error}; fix its permissions or leave it out"
        ) from None


def read_corpus(path: str, exclude: list[str] | None = None, include_hidden: bool = False) -> ByteCorpus:
    """The corpus at a local `path` (file, directory or glob) as one stream of bytes."""
    listing = list_corpus(path, exclude, include_hidden)
    return ByteCorpus(listing.files, listing.sizes)


def cache_dir() -> Path:
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
