"""Reading a prepared directory (made by `prepare`, prepare.py) with LitData.

A prepared directory holds the corpus as byte tokens in LitData's optimized format, one LitData dataset
per split (train/, validation/, test/), and a manifest (bdh_prepared.json, written last) saying what it
is. Training windows of block_size + 1 bytes stream through `litdata.StreamingDataset` and
`StreamingDataLoader` with the tokens loader: shuffled by LitData (chunk order and windows within chunks,
reshuffled each pass) and sharded by LitData across ranks and nodes. Validation and test read
data.val_windows evenly spaced windows of their own splits, split between the ranks as for files.

LitData is optional (`pip install 'bdh-lightning[stream]'`); it is imported only when a prepared
directory is used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from urllib.parse import urlparse

import numpy as np
import torch

from .errors import DataError

MANIFEST = "bdh_prepared.json"
INCOMPLETE = ".bdh_prepare_incomplete"  # present from the first byte written until the manifest is
FORMAT = "bdh-lightning prepared bytes"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
URL_SCHEMES = ("s3", "gs", "r2")
INSTALL = "pip install 'bdh-lightning[stream]'"


def human_bytes(n: int) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and `ls -h --si` count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} B"


def is_url(path: str) -> bool:
    return urlparse(str(path)).scheme in URL_SCHEMES


def is_prepared(path: str) -> bool:
    """Whether `path` names a prepared directory (complete or not), rather than files to read as they are."""
    if is_url(path):
        return True
    local = os.path.expanduser(str(path))
    return os.path.isdir(local) and any(
        os.path.exists(os.path.join(local, name))
        for name in (MANIFEST, INCOMPLETE, os.path.join("train", "index.json"))
    )


def require_litdata(what: str):
    """The litdata module, or a one-line DataError saying how to install it."""
    try:
        import litdata
    except ImportError:
        raise DataError(f"{what} needs LitData, which is not installed; install it with {INSTALL}") from None
    return litdata


def read_remote(url: str, name: str) -> bytes:
    """The bytes of `url`/`name` on object storage, through LitData's storage clients, as one DataError if not."""
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, name)
        target = f"{url.rstrip('/')}/{name}"
        try:
            _get_fs_provider(target).download_file(target, local)
            with open(local, "rb") as file:
                return file.read()
        except ImportError as error:
            detail = " ".join(str(error).split())[:300]
            raise DataError(f"reading {target} needs a storage client that is not installed ({detail})") from None
        except Exception as error:  # noqa: BLE001 (storage clients raise their own exception types)
            kind = type(error).__name__
            detail = " ".join(str(error).split())[:300]
            if "credential" in f"{kind} {detail}".lower() and target.startswith("gs://"):
                hint = (
                    "no credentials were found: set GOOGLE_APPLICATION_CREDENTIALS, or run "
                    "`gcloud auth application-default login`"
                )
            elif "credential" in f"{kind} {detail}".lower():
                hint = (
                    "no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                    "or run where an instance role applies"
                )
            else:
                hint = "check the URL, your network and your credentials"
            raise DataError(f"cannot read {target} ({kind}: {detail}); {hint}") from None


class Prepared:
    """A prepared directory, checked: its manifest, and where each split's LitData dataset lives."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self.window = manifest["block_size"] + 1
        self._datasets = {}

    def split_dir(self, split: str) -> str:
        return f"{self.path.rstrip('/')}/{split}" if is_url(self.path) else os.path.join(self.path, split)

    def windows(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("windows", 0))

    def has(self, split: str) -> bool:
        return self.windows(split) > 0

    def split_bytes(self) -> dict[str, int]:
        names = {"train": "train", "validation": "validation", "test": "test"}
        return {key: int(self.manifest["splits"].get(name, {}).get("bytes", 0)) for key, name in names.items()}

    def identity(self) -> str:
        return self.manifest["sources"]["sha256"]

    def describe(self) -> str:
        m = self.manifest

        splits = m["splits"]
        parts = [
            f"{name} {human_bytes(splits[name]['bytes'])} ({splits[name]['documents']:,} documents)"
            for name in SPLITS
            if splits.get(name, {}).get("documents")
        ]
        text = (
            f"corpus {self.path}: prepared from {m['source']['path']}, {m['sources']['count']:,} files, "
            f"{human_bytes(m['sources']['bytes'])}, windows of {self.window} bytes; {', '.join(parts)}"
        )
        if not self.has("test"):
            text += "; no test split"
        if m.get("left_out"):
            text += "; left out: " + ", ".join(f"{n:,} {reason}" for reason, n in sorted(m["left_out"].items()))
        return text

    def dataset(self, split: str, shuffle: bool = False, seed: int = 0):
        from litdata import StreamingDataset, TokensLoader

        return StreamingDataset(
            self.split_dir(split),
            item_loader=TokensLoader(block_size=self.window),
            shuffle=shuffle,
            drop_last=shuffle,
            seed=seed,
        )

    def train_loader(self, batch_size: int, seed: int, num_workers: int, start: int) -> "EndlessStream":
        """Endless training batches from LitData, starting after `start` batches already drawn by this rank."""
        from litdata import StreamingDataLoader

        dataset = self.dataset("train", shuffle=True, seed=seed)
        loader = StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_windows,
            pin_memory=torch.cuda.is_available(),
        )
        self.stream = EndlessStream(loader, start)
        return self.stream

    def position(self, batches: int) -> dict:
        """Where the training stream stands after `batches` batches of this rank, in LitData's terms."""
        per_epoch = len(self.stream.loader) if getattr(self, "stream", None) is not None else 0
        epoch, done = divmod(batches, per_epoch) if per_epoch else (0, batches)
        return {"batches": batches, "pass": epoch, "batches_in_pass": done, "batches_per_pass": per_epoch}

    def eval_loader(self, split: str, count: int, batch_size: int, rank: int, world_size: int, num_workers: int):
        """data.val_windows windows evenly spaced over the split, this rank's share, in batches."""
        name = "validation" if split == "validation" else "test"
        total = self.windows(name)
        indices = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))
        if len(indices) < world_size:
            raise DataError(
                f"the {split} split of {self.path} has {len(indices)} windows for {world_size} devices; raise "
                "data.val_windows, or prepare again with a larger share for it"
            )
        from torch.utils.data import DataLoader

        batches = EvalWindows(self, name, indices[rank::world_size], batch_size)
        return DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())


def collate_windows(windows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets (int64) from windows of block_size + 1 byte tokens."""
    batch = torch.stack([torch.as_tensor(w) for w in windows]).long()
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class EndlessStream:
    """LitData's training batches pass after pass (each reshuffled), as one endless stream like the file path's.

    Lightning sees one endless epoch (no length), so validation and checkpoints follow trainer steps alone,
    and the position in the stream is the number of batches drawn. A resumed run tells LitData's loader
    where that position is in its pass (its own state format), so it continues with the next batch.
    """

    def __init__(self, loader, start: int):
        self.loader, self.start = loader, start

    def __iter__(self):
        loader = self.loader
        per_epoch = len(loader)
        if per_epoch == 0:
            raise DataError(
                f"the train split of {loader.dataset.input_dir.path or loader.dataset.input_dir.url} has fewer windows "
                f"than one batch per device ({loader.batch_size}); lower data.batch_size or prepare more data"
            )
        epoch, done = divmod(self.start, per_epoch)
        loader.current_epoch = epoch  # the next pass LitData starts is epoch + 1, as in an uninterrupted run
        if done:
            workers = max(loader.num_workers, 1)
            samples = done * loader.batch_size
            loader.dataset.set_epoch(epoch + 1)
            loader.load_state_dict(
                {
                    "dataset": loader.dataset.state_dict(samples, loader.num_workers, loader.batch_size),
                    "current_epoch": epoch + 1,
                    "num_samples_yielded": samples,
                    "latest_worker_idx": (done - 1) % workers,
                }
            )
        while True:
            yield from loader


class EvalWindows(torch.utils.data.IterableDataset):
    """Fixed windows of a prepared split, by index, in batches (read on demand; nothing is shuffled)."""

    def __init__(self, prepared: Prepared, split: str, indices: np.ndarray, batch_size: int):
        self.prepared, self.split, self.indices, self.batch_size = prepared, split, indices, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        from torch.utils.data import get_worker_info

        dataset = self.prepared.dataset(self.split)
        worker = get_worker_info()
        for i in range(worker.id if worker else 0, len(self), worker.num_workers if worker else 1):
            chosen = self.indices[i * self.batch_size : (i + 1) * self.batch_size]
            yield collate_windows([dataset[int(j)] for j in chosen])


def read_manifest(path: str) -> dict:
    """The manifest of a prepared directory, or a one-line DataError saying what is wrong with it."""
    if is_url(path):
        raw = read_remote(path, MANIFEST)
    else:
        if os.path.exists(os.path.join(path, INCOMPLETE)):
            raise DataError(
                f"data.path {path!r} is an unfinished prepared directory (prepare stopped before it finished); "
                f"run prepare again with --output {path} to finish it"
            )
        try:
            with open(os.path.join(path, MANIFEST), "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            raise DataError(
                f"data.path {path!r} looks like LitData output but has no {MANIFEST}, so it is not a complete prepared "
                f"directory; make one with `python -m bdh_lightning prepare --data.path SOURCE --output {path}`"
            ) from None
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise ValueError
    except (ValueError, AttributeError):
        raise DataError(f"{path}/{MANIFEST} is not a bdh-lightning manifest; prepare the directory again") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"data.path {path!r} was prepared by another version of bdh-lightning (format {manifest.get('version')!r}; "
            f"this one reads format {FORMAT_VERSION}); prepare it again with this version"
        )
    return manifest


def check_chunks(prepared: Prepared) -> None:
    """Every chunk a split's index names is there, whole (local directories; object storage is checked by LitData)."""
    for split in SPLITS:
        if not prepared.manifest["splits"].get(split, {}).get("windows"):
            continue
        folder = prepared.split_dir(split)
        try:
            with open(os.path.join(folder, "index.json")) as file:
                chunks = json.load(file)["chunks"]
        except (OSError, ValueError, KeyError):
            raise DataError(
                f"{folder}/index.json is missing or unreadable; copy the prepared directory again, or prepare it again"
            ) from None
        missing = [
            c["filename"]
            for c in chunks
            if not os.path.isfile(os.path.join(folder, c["filename"]))
            or os.path.getsize(os.path.join(folder, c["filename"])) != c["chunk_bytes"]
        ]
        if missing:
            raise DataError(
                f"{folder} is missing {len(missing)} of its {len(chunks)} chunks or has them cut short (e.g. "
                f"{missing[0]}); "
                "copy the prepared directory again, or prepare it again"
            )


def open_prepared(path: str, block_size: int) -> Prepared:
    """A prepared directory at `path` (local or a URL), checked against this run's block size."""
    require_litdata(f"data.path {path!r} (a prepared directory)")
    local = path if is_url(path) else os.path.expanduser(str(path))
    manifest = read_manifest(local)
    if manifest["block_size"] != block_size:
        raise DataError(
            f"data.path {path!r} was prepared for data.block_size {manifest['block_size']} (windows of "
            f"{manifest['block_size'] + 1} bytes), not {block_size}; train with --data.block_size "
            f"{manifest['block_size']}, "
            f"or prepare it again with --data.block_size {block_size}"
        )
    prepared = Prepared(local, manifest)
    for split in ("train", "validation"):
        if not prepared.has(split):
            raise DataError(
                f"the {split} split of {path} is empty ({manifest['splits'].get(split, {}).get('documents', 0)} "
                "documents, "
                f"no window of {prepared.window} bytes); prepare it again with a larger data.val_fraction, smaller "
                "documents or more data"
            )
    if not is_url(local):
        check_chunks(prepared)
    return prepared
