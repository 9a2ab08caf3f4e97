"""Prepared folders (made by `prepare`) read with LitData: the manifest and indexes checked against their schema,
shuffled training windows streamed and sharded across ranks by LitData, fixed validation and test windows by index.

LitData is optional (the `[stream]` extra): it is imported only when a prepared folder is used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from urllib.parse import urlparse

import numpy as np
import torch

from ..console import format_bytes
from ..errors import DataError, is_int

MANIFEST = "bdh_prepared.json"
INCOMPLETE = ".bdh_prepare_incomplete"  # present from the first byte written until the manifest is
FORMAT = "bdh-lightning prepared bytes"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
URL_SCHEMES = ("s3", "gs", "r2")
INSTALL = "pip install 'bdh-lightning[stream]'"


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
        return self.manifest["splits"][split]["windows"]

    def has(self, split: str) -> bool:
        return self.windows(split) > 0

    def split_bytes(self) -> dict[str, int]:
        return {split: self.manifest["splits"][split]["bytes"] for split in SPLITS}

    def identity(self) -> str:
        return self.manifest["sources"]["sha256"]

    def describe(self) -> str:
        m = self.manifest
        splits = m["splits"]
        parts = [
            f"{name} {format_bytes(splits[name]['bytes'])} ({splits[name]['documents']:,} documents)"
            for name in SPLITS
            if splits[name]["documents"]
        ]
        text = (
            f"corpus {self.path}: prepared from {m['source']['path']}, {m['sources']['count']:,} files, "
            f"{format_bytes(m['sources']['bytes'])}, windows of {self.window} bytes; {', '.join(parts)}"
        )
        if not self.has("test"):
            text += "; no test split"
        if m["left_out"]:
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


class Rule:
    """A leaf of a schema: what a value must be, in words, and the test of it."""

    def __init__(self, words: str, test):
        self.words, self.test = words, test


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Absent:
    """A field that may be missing (older LitData versions do not write it); checked against `schema` when present."""

    def __init__(self, schema):
        self.schema = schema


COUNT = Rule("a whole number from 0", lambda v: is_int(v) and 0 <= v < 2**63)
POSITIVE = Rule("a whole number from 1", lambda v: is_int(v) and 0 < v < 2**63)
FRACTION = Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1)
TEXT = Rule("text", lambda v: isinstance(v, str))
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
NOTHING = Rule("null", lambda v: v is None)
SHA256 = Rule(
    "64 hex digits", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
)
CHUNK_FILE = Rule("a file name in the split's folder", lambda v: isinstance(v, str) and v not in ("", ".", "..")
                  and "/" not in v and "\\" not in v)  # fmt: skip
SPLIT = {"bytes": COUNT, "windows": COUNT, "chunks": COUNT, "documents": COUNT}
MANIFEST_SCHEMA = {
    "block_size": POSITIVE,
    "source": {"path": TEXT, "exclude": [TEXT], "include_hidden": FLAG, "text_key": TEXT},
    "val_fraction": FRACTION,
    "test_fraction": FRACTION,
    "sources": {"file": TEXT, "count": COUNT, "bytes": COUNT, "sha256": SHA256},
    "left_out": (TEXT, COUNT),  # a mapping: reason -> count
    "splits": {split: SPLIT for split in SPLITS},
    "litdata": TEXT,
    "created": TEXT,
}
# What LitData reads of the index.json it wrote for each split (a prepared folder is never compressed or encrypted).
INDEX_SCHEMA = {
    "chunks": [
        {
            "chunk_bytes": COUNT,
            "chunk_size": COUNT,
            "filename": CHUNK_FILE,
            "dim": Rule("a whole number from 0 or null", lambda v: v is None or COUNT.test(v)),
        }  # fmt: skip
    ],
    "config": {
        "chunk_bytes": Rule("a whole number from 0 or null", lambda v: v is None or COUNT.test(v)),
        "chunk_size": COUNT,
        "compression": NOTHING,
        "encryption": NOTHING,
        "data_format": Rule(
            "a list of names", lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v)
        ),
        "data_spec": TEXT,
        "item_loader": Rule('"TokensLoader"', lambda v: v == "TokensLoader"),
        "compression_level": Absent(NOTHING),
    },
}


def schema_problem(value, schema, where: str) -> str | None:
    """What is wrong with `value` against `schema` (a Rule; {key: schema}, every key required; [schema], a list
    of them; or (key schema, value schema), a mapping of any keys), in words; None when nothing is."""
    if isinstance(schema, Rule):
        return None if schema.test(value) else f"{where} should be {schema.words}, not {json.dumps(value)[:40]}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} should be a list, not {json.dumps(value)[:40]}"
        return next(filter(None, (schema_problem(v, schema[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if not isinstance(value, dict):
        return f"{where} should be a mapping, not {json.dumps(value)[:40]}"
    if isinstance(schema, tuple):
        items = ((schema_problem(k, schema[0], f"{where} key") or schema_problem(v, schema[1], f"{where}.{k}"))
                 for k, v in value.items())  # fmt: skip
        return next(filter(None, items), None)
    missing = [key for key in schema if key not in value and not isinstance(schema[key], Absent)]
    if missing:
        return f"{where}.{missing[0]} is missing"
    present = ((value[k], getattr(schema[k], "schema", schema[k]), f"{where}.{k}") for k in schema if k in value)
    return next(filter(None, (schema_problem(*field) for field in present)), None)


def damaged(path: str, what: str) -> DataError:
    return DataError(f"this prepared folder is damaged: {what}; re-run prepare (data.path {path})")


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
    if not is_int(manifest.get("version")) or manifest["version"] != FORMAT_VERSION:  # True == 1 in Python
        raise DataError(
            f"data.path {path!r} was prepared by another version of bdh-lightning (format {manifest.get('version')!r}; "
            f"this one reads format {FORMAT_VERSION}); prepare it again with this version"
        )
    problem = schema_problem(manifest, MANIFEST_SCHEMA, MANIFEST)
    if problem:
        raise damaged(path, problem)
    return manifest


def check_chunks(prepared: Prepared) -> None:
    """Each split's index against its schema and the manifest, and every chunk it names there, whole (local
    directories; object storage is checked by LitData)."""
    for split in SPLITS:
        if not prepared.has(split):
            continue
        folder = prepared.split_dir(split)
        try:
            with open(os.path.join(folder, "index.json"), "rb") as file:
                index = json.loads(file.read())
        except (OSError, ValueError):
            raise DataError(
                f"{folder}/index.json is missing or unreadable; copy the prepared directory again, or prepare it again"
            ) from None
        problem = schema_problem(index, INDEX_SCHEMA, f"{split}/index.json")
        if problem:
            raise damaged(prepared.path, problem)
        chunks, expected = index["chunks"], prepared.manifest["splits"][split]
        found = {"chunks": len(chunks), "windows": sum((c["dim"] or 0) // prepared.window for c in chunks)}
        for key, count in found.items():
            if count != expected[key]:
                raise damaged(prepared.path, f"{MANIFEST} counts {expected[key]} {key} in {split}, its index {count}")
        missing = [
            c["filename"]
            for c in chunks
            if not os.path.isfile(os.path.join(folder, c["filename"]))
            or os.path.getsize(os.path.join(folder, c["filename"])) != c["chunk_bytes"]
        ]
        if missing:
            raise DataError(
                f"{folder} is missing {len(missing)} of its {len(chunks)} chunks or has them cut short (e.g. "
                f"{missing[0]}); copy the prepared directory again, or prepare it again"
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
                f"the {split} split of {path} is empty ({manifest['splits'][split]['documents']} "
                "documents, "
                f"no window of {prepared.window} bytes); prepare it again with a larger data.val_fraction, smaller "
                "documents or more data"
            )
    if not is_url(local):
        check_chunks(prepared)
    return prepared
