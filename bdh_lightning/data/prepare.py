"""`prepare`: pack a corpus into LitData's format for streaming, each document (a file, or a line of a .jsonl) whole
in the split a stable hash of its id picks. The manifest is written last; until then the folder holds a marker, so
a killed run never loads as complete and a re-run with the same sources and settings resumes it (docs/data.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import format_bytes
from ..errors import DataError, ResourceError, UsageError, finite_float, positive_int
from ..files import remove, temporary_beside, write_atomically, write_failure
from .corpus import ByteCorpus, list_corpus
from .litdata import FORMAT, FORMAT_VERSION, INCOMPLETE, MANIFEST, SPLITS, is_prepared, is_url, require_litdata

UNIT_BYTES = 16 << 20  # most source bytes one work unit reads (and one item of a chunk holds)
CHUNK_BYTES = 64 << 20  # target size of a chunk file (LitData downloads and caches whole chunks)
SOURCES = "sources.tsv"
ERROR = ".bdh_prepare_error"


@dataclass
class PrepareData:
    """The corpus to prepare and how to split it: the names and meanings of fit's data.* settings.

    Args:
        path: The source: a file, a directory (recursively, in sorted order) or a glob; .jsonl files hold
            one JSON document per line.
        block_size: Context length T the prepared directory is made for (training windows are T + 1 bytes);
            train with the same data.block_size.
        val_fraction: Share of the documents (by a stable hash of their id) held out for validation.
        test_fraction: Share of the documents held out for `test` (0 = no test split).
        exclude: Globs of files and folders to leave out, matched against the path inside data.path and the name.
        include_hidden: Also read hidden files and folders (names starting with '.').
    """

    path: str
    block_size: int = 512
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    exclude: list[str] | None = None
    include_hidden: bool = False


def document_split(document_id: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a document: a stable hash of its id, as a number in [0, 1), against the fractions."""
    digest = hashlib.blake2b(document_id.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"


def is_jsonl(file: str) -> bool:
    return file.endswith(".jsonl")


def source_root(path: str) -> str:
    """The folder document ids are relative to: the directory itself, a file's folder, a glob's fixed prefix."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.isfile(expanded):
        return os.path.dirname(expanded) or "."
    return os.path.dirname(expanded.split("*")[0].split("?")[0].split("[")[0]) or "."


def jsonl_ranges(file: str, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about UNIT_BYTES covering `file`, each starting at a line start."""
    cuts = [0]
    with open(file, "rb") as f:
        while cuts[-1] + UNIT_BYTES < size:
            f.seek(cuts[-1] + UNIT_BYTES)
            f.readline()  # to the start of the next line
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, [*cuts[1:], size]))


def plan_units(files: list[str], sizes: list[int], root: str, val_fraction: float, test_fraction: float):
    """Work units per split and each source's split ('-' for .jsonl files, whose lines are split one by one).

    A unit is ("files", [(file, start, length), ...]) of at most UNIT_BYTES (small files grouped, large ones
    cut; all of one split) or ("jsonl", file, start, end, relative path): a line-aligned range of a .jsonl,
    read by every split, each keeping its own lines.
    """
    units = {split: [] for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    source_splits = []
    open_group = {split: ([], 0) for split in SPLITS}  # pieces and bytes of the unit being filled

    def close(split):
        pieces, _ = open_group[split]
        if pieces:
            units[split].append(("files", pieces))
        open_group[split] = ([], 0)

    for file, size in zip(files, sizes):
        size = int(size)
        relative = os.path.relpath(file, root)
        if is_jsonl(file):
            source_splits.append("-")
            for start, end in jsonl_ranges(file, size):
                for split in SPLITS:
                    units[split].append(("jsonl", file, start, end, relative))
            continue
        split = document_split(relative, val_fraction, test_fraction)
        source_splits.append(split)
        documents[split] += 1
        for start in range(0, size, UNIT_BYTES):
            length = min(UNIT_BYTES, size - start)
            pieces, filled = open_group[split]
            if filled + length > UNIT_BYTES:
                close(split)
                pieces, filled = open_group[split]
            pieces.append((file, start, length))
            open_group[split] = (pieces, filled + length)
    for split in SPLITS:
        close(split)
    return units, documents, source_splits


class Packer:
    """The function `litdata.optimize` runs on each work unit (by index): the unit's bytes of one split, as uint8.

    Counters shared with the parent process: bytes read (for the progress bar) and .jsonl documents kept.
    A bad .jsonl line is written to the error file (the first one wins) and ends that unit; the parent
    raises it as one line once LitData is done.
    """

    def __init__(self, units, split, val_fraction, test_fraction, text_key, error_file, bytes_read, documents):
        self.units, self.split, self.text_key, self.error_file = units, split, text_key, error_file
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.bytes_read, self.documents = bytes_read, documents

    def count(self, counter, n: int) -> None:
        with counter.get_lock():
            counter.value += n

    def __call__(self, index: int):
        unit = self.units[index]
        if unit[0] == "files":
            out = bytearray()
            for file, start, length in unit[1]:
                with open(file, "rb") as f:
                    f.seek(start)
                    piece = f.read(length)
                if len(piece) != length:
                    self.fail(
                        f"data file {file} changed while it was being prepared (it is shorter than listed); "
                        "prepare again"
                    )
                    return
                out += piece
                self.count(self.bytes_read, length)
            yield np.frombuffer(bytes(out), dtype=np.uint8)
            return
        _, file, start, end, relative = unit
        out, kept = bytearray(), 0
        with open(file, "rb") as f:
            f.seek(start)
            block = f.read(end - start)
        self.count(self.bytes_read, len(block))
        offset = start
        for line in io.BytesIO(block):
            here, offset = offset, offset + len(line)
            if (
                not line.strip()
                or document_split(f"{relative}:{here}", self.val_fraction, self.test_fraction) != self.split
            ):
                continue
            try:
                text = json.loads(line)[self.text_key]
            except (ValueError, TypeError, KeyError) as error:
                line_number = self.line_number(file, here)
                what = f"has no {self.text_key!r} field" if isinstance(error, KeyError) else "is not a JSON object"
                self.fail(f"{file}:{line_number} {what}; fix it, or choose the field with --text_key")
                return
            if not isinstance(text, str):
                self.fail(
                    f"{file}:{self.line_number(file, here)}: the {self.text_key!r} field is "
                    f"{type(text).__name__}, not text"
                )
                return
            out += text.encode("utf-8", "surrogatepass")
            kept += 1
        self.count(self.documents, kept)
        if out:
            yield np.frombuffer(bytes(out), dtype=np.uint8)

    @staticmethod
    def line_number(file: str, offset: int) -> int:
        with open(file, "rb") as f:
            return f.read(offset).count(b"\n") + 1

    def fail(self, message: str) -> None:
        try:
            with open(self.error_file, "x") as f:
                f.write(message)
        except FileExistsError:
            pass


def clear(output: str, splits=SPLITS) -> None:
    """Remove what `prepare` writes in `output` (never anything else)."""
    for split in splits:
        shutil.rmtree(os.path.join(output, split), ignore_errors=True)
    for name in (MANIFEST, SOURCES, ERROR):
        if os.path.exists(os.path.join(output, name)):
            os.remove(os.path.join(output, name))


def swap_in(built: str, output: str) -> None:
    """Replace prepare's own entries in `output` by those of the finished folder `built` (renames on one disk:
    no space needed), the manifest last so that `output` loads as complete only once every split is in."""
    os.replace(os.path.join(output, MANIFEST), os.path.join(built, ".old-" + MANIFEST))
    for name in (*SPLITS, SOURCES):
        old, new = os.path.join(output, name), os.path.join(built, name)
        if os.path.exists(old):
            os.replace(old, os.path.join(built, ".old-" + name))
        if os.path.exists(new):
            os.replace(new, old)
    os.replace(os.path.join(built, MANIFEST), os.path.join(output, MANIFEST))
    shutil.rmtree(built, ignore_errors=True)


def claim_output(output: str, plan: str, overwrite: bool) -> dict:
    """Make `output` ours to write; the splits an unfinished run with the same plan already finished."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file; give a new or empty directory")
    marker = os.path.join(output, INCOMPLETE)
    finished = {}
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = {}
        if state.get("plan") == plan and not overwrite:
            finished = state.get("finished", {})
            redo = [s for s in SPLITS if s not in finished]
            print(
                f"prepare: resuming the unfinished run in {output} (kept: {', '.join(finished) or 'nothing'})",
                file=sys.stderr,
            )
            clear(output, redo)
        else:
            print(
                f"prepare: {output} holds an unfinished run of other sources or settings; starting again",
                file=sys.stderr,
            )
            clear(output)
    elif os.path.exists(os.path.join(output, MANIFEST)):
        if not overwrite:
            raise UsageError(
                f"--output {output} is already a prepared directory; give another --output, or --overwrite to "
                "replace it"
            )
        clear(output)
    elif os.path.isdir(output) and os.listdir(output):
        raise UsageError(
            f"--output {output} exists and is not empty; give a new or empty directory (prepare deletes only "
            "its own output)"
        )
    os.makedirs(output, exist_ok=True)
    write_json(marker, {"plan": plan, "finished": finished})
    return finished


def write_json(path: str, value) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a part."""
    write_atomically(path, json.dumps(value, indent=1))


def split_stats(folder: str, window: int) -> dict:
    """Bytes, chunks and training windows of one LitData split written by optimize (none when it is absent)."""
    try:
        with open(os.path.join(folder, "index.json")) as f:
            chunks = json.load(f)["chunks"]
    except FileNotFoundError:
        return {"bytes": 0, "windows": 0, "chunks": 0}
    return {
        "bytes": sum(c["dim"] or 0 for c in chunks),
        "windows": sum((c["dim"] or 0) // window for c in chunks),
        "chunks": len(chunks),
    }


class Progress:
    """A progress bar of bytes read (with bytes/s and time left), fed from the workers' shared counter.

    A .jsonl is read once for each split (each keeps its own lines), so it counts for up to three times its size.
    On a terminal it redraws in place; in a log file it writes one line every LOG_EVERY seconds.
    """

    LOG_EVERY = 10.0

    def __init__(self, total: int, counter, enabled: bool):
        from tqdm import tqdm

        self.counter, self.done = counter, threading.Event()
        self.terminal = sys.stderr.isatty()
        shown = enabled and self.terminal
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not shown)
        self.total, self.enabled, self.started = total, enabled, time.monotonic()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def line(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.started
        # ncols=0: no bar, "prepare:  48% 115k/242k [00:01<00:01, 95.8kB/s]" (done, elapsed<left, rate)
        done = self.counter.value
        return tqdm.format_meter(done, self.total, elapsed, unit="B", unit_scale=True, prefix="prepare", ncols=0)

    def run(self) -> None:
        last = time.monotonic()
        while not self.done.wait(0.5):
            if self.terminal:
                self.bar.n = self.counter.value
                self.bar.refresh()
            elif self.enabled and time.monotonic() - last >= self.LOG_EVERY:
                last = time.monotonic()
                print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.bar.n = self.counter.value
        self.bar.close()
        if self.enabled and not self.terminal:
            print(self.line(), file=sys.stderr, flush=True)


def check_request(data: PrepareData, output: str, num_workers: int) -> str:
    """The settings of a `prepare` run, checked before anything is read or written; the output folder's full path."""
    positive_int("data.block_size", data.block_size, DataError)
    finite_float("data.val_fraction", data.val_fraction, 0.0, 1.0, low_open=True, high_open=True, error=DataError)
    finite_float("data.test_fraction", data.test_fraction, 0.0, 1.0, high_open=True, error=DataError)
    if data.val_fraction + data.test_fraction >= 1:
        raise DataError(
            "data.val_fraction + data.test_fraction must be below 1 (training needs documents too), got "
            f"{data.val_fraction} + {data.test_fraction}"
        )
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UsageError(f"--num_workers must be a non-negative integer (0 = one per core), got {num_workers!r}")
    if is_prepared(data.path):
        raise DataError(f"data.path {data.path!r} is already a prepared directory; give the source files")
    if is_url(output):
        raise UsageError(
            f"--output {output}: prepare writes to a local directory; copy it to object storage afterwards "
            f"(e.g. aws s3 sync DIR s3://bucket/DIR) and train with --data.path s3://bucket/DIR"
        )
    output = os.path.abspath(os.path.expanduser(output))
    root = os.path.abspath(source_root(data.path))
    if os.path.commonpath([output, root]) == root and os.path.isdir(os.path.expanduser(data.path)):
        raise UsageError(
            f"--output {output} is inside data.path {data.path!r}; write it somewhere else (a re-run would read "
            "it as source)"
        )
    return output


@dataclass
class Plan:
    """What a `prepare` run will write: the sources, their work units per split, and a digest of both."""

    listing: object  # corpus.Listing
    units: dict
    documents: dict  # split -> whole-file documents (a .jsonl's lines are counted as they are packed)
    sources: str  # sources.tsv: bytes, split and path of each source file
    sources_sha256: str
    digest: str  # of the sources and the settings: an unfinished run with the same digest is resumed


def plan_run(data: PrepareData, text_key: str) -> Plan:
    """List and open the sources (naming unreadable files now, before any work) and plan the work units."""
    root = os.path.abspath(source_root(data.path))
    listing = list_corpus(data.path, data.exclude, data.include_hidden)
    ByteCorpus(listing.files, listing.sizes)  # one open per file
    units, documents, source_splits = plan_units(
        listing.files, listing.sizes, root, data.val_fraction, data.test_fraction
    )
    sources = "".join(
        f"{size}\t{split}\t{os.path.relpath(file, root)}\n"
        for file, size, split in zip(listing.files, listing.sizes, source_splits)
    )
    sources_sha256 = hashlib.sha256(sources.encode("utf-8", "surrogateescape")).hexdigest()
    settings = {"block_size": data.block_size, "val_fraction": data.val_fraction,
                "test_fraction": data.test_fraction, "text_key": text_key}  # fmt: skip
    digest = hashlib.sha256((sources_sha256 + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    has_jsonl = any(is_jsonl(f) for f in listing.files)
    for split, fraction in (("train", 1.0), ("validation", data.val_fraction), ("test", data.test_fraction)):
        if not has_jsonl and fraction and not documents[split]:
            setting = "" if split == "train" else f"data.{'val' if split == 'validation' else 'test'}_fraction"
            raise DataError(
                f"the {split} split gets none of the {len(listing.files)} documents (each file goes whole to "
                "one split, by a "
                f"hash of its path); give more, smaller files{' or raise ' + setting if setting else ''}"
            )
    return Plan(listing, units, documents, sources, sources_sha256, digest)


def pack(plan: Plan, data: PrepareData, output: str, finished: dict, text_key: str, workers: int, progress: bool):
    """Write each split not yet finished with `litdata.optimize`; every split's stats once all are done."""
    from litdata import TokensLoader, optimize

    error_file, window = os.path.join(output, ERROR), data.block_size + 1
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    bytes_read = context.Value("q", 0)
    todo = [split for split in SPLITS if split not in finished and plan.units[split]]
    planned = sum(sum(p[2] for p in u[1]) if u[0] == "files" else u[3] - u[2] for s in todo for u in plan.units[s])
    check_free_space(output, planned)  # a .jsonl's text is at most its size
    bar = Progress(planned, bytes_read, progress)
    ctrl_c = signal.getsignal(signal.SIGINT)  # optimize installs its own and leaves it behind
    try:
        for split in todo:
            kept = context.Value("q", 0)
            packer = Packer(plan.units[split], split, data.val_fraction, data.test_fraction, text_key, error_file,
                            bytes_read, kept)  # fmt: skip
            try:
                optimize(
                    fn=packer, inputs=list(range(len(plan.units[split]))), output_dir=os.path.join(output, split),
                    chunk_size=max(1, CHUNK_BYTES // window) * window, item_loader=TokensLoader(),
                    num_workers=min(workers, len(plan.units[split])), keep_data_ordered=True, reorder_files=False,
                    verbose=False, start_method=context.get_start_method(),
                )  # fmt: skip
            except RuntimeError as error:
                raise worker_failure(error, split) from None
            if os.path.exists(error_file):
                with open(error_file) as f:
                    raise DataError(f.read().strip())
            stats = split_stats(os.path.join(output, split), window)
            finished[split] = {**stats, "documents": plan.documents[split] + kept.value}
            write_json(os.path.join(output, INCOMPLETE), {"plan": plan.digest, "finished": finished})
    finally:
        bar.close()
        signal.signal(signal.SIGINT, ctrl_c)
    empty = {"bytes": 0, "windows": 0, "chunks": 0, "documents": 0}
    splits = {split: finished.get(split, empty) for split in SPLITS}
    for split in ("train", "validation"):
        if not splits[split]["windows"]:
            raise DataError(
                f"the {split} split has {splits[split]['documents']} documents and no window of {window} bytes; "
                "raise data.val_fraction, lower data.block_size or give more data"
            )
    return splits


def worker_failure(error: RuntimeError, split: str) -> DataError:
    """LitData's report of a packing worker's exception (its traceback in the message) as one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() not in ("", ".")]
    return DataError(
        f"packing the {split} split failed ({lines[-1] if lines else error}); fix it and run prepare again"
    )


def check_free_space(output: str, needed: int) -> None:
    """Refuse a run whose chunks cannot fit: LitData waits forever for a chunk its writer failed to write."""
    free = shutil.disk_usage(output).free
    if needed > free:
        raise ResourceError(
            f"prepare needs about {format_bytes(needed)} in {output} but its disk has {format_bytes(free)} free; "
            "free some space or choose another --output"
        )


def manifest_of(data: PrepareData, plan: Plan, text_key: str, splits: dict, litdata_version: str) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "block_size": data.block_size,
        "source": {
            "path": data.path,
            "exclude": data.exclude or [],
            "include_hidden": data.include_hidden,
            "text_key": text_key,
        },  # fmt: skip
        "val_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "sources": {
            "file": SOURCES,
            "count": len(plan.listing.files),
            "bytes": int(plan.listing.sizes.sum()),
            "sha256": plan.sources_sha256,
        },  # fmt: skip
        "left_out": dict(plan.listing.left_out),
        "splits": splits,
        "litdata": litdata_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def prepare_command(
    data: PrepareData,
    output: str,
    text_key: str = "text",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Pack a corpus into LitData's optimized format for streaming: split by document, any number of files.

    Args:
        data: The source corpus and its splits (see `--data.help`); train on the result with
            `fit --data.path OUTPUT --data.block_size` the same block size.
        output: The directory to write (new or empty; an unfinished one of the same run is resumed).
        text_key: The field holding the text in each line of a .jsonl file.
        num_workers: Worker processes packing in parallel (0 = one per CPU core).
        overwrite: Replace an existing prepared directory at OUTPUT.
        progress: Show a progress bar (bytes read, bytes/s, time left) on stderr.

    Returns:
        0 when OUTPUT is complete.
    """
    litdata = require_litdata("prepare")
    output = check_request(data, output, num_workers)
    started = time.monotonic()
    plan = plan_run(data, text_key)
    # --overwrite of a complete prepared folder builds the new one beside it, so a failure leaves the old one whole
    replacing = overwrite and os.path.exists(os.path.join(output, MANIFEST))
    target = str(temporary_beside(Path(output))) if replacing else output
    created = not os.path.exists(target)
    try:
        finished = claim_output(target, plan.digest, overwrite)
        write_atomically(os.path.join(target, SOURCES), plan.sources.encode("utf-8", "surrogateescape"))
        splits = pack(plan, data, target, finished, text_key, num_workers or os.cpu_count() or 1, progress)
        write_json(os.path.join(target, MANIFEST), manifest_of(data, plan, text_key, splits, litdata.__version__))
        os.remove(os.path.join(target, INCOMPLETE))  # from here on the directory loads as complete
        if replacing:
            swap_in(target, output)
    except (OSError, ResourceError) as error:  # a full disk, an unwritable folder
        clear(target)  # nothing half-written stays: what prepare wrote goes, the folder too if prepare made it
        remove(Path(target, INCOMPLETE))
        if created:
            remove(Path(target))
        if isinstance(error, ResourceError):
            raise
        kept = f"{output} is as it was" if replacing else f"nothing was left in {output}"
        raise write_failure(error.filename or output, error, kept) from None
    seconds = time.monotonic() - started
    parts = ", ".join(f"{s} {format_bytes(splits[s]['bytes'])} ({splits[s]['documents']:,} documents)"
                      for s in SPLITS if splits[s]["documents"])  # fmt: skip
    rate = format_bytes(int(plan.listing.sizes.sum() / max(seconds, 1e-9)))
    print(
        f"prepared {output}: {parts} in {seconds:.1f} s ({rate}/s of source); "
        f"train with --data.path {output} --data.block_size {data.block_size}",
        file=sys.stderr,
    )
    return 0
