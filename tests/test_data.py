"""ByteDataModule: windows, splits, seeding per rank and step, resuming, inputs, bad inputs, download."""

import gc
import glob
import hashlib
import http.server
import os
import pickle
import re
import signal
import socket
import stat
import struct
import sys
import threading
import urllib.error
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from tqdm import tqdm

from bdh_lightning.data import ByteDataModule
from bdh_lightning.data import corpus as corpus_module
from bdh_lightning.data import module as data_module
from bdh_lightning.errors import DataError

T, B = 16, 4


def corpus_files(path: str, exclude: list[str] | None = None, include_hidden: bool = False) -> list[str]:
    """The files behind `path` (a file, a directory searched recursively, or a glob), in sorted order."""
    return list(corpus_module.list_corpus(path, exclude, include_hidden).files)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture
def corpus(tmp_path):
    """A file of random bytes: every window of T + 1 bytes occurs once, so a window reveals its offset."""
    raw = random_bytes(20_000)
    path = tmp_path / "corpus.bin"
    path.write_bytes(raw)
    return path, raw


def offset_of(row: torch.Tensor, raw: bytes) -> int:
    offset = raw.find(bytes(row.to(torch.uint8).tolist()))
    assert offset >= 0, "window not found in the corpus"
    return offset


def fake_trainer(rank=0, world_size=1, global_step=0, accumulate_grad_batches=1):
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        global_step=global_step,
        accumulate_grad_batches=accumulate_grad_batches,
    )


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_batches_have_shape_dtype_and_are_shifted_windows_of_the_train_split(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_fraction=0.25)
    assert dm.train_size == 15_000
    for x, y in take(dm.train_dataloader(), 20):
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        for xi, yi in zip(x, y):
            offset = offset_of(xi, raw)
            assert offset + T + 1 <= dm.train_size  # the target byte too stays in the training split
            assert bytes(yi.tolist()) == raw[offset + 1 : offset + T + 1]


def test_train_offsets_cover_exactly_the_windows_inside_the_train_split(tmp_path):
    raw = random_bytes(200)
    (tmp_path / "small.bin").write_bytes(raw)
    dm = ByteDataModule(str(tmp_path / "small.bin"), block_size=T, batch_size=8, val_fraction=0.5)
    offsets = {offset_of(row, raw) for x, _ in take(dm.train_dataloader(), 200) for row in x}
    assert offsets == set(range(100 - T))  # first window [0, T], last [100 - T - 1, 99]


def test_val_windows_are_evenly_spaced_in_the_val_split_and_the_same_every_evaluation(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_fraction=0.25, val_windows=10)
    offsets = dm.val_offsets
    assert len(offsets) == 10
    assert offsets[0] == dm.train_size and offsets[-1] == len(raw) - T - 1
    assert np.abs(np.diff(offsets) - np.diff(offsets).mean()).max() <= 1
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [len(x) for x, _ in first] == [4, 4, 2]
    assert all(torch.equal(a, b) for batch1, batch2 in zip(first, second) for a, b in zip(batch1, batch2))
    x = torch.cat([x for x, _ in first])
    y = torch.cat([y for _, y in first])
    for offset, xi, yi in zip(offsets, x, y):
        assert bytes(xi.tolist()) == raw[offset : offset + T]
        assert bytes(yi.tolist()) == raw[offset + 1 : offset + T + 1]
    with pytest.raises(DataError, match="no test split"):  # test never scores validation windows
        dm.test_dataloader()


def test_val_windows_are_split_across_ranks_without_overlap(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_windows=11)
    seen = []
    for rank in range(3):
        dm.trainer = fake_trainer(rank=rank, world_size=3)
        seen.append([offset_of(row, raw) for x, _ in dm.val_dataloader() for row in x])
    assert sorted(sum(seen, [])) == dm.val_offsets.tolist()
    assert [len(s) for s in seen] == [4, 4, 3]


def test_too_few_val_windows_for_the_devices_is_a_data_error(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B, val_windows=2)
    dm.trainer = fake_trainer(rank=0, world_size=4)
    with pytest.raises(DataError, match="val_windows"):
        dm.val_dataloader()


def test_same_seed_gives_same_batches_and_another_seed_other_batches(corpus):
    path = str(corpus[0])
    a = take(ByteDataModule(path, block_size=T, batch_size=B, seed=1).train_dataloader(), 5)
    b = take(ByteDataModule(path, block_size=T, batch_size=B, seed=1).train_dataloader(), 5)
    c = take(ByteDataModule(path, block_size=T, batch_size=B, seed=2).train_dataloader(), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not any(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # fresh offsets every batch


def test_ranks_draw_different_windows(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B)
    per_rank = []
    for rank in range(2):
        dm.trainer = fake_trainer(rank=rank, world_size=2)
        per_rank.append(take(dm.train_dataloader(), 5))
    assert not any(torch.equal(p[0], q[0]) for p, q in zip(*per_rank))


def test_train_stream_starts_at_batches_already_consumed(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B)
    fresh = take(dm.train_dataloader(), 10)
    dm.trainer = fake_trainer(global_step=3, accumulate_grad_batches=2)
    resumed = take(dm.train_dataloader(), 4)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(fresh[6:], resumed))


def test_workers_yield_the_same_stream_as_the_main_process(corpus):
    path = str(corpus[0])
    main = ByteDataModule(path, block_size=T, batch_size=B, val_windows=9)
    workers = ByteDataModule(path, block_size=T, batch_size=B, val_windows=9, num_workers=2)
    for a, b in zip(take(main.train_dataloader(), 5), take(workers.train_dataloader(), 5)):
        assert torch.equal(a[0], b[0])
    val_main = torch.cat([x for x, _ in main.val_dataloader()])
    val_workers = torch.cat([x for x, _ in workers.val_dataloader()])
    assert sorted(map(tuple, val_main.tolist())) == sorted(map(tuple, val_workers.tolist()))


class RecordBatches(L.LightningModule):
    """A tiny model that remembers the inputs of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(T, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen.append(x.clone())
        return self.linear(x.float()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(path, tmp_path, max_steps, ckpt_path=None):
    model = RecordBatches()
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, ByteDataModule(str(path), block_size=T, batch_size=B), ckpt_path=ckpt_path)
    return trainer, model.seen


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_run(corpus, tmp_path):
    _, uninterrupted = fit(corpus[0], tmp_path / "a", max_steps=5)
    trainer, first = fit(corpus[0], tmp_path / "b", max_steps=2)
    checkpoint = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(checkpoint)
    _, rest = fit(corpus[0], tmp_path / "c", max_steps=5, ckpt_path=checkpoint)
    assert len(uninterrupted) == 10 and len(first) == 4 and len(rest) == 6
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, first + rest))


def test_directory_input_concatenates_files_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    parts = {"b/2.txt": random_bytes(300, 1), "c.txt": random_bytes(100, 4), "a.txt": random_bytes(200, 2),
             "b/1.txt": random_bytes(250, 3), "b/0.txt": b""}  # fmt: skip
    for name, raw in parts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)
    (root / "link").symlink_to(root / "missing")  # a dangling link is not a file
    expected = parts["a.txt"] + parts["b/1.txt"] + parts["b/2.txt"] + parts["c.txt"]
    dm = ByteDataModule(str(root), block_size=T, batch_size=B)
    assert len(dm.corpus) == len(expected)
    assert dm.corpus.read(0, len(expected)).tobytes() == expected
    assert dm.corpus.read(190, 300).tobytes() == expected[190:490]  # spans all three files
    for x, y in take(dm.train_dataloader(), 10):
        for xi, yi in zip(x, y):
            offset = offset_of(xi, expected)
            assert bytes(yi.tolist()) == expected[offset + 1 : offset + T + 1]


def test_glob_input_takes_matching_files_in_sorted_order(tmp_path):
    parts = {"x2.bin": random_bytes(300, 1), "x1.bin": random_bytes(300, 2), "y.bin": random_bytes(300, 3)}
    for name, raw in parts.items():
        (tmp_path / name).write_bytes(raw)
    dm = ByteDataModule(str(tmp_path / "x*.bin"), block_size=T, batch_size=B)
    assert dm.corpus.read(0, 600).tobytes() == parts["x1.bin"] + parts["x2.bin"]


def assert_one_line_error(match, *args, **kwargs):
    with pytest.raises(DataError, match=match) as error:
        ByteDataModule(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_missing_path(tmp_path):
    assert_one_line_error("does not exist", str(tmp_path / "nothing.txt"))


def test_empty_directory_and_glob_matching_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error("no files", str(tmp_path / "empty"))
    assert_one_line_error("matches no files", str(tmp_path / "*.txt"))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_bytes(random_bytes(1000))
    path.chmod(0)
    if os.geteuid() == 0:
        # Root reads any file, so refuse opens as the permission bits would for anyone else.
        def guarded_open(file, *args, **kwargs):
            if not os.stat(file).st_mode & 0o444:
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(corpus_module, "open", guarded_open, raising=False)
    message = assert_one_line_error("cannot read", str(path))
    assert message == f"cannot read data file {path}: Permission denied; fix its permissions or leave it out"


def test_corpus_too_short_for_a_window_in_either_split(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(random_bytes(100))
    message = assert_one_line_error("block_size", str(path), block_size=T, val_fraction=0.95)  # 5 training bytes
    assert "100 bytes" in message and "block_size + 1 = 17" in message and "val_fraction" in message
    assert_one_line_error("10 for validation", str(path), block_size=T, val_fraction=0.1)
    assert_one_line_error("block_size", str(path), block_size=100)
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_line_error("0 bytes", str(tmp_path / "empty.txt"), block_size=T)


@pytest.mark.parametrize(
    "setting",
    [{"block_size": 0}, {"batch_size": -1}, {"val_windows": 0}, {"block_size": 2.5}, {"seed": -1}, {"num_workers": -1},
     {"val_fraction": 0.0}, {"val_fraction": 1.0}, {"val_fraction": 1.5}],
)  # fmt: skip
def test_bad_settings(corpus, setting):
    (name,) = setting
    assert_one_line_error(f"data.{name}", str(corpus[0]), **setting)


# Download: only ever against a server on 127.0.0.1 serving bytes made here.


@pytest.fixture
def server():
    """A local HTTP server: set `served.body`; `served.requests` counts the requests. `served.on_request` (if set)
    runs as a request arrives; `served.length = False` leaves out Content-Length (the body ends when the
    connection closes, HTTP/1.0); `served.reset = True` resets the connection after the first kilobyte."""
    served = SimpleNamespace(body=b"", requests=0, on_request=None, length=True, reset=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.requests += 1
            if served.on_request:
                served.on_request()
            if self.path != "/input.txt":
                self.send_error(404)
                return
            self.send_response(200)
            if served.length:
                self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            if served.reset:  # an RST (linger 0) mid-body: the reader gets ECONNRESET
                self.wfile.write(served.body[:1000])
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            self.wfile.write(served.body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}/input.txt"
    yield served
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder two levels below folders that do not exist yet: the download makes them all.

    The download's progress bar gets a lock of this process only: tqdm's default lock is a semaphore shared
    with every process forked after the first bar, and one that dies holding it (a broken bar in one of
    mutmut's forked runs) would leave the download hanging in all the others."""
    monkeypatch.setattr(tqdm, "_lock", threading.RLock(), raising=False)
    monkeypatch.setenv("BDH_LIGHTNING_CACHE", str(tmp_path / "home" / "cache"))
    return tmp_path / "home" / "cache"


def test_download_checks_the_hash_caches_and_is_used(server, cache, monkeypatch):
    server.body = random_bytes(5000, 7)
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(server.body).hexdigest())
    dm = ByteDataModule(block_size=T, batch_size=B)
    assert server.requests == 0  # nothing is downloaded before prepare_data
    dm.prepare_data()
    assert (cache / "tinyshakespeare.txt").read_bytes() == server.body
    assert os.listdir(cache) == ["tinyshakespeare.txt"]  # no partial file left behind
    dm.prepare_data()
    assert server.requests == 1  # cached: downloaded once
    dm.setup("fit")
    x, _ = take(dm.train_dataloader(), 1)[0]
    assert offset_of(x[0], server.body) + T + 1 <= dm.train_size


def test_download_with_a_wrong_hash_is_refused(server, cache, monkeypatch):
    server.body = random_bytes(5000, 8)
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    with pytest.raises(DataError, match="sha256") as error:
        ByteDataModule(block_size=T).prepare_data()
    assert str(error.value) == (
        f"the file downloaded from {server.url} has sha256 {hashlib.sha256(server.body).hexdigest()}, expected "
        f"{corpus_module.TINYSHAKESPEARE_SHA256}; check BDH_LIGHTNING_TINYSHAKESPEARE_URL or use a local copy with --data.path"
    )
    assert os.listdir(cache) == []


def test_download_http_error_says_how_to_use_a_local_file(server, cache, monkeypatch):
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url.replace("input.txt", "gone.txt"))
    with pytest.raises(DataError, match="could not download.*404.*--data.path"):
        ByteDataModule(block_size=T).prepare_data()
    assert os.listdir(cache) == []


def test_download_from_an_unreachable_server_says_how_to_use_a_local_file(cache, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", f"http://127.0.0.1:{port}/input.txt")
    dm = ByteDataModule(block_size=T)
    with pytest.raises(DataError, match="could not download.*--data.path data/tinyshakespeare.txt") as error:
        dm.setup("fit")  # setup downloads too when prepare_data was not called
    assert "\n" not in str(error.value)
    assert os.listdir(cache) == []


# Corpora of many files: each file once, what is left out said in one line, bounded descriptors, files that change.


def write_tree(root, parts: dict):
    for name, raw in parts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)


def test_a_linked_file_is_read_once_and_never_lands_in_validation_too(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(3000, 1), "b.txt": random_bytes(3000, 2)})
    (root / "z-link.txt").symlink_to(root / "a.txt")  # sorts last: today's split would put it in validation
    os.link(root / "b.txt", root / "y-hard.txt")
    dm = ByteDataModule(str(root), block_size=T, batch_size=B, val_fraction=0.3)
    assert list(dm.listing.files) == [str(root / "a.txt"), str(root / "b.txt")]
    assert len(dm.corpus) == 6000
    assert "2 already read through another link" in dm.describe()
    val = b"".join(bytes(x[i].tolist()) for x, _ in dm.val_dataloader() for i in range(len(x)))
    assert val and random_bytes(3000, 1)[:T] not in val


def test_hidden_entries_are_left_out_unless_asked_and_the_description_says_so(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"text.txt": random_bytes(2000, 1), ".git/objects/pack": random_bytes(5000, 2),
                      ".cache/x": random_bytes(700, 3), "sub/.hidden.txt": random_bytes(300, 4)})  # fmt: skip
    dm = ByteDataModule(str(root), block_size=T, batch_size=B)
    assert list(dm.listing.files) == [str(root / "text.txt")]
    line = dm.describe()
    assert "\n" not in line and "3 hidden" in line and "data.include_hidden" in line
    everything = ByteDataModule(str(root), block_size=T, batch_size=B, include_hidden=True)
    assert len(everything.corpus) == 2000 + 5000 + 700 + 300
    assert sorted(everything.listing.files) == sorted(str(p) for p in root.rglob("*") if p.is_file())


def test_description_counts_files_bytes_splits_and_what_was_left_out(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(6000, 1), "b/c.txt": random_bytes(4000, 2), "empty.txt": b"",
                      "notes.log": random_bytes(100, 3), "drafts/d.txt": random_bytes(100, 4)})  # fmt: skip
    (root / "dangling").symlink_to(root / "gone.txt")
    os.mkfifo(root / "pipe")
    settings = {"val_fraction": 0.1, "test_fraction": 0.1, "exclude": ["*.log", "drafts"]}
    dm = ByteDataModule(str(root), block_size=T, batch_size=B, **settings)
    line = dm.describe()
    assert line == (
        f"corpus {root}: 2 files, 9.77 KiB (train 7.81 KiB, validation 1000 B, test 1000 B); left out: 1 broken link, 1 empty, "
        "2 excluded by data.exclude, 1 not regular files (FIFO)"
    )
    assert len(dm.corpus) == 10_000


def test_exclude_globs_match_paths_inside_the_corpus_and_names(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"keep/a.txt": random_bytes(500, 1), "keep/b.log": random_bytes(500, 2),
                      "skip/c.txt": random_bytes(500, 3), "d.txt": random_bytes(500, 4)})  # fmt: skip
    dm = ByteDataModule(str(root), block_size=T, batch_size=B, exclude=["*.log", "skip/*"])
    assert list(dm.listing.files) == [str(root / "d.txt"), str(root / "keep/a.txt")]
    # Folders are pruned whole: 3 entries excluded at the top.
    assert_one_line_error("no files to read.*3 excluded by data.exclude", str(root), exclude=["*"])
    assert_one_line_error("data.exclude must be a list", str(root), exclude="*.log")


def test_a_fifo_or_special_data_path_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert "is a FIFO (named pipe), not a file" in assert_one_line_error("FIFO", str(tmp_path / "pipe"))
    (tmp_path / "link").symlink_to(tmp_path / "nowhere.txt")
    assert_one_line_error("is a broken symbolic link", str(tmp_path / "link"))


def test_an_unreadable_subdirectory_is_named(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(3000, 1), "locked/b.txt": random_bytes(3000, 2)})
    (root / "locked").chmod(0)
    real_scandir = os.scandir

    def scandir(path):
        if os.geteuid() == 0 and not os.stat(path).st_mode & 0o444:  # root lists anything: refuse as the bits say
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(corpus_module.os, "scandir", scandir)
    try:
        message = assert_one_line_error("cannot list directory", str(root))
    finally:
        (root / "locked").chmod(0o755)
    assert message == (
        f"cannot list directory {root / 'locked'}: Permission denied; fix its permissions, or leave it out with "
        "data.exclude"
    )


def test_a_file_that_shrinks_during_training_is_one_data_error_naming_it(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(random_bytes(20_000))
    dm = ByteDataModule(str(path), block_size=T, batch_size=B)
    batches = iter(dm.train_dataloader())
    next(batches)
    os.truncate(path, 1000)  # memory-mapped, this was SIGBUS
    with pytest.raises(DataError, match="changed during the run") as error:
        for _ in range(50):
            next(batches)
    assert str(error.value) == (
        f"data file {path} changed during the run: it had 20000 bytes at the start, 1000 bytes now; restore it "
        "(or start again: the run's windows were drawn from the old bytes)"
    )


def test_many_files_hold_a_bounded_number_of_descriptors(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "MAX_OPEN_FILES", 8)
    root = tmp_path / "many"
    parts = {f"{i:04d}.txt": random_bytes(40, i) for i in range(600)}
    write_tree(root, parts)
    expected = b"".join(parts[name] for name in sorted(parts))
    before = len(os.listdir("/proc/self/fd"))
    dm = ByteDataModule(str(root), block_size=T, batch_size=64)
    for x, y in take(dm.train_dataloader(), 20):
        for row in x[:8]:
            offset = offset_of(row, expected)
            assert bytes(row.tolist()) == expected[offset : offset + T]
    assert dm.corpus.read(0, len(expected)).tobytes() == expected
    assert len(os.listdir("/proc/self/fd")) - before <= 8


# The test split: bytes that training, validation and checkpoint selection never see.


def test_test_fraction_holds_the_end_of_the_corpus_out_of_training_and_validation(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_fraction=0.2, test_fraction=0.1, val_windows=10)
    assert (dm.train_size, dm.val_end) == (14_000, 18_000)
    assert dm.split_sizes() == {"train": 14_000, "validation": 4_000, "test": 2_000}
    train = {offset_of(row, raw) for x, _ in take(dm.train_dataloader(), 100) for row in x}
    assert max(train) + T + 1 <= 14_000
    val = [offset_of(row, raw) for x, _ in dm.val_dataloader() for row in x]
    assert min(val) == 14_000 and max(val) + T + 1 == 18_000
    test = [offset_of(row, raw) for x, _ in dm.test_dataloader() for row in x]
    assert min(test) == 18_000 and max(test) + T + 1 == 20_000 and len(test) == 10


def test_test_path_is_a_corpus_of_its_own_that_may_not_share_files_with_training(corpus, tmp_path):
    path, raw = corpus
    held_out = random_bytes(3000, 9)
    (tmp_path / "test.bin").write_bytes(held_out)
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, test_path=str(tmp_path / "test.bin"))
    assert dm.train_size == 18_000 and dm.val_end == 20_000  # validation as without a test split
    for x, y in dm.test_dataloader():
        for xi in x:
            assert offset_of(xi, held_out) >= 0
    assert "test 2.93 KiB from" in dm.describe()
    os.link(path, tmp_path / "same.bin")
    message = assert_one_line_error("shares 1 file", str(path), block_size=T, test_path=str(tmp_path / "same.bin"))
    assert message == (
        f"data.test_path {str(tmp_path / 'same.bin')!r} shares 1 file(s) with data.path (e.g. {tmp_path / 'same.bin'}); "
        "the test split must hold bytes that training never sees: give it other files"
    )
    assert_one_line_error("not both", str(path), test_path=str(tmp_path / "test.bin"), test_fraction=0.1)


def test_without_a_test_split_test_refuses_in_one_line(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B)
    for call in (lambda: dm.setup("test"), dm.test_dataloader):
        with pytest.raises(DataError, match="no test split.*data.test_fraction.*data.test_path") as error:
            call()
        assert "\n" not in str(error.value)
    dm.setup("fit")  # the other stages need none


@pytest.mark.parametrize(
    "setting, match",
    [({"test_fraction": -0.1}, "data.test_fraction"), ({"test_fraction": 1.0}, "data.test_fraction"),
     ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
     ({"test_fraction": 0.0001}, "17998 for training, 2000 for validation and 2 for test")],
)  # fmt: skip
def test_bad_test_split_settings(corpus, setting, match):
    assert_one_line_error(match, str(corpus[0]), block_size=T, **setting)


def test_a_checkpoint_whose_run_saw_the_test_bytes_is_refused_for_test(corpus, tmp_path):
    trainer, _ = fit(corpus[0], tmp_path / "a", max_steps=1)
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)["ByteDataModule"]
    assert state["splits"] == {"kind": "files", "bytes": 20_000, "train": [0, 18_000], "validation": [18_000, 20_000],
                               "test": None, "test_path": None}  # fmt: skip
    assert state["train_batches"] == 2
    late = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B, test_fraction=0.05)
    with pytest.raises(DataError, match="overlaps bytes the checkpoint's run trained or validated on"):
        late.load_state_dict(state)
    held_out = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B, val_fraction=0.05, test_fraction=0.1)
    trainer, _ = fit(corpus[0], tmp_path / "b", max_steps=1)
    held_out.load_state_dict({**state, "splits": held_out.split_ranges()})  # the same splits: accepted


# Exact values: every message word for word, every count, every byte range (what a mutation run asks of the tests).


def test_bad_settings_say_what_is_wrong_word_for_word(corpus):
    path = str(corpus[0])
    cases = [
        ({"block_size": 0}, "data.block_size must be a positive integer, got 0"),
        ({"block_size": 2.5}, "data.block_size must be a positive integer, got 2.5"),
        ({"batch_size": -1}, "data.batch_size must be a positive integer, got -1"),
        ({"val_windows": True}, "data.val_windows must be a positive integer, got True"),
        ({"seed": -1}, "data.seed must be a non-negative integer, got -1"),
        ({"num_workers": 1.0}, "data.num_workers must be a non-negative integer, got 1.0"),
        ({"val_fraction": 0.0}, "data.val_fraction must be between 0 and 1 (exclusive), got 0.0"),
        ({"val_fraction": 1}, "data.val_fraction must be between 0 and 1 (exclusive), got 1"),
        ({"val_fraction": True}, "data.val_fraction must be between 0 and 1 (exclusive), got True"),
        ({"val_fraction": "0.1"}, "data.val_fraction must be between 0 and 1 (exclusive), got '0.1'"),
        ({"test_fraction": -0.1}, "data.test_fraction must be in [0, 1), got -0.1"),
        ({"test_fraction": 1.0}, "data.test_fraction must be in [0, 1), got 1.0"),
        ({"test_fraction": float("nan")}, "data.test_fraction must be a finite number, got nan"),
        (
            {"val_fraction": 0.6, "test_fraction": 0.4},
            "data.val_fraction + data.test_fraction must be below 1 (training needs bytes too), got 0.6 + 0.4",
        ),
        (
            {"test_fraction": 0.1, "test_path": path},
            "set data.test_fraction or data.test_path, not both (the test split is one or the other)",
        ),
        ({"exclude": "*.log"}, "data.exclude must be a list of globs, e.g. ['*.log'], got '*.log'"),
        ({"exclude": ["*.log", 3]}, "data.exclude must be a list of globs, e.g. ['*.log'], got ['*.log', 3]"),
        ({"sampling": "random"}, "data.sampling must be windows or streams, got 'random'"),
    ]
    for setting, message in cases:
        with pytest.raises(DataError) as error:
            ByteDataModule(path, **{"block_size": T, "batch_size": B, **setting})
        assert str(error.value) == message, setting


def test_settings_at_their_limits_are_accepted(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=1, batch_size=1, val_windows=1, seed=0, num_workers=0,
                        val_fraction=0.5, test_fraction=0.0, exclude=("*.log",))  # fmt: skip
    assert (dm.block_size, dm.batch_size, dm.val_windows, dm.seed, dm.num_workers) == (1, 1, 1, 0, 0)
    assert (dm.val_fraction, dm.test_fraction, dm.exclude, dm.include_hidden) == (0.5, 0.0, ["*.log"], False)
    assert (dm.test_path, dm.sampling, dm.stream, dm.restored) == (None, "windows", None, None)
    assert isinstance(dm.test_fraction, float)
    assert ByteDataModule(str(corpus[0]), block_size=T, val_fraction=0.25, test_fraction=0.125).split_sizes() == {
        "train": 12_500, "validation": 5_000, "test": 2_500}  # fmt: skip


def test_a_split_of_exactly_one_window_is_enough(tmp_path):
    (tmp_path / "c.bin").write_bytes(random_bytes(170))
    dm = ByteDataModule(str(tmp_path / "c.bin"), block_size=T, batch_size=1, val_fraction=0.1, val_windows=3)
    assert dm.split_sizes() == {"train": 153, "validation": 17, "test": 0}
    assert dm.val_offsets.tolist() == [153]  # the one window of the validation split, once
    with pytest.raises(DataError) as error:
        ByteDataModule(str(tmp_path / "c.bin"), block_size=T + 1, val_fraction=0.1)
    assert str(error.value) == (
        f"data.path {str(tmp_path / 'c.bin')!r} has 170 bytes, split into 153 for training and 17 for validation, "
        "but each split needs at least block_size + 1 = 18; use a smaller data.block_size, a different "
        "data.val_fraction, or more data"
    )


def test_too_small_splits_are_named_word_for_word(corpus, tmp_path):
    path = str(corpus[0])
    with pytest.raises(DataError) as error:
        ByteDataModule(path, block_size=T, test_fraction=0.0001)
    assert str(error.value) == (
        f"data.path {path!r} has 20000 bytes, split into 17998 for training, 2000 for validation and 2 for test, "
        "but each split needs at least block_size + 1 = 17; use a smaller data.block_size, a different "
        "data.val_fraction, data.test_fraction, or more data"
    )
    (tmp_path / "tiny-test.bin").write_bytes(random_bytes(16))
    with pytest.raises(DataError) as error:
        ByteDataModule(path, block_size=T, test_path=str(tmp_path / "tiny-test.bin"))
    assert str(error.value) == (
        f"data.test_path {str(tmp_path / 'tiny-test.bin')!r} has 16 bytes, but the test split needs at least "
        "block_size + 1 = 17; use a smaller data.block_size or more test data"
    )
    (tmp_path / "test.bin").write_bytes(random_bytes(17))  # one window: enough
    dm = ByteDataModule(path, block_size=T, test_path=str(tmp_path / "test.bin"))
    assert dm.split_sizes() == {"train": 18_000, "validation": 2_000, "test": 17}
    assert dm.test_offsets.tolist() == [0]


def test_data_path_errors_word_for_word(tmp_path, monkeypatch):
    def message(path, **settings):
        with pytest.raises(DataError) as error:
            ByteDataModule(path, block_size=T, **settings)
        return str(error.value)

    missing = str(tmp_path / "missing.txt")
    assert message(missing) == f"data.path {missing!r} does not exist; give a file, a directory or a glob"
    (tmp_path / "empty.txt").write_bytes(b"")
    empty = str(tmp_path / "empty.txt")
    assert message(empty) == f"data.path {empty!r} is an empty file (0 bytes); point data.path at text files"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere.txt")
    assert message(str(tmp_path / "link")) == (
        f"data.path {str(tmp_path / 'link')!r} is a broken symbolic link (to {str(tmp_path / 'nowhere.txt')!r}); "
        "fix the link or give the file itself"
    )
    os.mkfifo(tmp_path / "pipe")
    assert message(str(tmp_path / "pipe")) == (
        f"data.path {str(tmp_path / 'pipe')!r} is a FIFO (named pipe), not a file or a directory; give a file, a "
        "directory or a glob"
    )
    assert message("/dev/null") == (
        "data.path '/dev/null' is a device, not a file or a directory; give a file, a directory or a glob"
    )
    (tmp_path / "folder").mkdir()
    folder = str(tmp_path / "folder")
    assert message(folder) == (
        f"data.path {folder!r} is a directory with no files to read in it; point data.path at text files"
    )
    write_tree(tmp_path / "folder", {"empty.txt": b"", ".a": b"x", ".b/c": b"y"})
    assert message(folder) == (
        f"data.path {folder!r} is a directory with no files to read in it (left out: 1 empty, 2 hidden); point "
        "data.path at text files"
    )
    pattern = str(tmp_path / "folder" / "*")
    assert message(pattern) == (
        f"data.path {pattern!r} is a glob that matches no files to read (left out: 1 empty); check the pattern"
    )
    nothing = str(tmp_path / "*.bin")
    assert message(nothing) == f"data.path {nothing!r} is a glob that matches no files to read; check the pattern"
    # A path starting with ~ is the user's home, and the messages quote it as given.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "home.bin").write_bytes(random_bytes(1000, 5))
    assert len(ByteDataModule("~/home.bin", block_size=T).corpus) == 1000
    assert message("~/gone.txt") == "data.path '~/gone.txt' does not exist; give a file, a directory or a glob"


def test_kind_of_names_each_kind_of_file():
    assert corpus_module.kind_of(stat.S_IFIFO) == "a FIFO (named pipe)"
    assert corpus_module.kind_of(stat.S_IFSOCK) == "a socket"
    assert corpus_module.kind_of(stat.S_IFCHR) == "a device"
    assert corpus_module.kind_of(stat.S_IFBLK) == "a device"
    assert corpus_module.kind_of(stat.S_IFDIR) == "a directory"
    assert corpus_module.kind_of(stat.S_IFLNK) == "not a regular file"  # os.stat follows links: never seen in practice
    assert [corpus_module.short_kind(m) for m in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFBLK, stat.S_IFLNK)] == [
        "FIFO", "socket", "device", "not a regular file"]  # fmt: skip


def test_exclude_matches_the_path_inside_the_corpus_or_the_last_name():
    assert corpus_module.excluded("notes.txt", ["notes.txt"])
    assert corpus_module.excluded("a/b/notes.txt", ["notes.txt"])  # the name, at any depth
    assert corpus_module.excluded("a/my notes.txt", ["my notes.txt"])
    assert corpus_module.excluded("a/b/notes.txt", ["a/*"])  # the path (fnmatch's * crosses /)
    assert not corpus_module.excluded("a/b/notes.txt", ["b/notes.txt"])  # neither the whole path nor the name
    assert not corpus_module.excluded("a/b/notes.txt", ["b"])
    assert not corpus_module.excluded("a/b/notes.txt", [])
    assert corpus_module.excluded("a/b/notes.txt", ["*.log", "notes.*"])  # any of the globs


def test_a_walk_counts_what_it_leaves_out_and_reads_on_after_it(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"docs/x.txt": random_bytes(2000, 1), "m.txt": random_bytes(1000, 2), "e1": b"", "z/e2": b"",
                      "skip/y.txt": random_bytes(500, 3), "z/notes.txt": random_bytes(500, 4)})  # fmt: skip
    for name in ("link1", "link2"):  # two more ways into docs/, sorted between docs/ and m.txt
        (root / name).symlink_to(root / "docs")
    for name in ("p1", "p2"):
        os.mkfifo(root / name)
    for name in ("q1", "q2"):
        (root / name).symlink_to(root / f"missing-{name}")
    (root / "r-null").symlink_to("/dev/null")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "s.sock"))
        dm = ByteDataModule(str(root), block_size=T, batch_size=B, exclude=["skip", "notes.txt"])
    assert list(dm.listing.files) == [str(root / "docs/x.txt"), str(root / "m.txt")]
    assert dm.describe() == (
        f"corpus {root}: 2 files, 2.93 KiB (train 2.64 KiB, validation 300 B, no test split); left out: 2 broken link, "
        "2 directory already read through another link, 2 empty, 2 excluded by data.exclude, 2 not regular files (FIFO), "
        "1 not regular files (device), 1 not regular files (socket)"
    )


def test_a_link_that_loops_is_one_line_naming_it(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(1000, 1)})
    (root / "loop").symlink_to(root / "loop")
    message = f"cannot read data file {root / 'loop'}: Too many levels of symbolic links; fix it or leave it out with data.exclude"
    for path in (str(root), str(root / "*")):  # a directory and a glob alike
        with pytest.raises(DataError) as error:
            ByteDataModule(path, block_size=T)
        assert str(error.value) == message
    assert len(ByteDataModule(str(root), block_size=T, exclude=["loop"]).corpus) == 1000


def test_a_glob_counts_what_it_leaves_out(tmp_path):
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(3000, 1), "b.log": random_bytes(100, 2), "sub/c.txt": random_bytes(400, 3),
                      "sub/d.txt": random_bytes(600, 4), "dir.txt/e": random_bytes(50, 5), "f.txt": b""})  # fmt: skip
    for name in ("dangling.txt", "dangling2.txt"):
        (root / name).symlink_to(root / "nowhere")
    for name in ("pipe.txt", "pipe2.txt"):
        os.mkfifo(root / name)
    dm = ByteDataModule(str(root / "*"), block_size=T, batch_size=B, exclude=["*.log", "f.*"])
    assert list(dm.listing.files) == [str(root / "a.txt")]
    assert dm.describe() == (
        f"corpus {root / '*'}: 1 file, 2.93 KiB (train 2.64 KiB, validation 300 B, no test split); left out: 2 broken "
        "link, 2 directories matched by the glob (use ** to read inside), 2 excluded by data.exclude, "
        "2 not regular files (FIFO)"
    )
    # ** reads inside folders; data.exclude matches the path below the glob's fixed part.
    dm = ByteDataModule(str(root / "**" / "*.txt"), block_size=T, batch_size=B, exclude=["sub/c.txt"])
    assert list(dm.listing.files) == [str(root / "a.txt"), str(root / "sub/d.txt")]
    assert dm.corpus.read(0, 3600).tobytes() == random_bytes(3000, 1) + random_bytes(600, 4)
    assert dm.listing.left_out == {"broken link": 2, "directories matched by the glob (use ** to read inside)": 1,
                                   "empty": 1, "excluded by data.exclude": 1, "not regular files (FIFO)": 2}  # fmt: skip


def test_a_recursive_glob_through_folder_links_back_to_their_parent_ends(tmp_path):
    """`corpus/**` where folders link back to their parent (and to themselves): glob.glob follows such links round
    and round (2 links: 2**40 paths before the OS says ELOOP, a hang); the listing enters each folder once."""
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": random_bytes(3000, 1), "sub/b.txt": random_bytes(600, 2), "sub/deep/c.txt": b"c" * 50})
    (root / "sub" / "up").symlink_to("..")
    (root / "self").symlink_to(".")
    (root / "sub" / "deep" / "top").symlink_to(root)
    results = {}

    def too_long(signum, frame):
        raise TimeoutError("the listing did not end within 60 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    try:
        for pattern in ("**", "**/*.txt", "*/**/*.txt"):
            signal.alarm(60)
            results[pattern] = corpus_module.list_corpus(str(root / pattern))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    files = [str(root / "a.txt"), str(root / "sub/b.txt"), str(root / "sub/deep/c.txt")]
    assert list(results["**"].files) == files and list(results["**/*.txt"].files) == files
    assert sorted(results["*/**/*.txt"].sizes.tolist()) == [50, 600, 3000]  # `*` matches self too: each file once
    # every link is a folder already entered: counted, and in `**` also matched as a folder
    assert results["**/*.txt"].left_out == {"directory already read through another link": 3}
    assert results["**"].left_out == {"directory already read through another link": 3,
                                      "directories matched by the glob (use ** to read inside)": 6}  # fmt: skip


def test_glob_matches_what_glob_does_and_enters_each_folder_once(tmp_path, monkeypatch):
    """glob_matches against glob.glob itself where no link loops, then with links back to a parent (counted)."""
    root = tmp_path / "corpus"
    write_tree(root, {"a.txt": b"a", "sub/b.txt": b"b", "sub/deep/c.md": b"c", "sub/deep/d.txt": b"d",
                      "other/e.txt": b"e", ".hid/h.txt": b"h", "sub/.x.txt": b"x", "s*t/f.md": b"f"})  # fmt: skip
    monkeypatch.chdir(root)
    patterns = ["**", "**/*.txt", "*/**/*.md", "sub/**", "**/deep/*", "**/**/*.txt", "s*/**/*.md"]
    patterns += [str(root / "**"), str(root / "**" / "*.txt"), str(root / "s*t" / "**")]
    for pattern in patterns:
        listing = corpus_module.Listing(pattern)
        assert corpus_module.glob_matches(pattern, listing) == set(glob.glob(pattern, recursive=True)), pattern
        assert not listing.left_out
    assert corpus_module.glob_matches("nothing/**", listing) == set()  # glob.glob gives 'nothing/', which is not there
    assert corpus_module.glob_matches("a.txt/**", listing) == set()  # and 'a.txt/' for a file
    (root / "sub" / "deep" / "up").symlink_to("..")  # back to sub
    (root / "zz").symlink_to(".")  # popped first: the folders after it are still entered
    listing = corpus_module.Listing("")
    expected = {"a.txt", "sub/b.txt", "sub/deep/d.txt", "other/e.txt"}
    assert corpus_module.glob_matches("**/*.txt", listing) == expected
    assert listing.left_out == {"directory already read through another link": 2}
    listing = corpus_module.Listing("")
    nested = corpus_module.glob_matches("**/**/*.txt", listing)  # each inner ** walks on its own: sub/deep/up/b.txt
    assert {os.path.realpath(p) for p in nested} == {os.path.realpath(p) for p in expected}  # the same four files
    assert listing.left_out["directory already read through another link"] > 2
    assert corpus_module.list_corpus("**/*.txt").left_out == {"directory already read through another link": 2}
    # A folder glob cannot list: nothing below it matches, the others are read.
    real_scandir = os.scandir
    monkeypatch.setattr(
        corpus_module.os,
        "scandir",
        lambda p: (_ for _ in ()).throw(PermissionError(13, p)) if p == "sub" else real_scandir(p),
    )
    assert corpus_module.glob_matches("**/*.txt", corpus_module.Listing("")) == {"a.txt", "other/e.txt"}
    monkeypatch.setattr(corpus_module.os, "scandir", real_scandir)
    tops = []
    monkeypatch.setattr(corpus_module, "folders_below", lambda top, listing: tops.append(top) or [])
    assert corpus_module.glob_matches("/**", corpus_module.Listing("")) == set() and tops == ["/"]


def test_corpus_files_and_read_corpus_follow_the_listing(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    parts = {".hidden.txt": random_bytes(100, 1), "a.txt": random_bytes(200, 2), "sub/b.log": random_bytes(300, 3),
             "sub/c.txt": random_bytes(400, 4)}  # fmt: skip
    write_tree(root, parts)
    assert corpus_files(str(root)) == [str(root / "a.txt"), str(root / "sub/b.log"), str(root / "sub/c.txt")]
    assert corpus_files(str(root), ["*.log"]) == [str(root / "a.txt"), str(root / "sub/c.txt")]
    assert corpus_files(str(root), None, True) == [str(root / n) for n in sorted(parts)]
    assert type(corpus_files(str(root))) is list
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(
        corpus_module.os, "stat", lambda path, *a, **k: stats.append(os.fspath(path)) or real_stat(path, *a, **k)
    )
    corpus = corpus_module.read_corpus(str(root), ["*.log"])
    assert [stats.count(str(root / n)) for n in ("a.txt", "sub/c.txt")] == [1, 1]  # each file stat'ed once
    monkeypatch.setattr(corpus_module.os, "stat", real_stat)
    assert corpus.read(0, len(corpus)).tobytes() == parts["a.txt"] + parts["sub/c.txt"]
    assert len(corpus_module.read_corpus(str(root))) == 900
    everything = corpus_module.read_corpus(str(root), include_hidden=True)
    assert everything.read(0, 100).tobytes() == parts[".hidden.txt"] and len(everything) == 1000


def test_the_description_says_files_bytes_splits_and_left_out_of_both_corpora(tmp_path, corpus):
    path, _ = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B)
    assert dm.describe() == f"corpus {path}: 1 file, 19.53 KiB (train 17.58 KiB, validation 1.95 KiB, no test split)"
    (tmp_path / "held-out.bin").write_bytes(random_bytes(3000, 9))
    dm = ByteDataModule(str(path), block_size=T, test_path=str(tmp_path / "held-out.bin"))
    assert dm.describe() == (
        f"corpus {path}: 1 file, 19.53 KiB (train 17.58 KiB, validation 1.95 KiB, test 2.93 KiB from {tmp_path / 'held-out.bin'}: "
        "1 file)"
    )
    train, test = tmp_path / "train", tmp_path / "test"
    write_tree(train, {"a.txt": random_bytes(1500, 1), ".x": b"x"})
    write_tree(test, {"b.txt": random_bytes(200, 2), "c.txt": random_bytes(150, 3), ".y": b"y", ".z": b"z"})
    dm = ByteDataModule(str(train), block_size=T, batch_size=B, test_path=str(test))
    assert dm.describe() == (
        f"corpus {train}: 1 file, 1.46 KiB (train 1.32 KiB, validation 150 B, test 350 B from {test}: 2 files); "
        "left out: 3 hidden (data.include_hidden reads hidden ones)"
    )
    dm = ByteDataModule(str(train), block_size=T, batch_size=B, test_fraction=0.2, include_hidden=True)
    assert dm.describe() == f"corpus {train}: 2 files, 1.47 KiB (train 1.03 KiB, validation 150 B, test 301 B)"


def test_validation_streams_read_the_validation_split_contiguously(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_fraction=0.25, val_windows=16)
    batches = dm.validation_streams()
    assert len(batches) == 2  # 8 streams of 2 windows each
    stretch = 5_000 // 8  # the validation split [15000, 20000) in 8 equal stretches
    for k, (x, y, positions) in enumerate(batches):
        assert positions.tolist() == [k * T] * 8
        for row in range(8):
            start = 15_000 + row * stretch + k * T
            assert bytes(x[row].tolist()) == raw[start : start + T]
            assert bytes(y[row].tolist()) == raw[start + 1 : start + T + 1]


def test_streams_sampling_gives_each_row_of_each_rank_its_stretch_of_the_train_split(corpus):
    path, raw = corpus
    dm = ByteDataModule(str(path), block_size=T, batch_size=B, val_fraction=0.2, sampling="streams")
    dm.trainer = fake_trainer(rank=1, world_size=2, global_step=3, accumulate_grad_batches=2)
    x, y, positions = next(iter(dm.train_dataloader()))
    stretch = 16_000 // 8  # the training split in world_size * batch_size = 8 stretches; rank 1 has 4..7
    assert positions.tolist() == [6 * T] * B  # batch 6: global step 3 of 2 micro-batches each
    for b in range(B):
        start = (4 + b) * stretch + 6 * T
        assert bytes(x[b].tolist()) == raw[start : start + T]
        assert bytes(y[b].tolist()) == raw[start + 1 : start + T + 1]


def test_equal_val_windows_and_devices_are_enough_and_fewer_is_one_line(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B, val_windows=2, test_fraction=0.1)
    dm.trainer = fake_trainer(rank=1, world_size=2)
    assert [len(x) for x, _ in dm.val_dataloader()] == [1]
    assert [len(x) for x, _ in dm.test_dataloader()] == [1]
    dm.trainer = fake_trainer(rank=0, world_size=3)
    for loader, split in ((dm.val_dataloader, "validation"), (dm.test_dataloader, "test")):
        with pytest.raises(DataError) as error:
            loader()
        assert str(error.value) == (
            f"{split} has 2 distinct windows for 3 devices; raise data.val_windows (or the split's share of the "
            "corpus) to at least the number of devices"
        )


class RecordingPrepared:
    """Stands in for litdata.Prepared (a directory made by `prepare`; test_prepare.py reads real ones): answers
    from a made-up manifest and returns what the data module asked for instead of loaders."""

    def __init__(self, path, block_size, test=True):
        self.path, self.block_size, self.test = path, block_size, test

    def has(self, split):
        return split != "test" or self.test

    def split_bytes(self):
        return {"train": 9_000, "validation": 1_000, "test": 500 if self.test else 0}

    def identity(self):
        return "sha256 of the sources"

    def describe(self):
        return f"corpus {self.path}: prepared"

    def train_loader(self, batch_size, seed, num_workers, start):
        return ("train", batch_size, seed, num_workers, start)

    def eval_loader(self, split, count, batch_size, rank, world_size, num_workers):
        return ("eval", split, count, batch_size, rank, world_size, num_workers)

    def position(self, batches):
        return {"batches": batches}


@pytest.fixture
def prepared_paths(monkeypatch):
    """data.path "prepared" (with a test split) and "prepared-no-test" read as prepared directories."""
    monkeypatch.setattr(data_module.litdata, "is_prepared", lambda path: path.startswith("prepared"))
    monkeypatch.setattr(
        data_module.litdata,
        "open_prepared",
        lambda path, block_size: RecordingPrepared(path, block_size, path == "prepared"),
    )


def test_a_prepared_directory_is_read_through_its_stream(prepared_paths):
    dm = ByteDataModule("prepared", block_size=T, batch_size=B, val_windows=7, seed=5, num_workers=3)
    assert (dm.stream.block_size, dm.corpus, dm.listing) == (T, None, None)
    dm.setup("test")
    assert dm.has_test_split and dm.describe() == "corpus prepared: prepared"
    assert dm.split_sizes() == {"train": 9_000, "validation": 1_000, "test": 500}
    dm.trainer = fake_trainer(rank=1, world_size=2, global_step=4, accumulate_grad_batches=3)
    assert dm.train_dataloader() == ("train", B, 5, 3, 12)
    assert dm.val_dataloader() == ("eval", "validation", 7, B, 1, 2, 3)
    assert dm.test_dataloader() == ("eval", "test", 7, B, 1, 2, 3)
    splits = {"kind": "prepared", "id": "sha256 of the sources"}
    assert dm.split_ranges() == splits
    assert dm.state_dict() == {"splits": splits, "train_batches": 12, "stream": {"batches": 12}}
    dm.load_state_dict({"splits": {"kind": "files", "bytes": 10_500, "train": [0, 10_000],
                                   "validation": [10_000, 10_500], "test": None, "test_path": None}})  # fmt: skip
    dm.trainer = None
    assert dm.state_dict() == {"splits": splits, "train_batches": 0}  # no trainer: no stream position yet


def test_a_prepared_directory_without_a_test_split_refuses_test(prepared_paths):
    dm = ByteDataModule("prepared-no-test", block_size=T, batch_size=B)
    assert not dm.has_test_split
    for call in (lambda: dm.setup("test"), dm.test_dataloader):
        with pytest.raises(DataError) as error:
            call()
        assert str(error.value) == data_module.NO_TEST_SPLIT


def test_a_prepared_directory_refuses_settings_it_makes_itself(prepared_paths):
    for setting in ({"test_fraction": 0.1}, {"test_path": "other"}):
        with pytest.raises(DataError) as error:
            ByteDataModule("prepared", block_size=T, **setting)
        assert str(error.value) == (
            "data.path 'prepared' is a prepared directory, which holds its own test split; leave out "
            "data.test_fraction and data.test_path"
        )
    with pytest.raises(DataError) as error:
        ByteDataModule("prepared", block_size=T, sampling="streams")
    assert str(error.value) == (
        "data.sampling streams reads files directly; data.path 'prepared' is a prepared directory, which streams "
        "its own shuffled windows: use data.sampling windows, or the source files"
    )


def test_the_checkpoint_check_of_the_test_split_word_for_word(corpus):
    path = str(corpus[0])
    trained = ByteDataModule(path, block_size=T, val_fraction=0.1, test_fraction=0.02).split_ranges()
    assert trained == {"kind": "files", "bytes": 20_000, "train": [0, 17_600], "validation": [17_600, 19_600],
                       "test": [19_600, 20_000], "test_path": None}  # fmt: skip
    late = ByteDataModule(path, block_size=T, val_fraction=0.1, test_fraction=0.05)
    with pytest.raises(DataError) as error:
        late.load_state_dict({"splits": trained, "train_batches": 0})
    assert str(error.value) == (
        f"the test split (bytes 19,000 to 20,000 of {path}) overlaps bytes the checkpoint's run trained or "
        "validated on (0 to 19,600: it had data.test_fraction 0.02); test with the data.val_fraction and "
        "data.test_fraction it was trained with"
    )
    state = {"splits": trained, "train_batches": 3}
    held_out = ByteDataModule(path, block_size=T, val_fraction=0.1, test_fraction=0.01)
    held_out.load_state_dict(state)  # the test split lies inside the old one: accepted
    assert held_out.restored is state
    other = {**trained, "bytes": 30_000, "validation": [25_000, 30_000]}  # another corpus: nothing to compare
    late.load_state_dict({"splits": other})
    late.load_state_dict({"splits": {"kind": "prepared", "id": "x"}})
    late.load_state_dict({})  # a checkpoint from before splits were recorded


def test_the_default_cache_is_in_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("BDH_LIGHTNING_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert corpus_module.cache_dir() == tmp_path / ".cache" / "bdh_lightning"
    monkeypatch.setenv("BDH_LIGHTNING_CACHE", "~/elsewhere")
    assert corpus_module.cache_dir() == tmp_path / "elsewhere"


def test_the_download_writes_a_hidden_partial_file_in_the_cache_and_renames_it(server, cache, monkeypatch, capsys):
    server.body = random_bytes(5000, 7)
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(server.body).hexdigest())
    during = []
    server.on_request = lambda: during.extend(os.listdir(cache))
    timeouts = []
    real_urlopen = corpus_module.urllib.request.urlopen

    def urlopen(url, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        return real_urlopen(url, **kwargs)

    monkeypatch.setattr(corpus_module.urllib.request, "urlopen", urlopen)
    assert corpus_module.download_tinyshakespeare() == cache / "tinyshakespeare.txt"
    assert len(during) == 1 and re.fullmatch(r"\.tinyshakespeare\.\w+\.part", during[0]), during
    assert os.listdir(cache) == ["tinyshakespeare.txt"]
    assert timeouts == [30]  # a stalled server fails the download after 30 s instead of hanging
    progress = capsys.readouterr().err
    assert "tinyshakespeare: 100%" in progress and "5.00k/5.00k" in progress  # Content-Length gives the total


def test_the_download_into_an_existing_cache_folder_without_a_length(server, cache, monkeypatch, capsys):
    cache.mkdir(parents=True)
    (cache / "other.txt").write_text("kept")
    server.body, server.length = random_bytes(3000, 8), False
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(server.body).hexdigest())
    assert corpus_module.download_tinyshakespeare().read_bytes() == server.body
    assert sorted(os.listdir(cache)) == ["other.txt", "tinyshakespeare.txt"]
    progress = capsys.readouterr().err
    assert "%" not in progress and "3.00kB" in progress  # no length: a count of bytes, no percentage


def test_the_download_refuses_a_cache_it_cannot_make(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("not a folder")
    monkeypatch.setenv("BDH_LIGHTNING_CACHE", str(tmp_path / "file.txt" / "cache"))
    with pytest.raises(DataError) as error:
        corpus_module.download_tinyshakespeare()
    assert str(error.value) == (
        f"cannot create the data cache {tmp_path / 'file.txt' / 'cache'}: Not a directory; set BDH_LIGHTNING_CACHE "
        "to a writable directory"
    )


def test_the_download_comes_from_tiny_shakespeare_by_default(cache, monkeypatch):
    monkeypatch.delenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", raising=False)
    asked = []

    def offline(url, **kwargs):  # no network in tests: say which URL would have been read
        asked.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(corpus_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as error:
        corpus_module.download_tinyshakespeare()
    assert asked == [corpus_module.TINYSHAKESPEARE_URL]
    assert corpus_module.TINYSHAKESPEARE_URL == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    )
    assert str(error.value) == (
        f"could not download tiny Shakespeare from {corpus_module.TINYSHAKESPEARE_URL} (no network in tests); use a local "
        "copy instead, e.g. --data.path data/tinyshakespeare.txt (a file, a directory or a glob also work)"
    )
    assert os.listdir(cache) == []


def test_a_pickled_corpus_opens_its_own_descriptors(corpus):
    path, raw = corpus
    original = corpus_module.read_corpus(str(path))
    assert original.read(100, 50).tobytes() == raw[100:150]  # holds a descriptor now
    copy = pickle.loads(pickle.dumps(original))  # what a DataLoader worker gets
    assert copy.read(200, 50).tobytes() == raw[200:250]
    copy.close()  # closes only the copy's own descriptors
    assert original.read(300, 50).tobytes() == raw[300:350]


def test_a_file_gone_or_replaced_during_the_run_is_one_line_naming_it(tmp_path):
    files = {name: tmp_path / name for name in ("a.bin", "b.bin", "c.bin")}
    for i, file in enumerate(files.values()):
        file.write_bytes(random_bytes(1000, i))
    corpus = corpus_module.ByteCorpus(list(files.values()))
    assert corpus.read(500, 1000).tobytes() == random_bytes(1000, 0)[500:] + random_bytes(1000, 1)[:500]
    os.truncate(files["a.bin"], 100)
    os.remove(files["a.bin"])
    with pytest.raises(DataError) as error:
        corpus.read(0, 200)
    assert str(error.value) == (
        f"data file {files['a.bin']} changed during the run: it had 1000 bytes at the start, No such file or "
        "directory; restore it (or start again: the run's windows were drawn from the old bytes)"
    )
    os.remove(files["c.bin"])  # never opened yet
    with pytest.raises(DataError) as error:
        corpus.read(2500, 10)
    assert str(error.value) == (
        f"cannot read data file {files['c.bin']}: No such file or directory; it changed during the run"
    )
    files["c.bin"].mkdir()  # a folder where the file was: it opens, but does not read
    with pytest.raises(DataError) as error:
        corpus.read(2500, 10)
    assert str(error.value) == f"cannot read data file {files['c.bin']}: Is a directory"


def test_a_corpus_of_named_files_stats_them_and_leaves_out_empty_ones(tmp_path):
    a, empty, b = tmp_path / "a.bin", tmp_path / "empty.bin", tmp_path / "b.bin"
    a.write_bytes(random_bytes(300, 1))
    empty.write_bytes(b"")
    b.write_bytes(random_bytes(200, 2))
    corpus = corpus_module.ByteCorpus([a, empty, b])
    assert corpus.files == [str(a), str(b)] and corpus.sizes.tolist() == [300, 200]
    assert corpus.starts.tolist() == [0, 300, 500] and len(corpus) == 500
    assert corpus.read(250, 100).tobytes() == random_bytes(300, 1)[250:] + random_bytes(200, 2)[:50]
    assert corpus.read(499, 1).tobytes() == random_bytes(200, 2)[-1:]
    assert corpus.read(0, 0).tobytes() == b""
    for start, length in ((-1, 5), (496, 5), (500, 1)):
        with pytest.raises(IndexError) as error:
            corpus.read(start, length)
        assert str(error.value) == f"bytes [{start}, {start + length}) are outside the corpus of 500 bytes"
    windows = corpus.windows(np.array([0, 290, 495]), 5)
    assert windows.dtype == torch.int64 and windows.shape == (3, 5)
    assert bytes(windows[1].tolist()) == (random_bytes(300, 1) + random_bytes(200, 2))[290:295]
    with pytest.raises(DataError) as error:
        corpus_module.ByteCorpus([a, tmp_path / "gone.bin"])
    assert str(error.value) == (
        f"cannot read data file {tmp_path / 'gone.bin'}: No such file or directory; fix its permissions or leave it out"
    )


def test_a_listing_drops_second_links_and_keeps_names_and_sizes_in_step(tmp_path):
    root = tmp_path / "corpus"
    parts = {"a.txt": random_bytes(3000, 1), "b.txt": random_bytes(2000, 2), "d.txt": random_bytes(1000, 3)}
    write_tree(root, parts)
    os.link(root / "a.txt", root / "c-hard.txt")  # between b and d
    listing = corpus_module.list_corpus(str(root))
    assert list(listing.files) == [str(root / n) for n in ("a.txt", "b.txt", "d.txt")]
    assert listing.sizes.tolist() == [3000, 2000, 1000] and listing.sizes.dtype == np.int64
    assert listing.left_out == {"already read through another link": 1}
    assert (
        len(listing.files) == 3 and listing.files[-1] == str(root / "d.txt") and listing.files[-3] == listing.files[0]
    )
    assert listing.files[1:] == [str(root / "b.txt"), str(root / "d.txt")] and listing.files[::2] == [
        str(root / "a.txt"), str(root / "d.txt")]  # fmt: skip
    corpus = corpus_module.ByteCorpus(listing.files, listing.sizes)
    assert corpus.read(0, 6000).tobytes() == parts["a.txt"] + parts["b.txt"] + parts["d.txt"]
    single = corpus_module.list_corpus(str(root / "b.txt"))  # a file: its own name, no prefix
    assert list(single.files) == [str(root / "b.txt")] and single.sizes.tolist() == [2000] and not single.left_out


def test_the_defaults_are_the_documented_ones():
    dm = ByteDataModule()  # tiny Shakespeare: nothing is read or downloaded before prepare_data
    assert (dm.path, dm.block_size, dm.batch_size, dm.val_fraction, dm.val_windows, dm.seed, dm.num_workers) == (
        "tinyshakespeare", 512, 32, 0.1, 64, 1337, 0)  # fmt: skip
    assert (dm.test_fraction, dm.test_path, dm.exclude, dm.include_hidden, dm.sampling) == (
        0.0, None, [], False, "windows")  # fmt: skip
    assert dm.corpus is None and dm.listing is None


def test_data_path_that_cannot_be_stat_ed_is_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file.txt").write_bytes(random_bytes(100))
    for path, why in (
        (tmp_path / "loop", "Too many levels of symbolic links"),
        (tmp_path / "file.txt/x", "Not a directory"),
    ):
        with pytest.raises(DataError) as error:
            ByteDataModule(str(path), block_size=T)
        assert str(error.value) == f"cannot read data.path {str(path)!r}: {why}"


def test_a_listing_is_compact_and_hides_hidden_files_by_default(tmp_path):
    root = tmp_path / ("a-long-folder-name-" * 8)  # every file under a long prefix, stored once
    write_tree(root, {f"f{i:03d}.txt": random_bytes(20, i) for i in range(200)} | {".hidden": b"h"})
    listing = corpus_module.list_corpus(str(root))
    assert listing.path == str(root) and len(listing.files) == 200 and listing.left_out == {"hidden": 1}
    assert listing.files[7] == str(root / "f007.txt")
    assert len(pickle.dumps(listing.files)) < 200 * 25  # names inside the folder and offsets: ~8 + 8 bytes a file
    corpus = corpus_module.ByteCorpus(listing.files, listing.sizes)
    assert isinstance(corpus.files, corpus_module.PathList)  # the corpus keeps the compact list (and workers get it)
    assert len(pickle.dumps(corpus)) < 200 * 40


def test_a_glob_root_ends_before_its_first_wildcard_of_any_kind(tmp_path, monkeypatch):
    write_tree(tmp_path, {"dir/x1.txt": random_bytes(300, 1), "dir/x2.txt": random_bytes(300, 2)})
    # data.exclude matches the path below the glob's fixed part: "dir/x1.txt" for each of these patterns.
    for pattern in ("d?r/x*.txt", "d[i]r/x*.txt", "d*/x?.txt"):
        dm = ByteDataModule(str(tmp_path / pattern), block_size=T, exclude=["dir/x1.txt"])
        assert list(dm.listing.files) == [str(tmp_path / "dir/x2.txt")], pattern
    monkeypatch.chdir(tmp_path / "dir")  # a glob relative to the working directory: the paths as matched
    dm = ByteDataModule("x*.txt", block_size=T, exclude=["x2.txt"])
    assert list(dm.listing.files) == ["x1.txt"]


def test_nothing_is_stat_ed_again_once_listed(tmp_path, monkeypatch):
    write_tree(tmp_path / "train", {"a.txt": random_bytes(2000, 1), "b.txt": random_bytes(1000, 2)})
    write_tree(tmp_path / "test", {"c.txt": random_bytes(500, 3), "d.log": random_bytes(500, 4), ".e": b"e" * 100})
    listed, again = set(), []
    real_list_corpus, real_stat = corpus_module.list_corpus, os.stat

    def list_corpus(*args, **kwargs):
        listing = real_list_corpus(*args, **kwargs)
        listed.update(listing.files)
        return listing

    def counting_stat(path, *args, **kwargs):
        if os.fspath(path) in listed:
            again.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "list_corpus", list_corpus)
    monkeypatch.setattr(corpus_module.os, "stat", counting_stat)
    dm = ByteDataModule(str(tmp_path / "train"), block_size=T, test_path=str(tmp_path / "test"), exclude=["*.log"])
    assert again == [] and len(listed) == 3
    # data.exclude and data.include_hidden apply to the test corpus too.
    assert len(dm.corpus) == 3000 and len(dm.test_corpus) == 500
    listed.clear()
    dm = ByteDataModule(str(tmp_path / "train"), block_size=T, test_path=str(tmp_path / "test"), include_hidden=True)
    assert len(dm.test_corpus) == 1100 and again == []


def test_a_downloaded_corpus_is_stat_ed_once_when_set_up(server, cache, monkeypatch):
    server.body = random_bytes(5000, 7)
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(server.body).hexdigest())
    dm = ByteDataModule(block_size=T, batch_size=B)
    dm.prepare_data()
    real_list_corpus, real_stat = corpus_module.list_corpus, os.stat
    listed, again = [], []
    monkeypatch.setattr(
        data_module, "list_corpus", lambda *a, **k: listed.append(real_list_corpus(*a, **k)) or listed[-1]
    )
    monkeypatch.setattr(
        corpus_module.os, "stat", lambda p, *a, **k: (again.append(p) if listed else None) or real_stat(p, *a, **k)
    )
    dm.setup("fit")
    assert again == [] and len(dm.corpus) == 5000 and list(dm.listing.files) == [str(cache / "tinyshakespeare.txt")]


def test_a_connection_reset_mid_download_is_one_line(server, cache, monkeypatch):
    server.body, server.reset = random_bytes(50_000, 7), True
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    with pytest.raises(DataError) as error:
        corpus_module.download_tinyshakespeare()
    assert str(error.value) == (
        f"could not download tiny Shakespeare from {server.url} ([Errno 104] Connection reset by peer); use a local "
        "copy instead, e.g. --data.path data/tinyshakespeare.txt (a file, a directory or a glob also work)"
    )
    assert os.listdir(cache) == []


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_every_descriptor_and_reading_after_it_reopens(tmp_path):
    files = [tmp_path / f"{i}.bin" for i in range(5)]
    for i, file in enumerate(files):
        file.write_bytes(random_bytes(100, i))
    before = open_descriptors()
    corpus = corpus_module.ByteCorpus(files)
    assert corpus.files == [str(f) for f in files]  # paths given as Path objects: kept as str
    assert corpus.read(0, 500).tobytes() == b"".join(random_bytes(100, i) for i in range(5))
    assert open_descriptors() == before + 5
    corpus.close()
    assert open_descriptors() == before
    assert corpus.read(150, 100).tobytes() == random_bytes(100, 1)[50:] + random_bytes(100, 2)[:50]
    assert open_descriptors() == before + 2
    corpus.close()
    corpus.close()  # twice: nothing left to close
    assert open_descriptors() == before


def test_the_least_recently_used_descriptor_is_closed_first(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "MAX_OPEN_FILES", 2)
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, file in enumerate(files):
        file.write_bytes(random_bytes(100, i))
    corpus = corpus_module.ByteCorpus(files)
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        corpus_module.os, "open", lambda path, *a: opened.append(os.path.basename(path)) or real_open(path, *a)
    )
    for i in (0, 1, 0, 2, 0, 1):  # 2 closes 1 (not 0, just used); the last 1 closes 2
        assert corpus.read(100 * i, 10).tobytes() == random_bytes(100, i)[:10]
    assert opened == ["0.bin", "1.bin", "2.bin", "1.bin"]
    corpus.close()


def test_short_reads_are_continued(corpus, monkeypatch):
    path, raw = corpus
    real_preadv = os.preadv
    monkeypatch.setattr(
        corpus_module.os, "preadv", lambda fd, buffers, offset: real_preadv(fd, [buffers[0][:7]], offset)
    )
    assert corpus_module.read_corpus(str(path)).read(1000, 100).tobytes() == raw[1000:1100]  # 15 reads of up to 7 bytes


def test_a_too_small_split_beside_a_test_corpus_of_exactly_one_window(tmp_path):
    (tmp_path / "train.bin").write_bytes(random_bytes(100, 1))
    (tmp_path / "test.bin").write_bytes(random_bytes(17, 2))
    with pytest.raises(DataError) as error:
        ByteDataModule(str(tmp_path / "train.bin"), block_size=T, test_path=str(tmp_path / "test.bin"))
    assert str(error.value) == (
        f"data.path {str(tmp_path / 'train.bin')!r} has 100 bytes, split into 90 for training, 10 for validation and "
        "17 for test, but each split needs at least block_size + 1 = 17; use a smaller data.block_size, a different "
        "data.val_fraction, or more data"
    )


def test_loaders_use_the_workers_asked_for(corpus):
    dm = ByteDataModule(str(corpus[0]), block_size=T, batch_size=B, num_workers=2, test_fraction=0.1)
    assert [loader.num_workers for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())] == [
        2, 2, 2]  # fmt: skip
    assert all(loader.batch_size is None for loader in (dm.train_dataloader(), dm.val_dataloader()))


def test_a_corpus_that_failed_to_open_goes_quietly(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(random_bytes(100))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # "Exception ignored in __del__" otherwise
    with pytest.raises(DataError):
        corpus_module.ByteCorpus([tmp_path / "a.bin", tmp_path / "gone.bin"])
    gc.collect()
    assert unraisable == []


def test_every_input_safe_val_windows_has_an_upper_bound(corpus):
    """10**23 validation windows ended in numpy's 'Maximum allowed size exceeded' traceback: one line now."""
    assert_one_line_error("data.val_windows must be at most 16,777,216, got 16,777,217", str(corpus[0]),
                          block_size=T, val_windows=2**24 + 1)  # fmt: skip
    assert_one_line_error("data.val_windows must be at most", str(corpus[0]), block_size=T, val_windows=10**23)


def test_a_file_that_grows_after_listing_is_read_as_listed(tmp_path, monkeypatch):
    """The listing's sizes are the corpus (the split and describe() were made from them): bytes appended to a file
    after it was listed are not read, by read_corpus nor by a ByteCorpus built from the listing."""
    (tmp_path / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "b.txt").write_bytes(b"b" * 50)
    listing = corpus_module.list_corpus(str(tmp_path))
    with open(tmp_path / "a.txt", "ab") as grown:
        grown.write(b"+" * 30)
    corpus = corpus_module.ByteCorpus(listing.files, listing.sizes)
    assert len(corpus) == 150 and corpus.read(0, 150).tobytes() == b"a" * 100 + b"b" * 50
    monkeypatch.setattr(corpus_module, "list_corpus", lambda path, exclude=None, include_hidden=False: listing)
    read = corpus_module.read_corpus(str(tmp_path))  # listed before the file grew
    assert len(read) == 150 and read.read(99, 2).tobytes() == b"ab"
