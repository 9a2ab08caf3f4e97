"""ByteDataModule: windows, splits, seeding per rank and step, resuming, inputs, bad inputs, download."""

import hashlib
import http.server
import os
import socket
import threading
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from bdh_lightning import data
from bdh_lightning.data import ByteDataModule, DataError

T, B = 16, 4


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

        monkeypatch.setattr(data, "open", guarded_open, raising=False)
    message = assert_one_line_error("cannot read", str(path))
    assert "Permission denied" in message and "secret.txt" in message


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
    """A local HTTP server: set `served.body`; `served.requests` counts the requests."""
    served = SimpleNamespace(body=b"", requests=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.requests += 1
            if self.path != "/input.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            self.wfile.write(served.body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}/input.txt"
    yield served
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BDH_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_checks_the_hash_caches_and_is_used(server, cache, monkeypatch):
    server.body = random_bytes(5000, 7)
    monkeypatch.setenv("BDH_LIGHTNING_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(server.body).hexdigest())
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
    assert "\n" not in str(error.value)
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
        f"corpus {root}: 2 files, 10 kB (train 8 kB, validation 1 kB, test 1 kB); left out: 1 broken link, 1 empty, "
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

    monkeypatch.setattr(data.os, "scandir", scandir)
    try:
        message = assert_one_line_error("cannot list directory", str(root))
    finally:
        (root / "locked").chmod(0o755)
    assert str(root / "locked") in message and "Permission denied" in message and "data.exclude" in message


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
    assert str(path) in str(error.value) and "20000 bytes at the start, 1000 bytes now" in str(error.value)


def test_many_files_hold_a_bounded_number_of_descriptors(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_OPEN_FILES", 8)
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
    assert "test 3 kB from" in dm.describe()
    os.link(path, tmp_path / "same.bin")
    assert_one_line_error("shares 1 file", str(path), block_size=T, test_path=str(tmp_path / "same.bin"))
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
