"""data/litdata.py without LitData's own machinery: the remote read's lines (a fake storage client), a prepared
folder's description, the stream's position and the evaluation windows each rank reads (test_prepare.py reads
real prepared folders)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bdh_lightning.data import litdata
from bdh_lightning.data.litdata import Prepared, read_remote
from bdh_lightning.errors import DataError

fs_provider = pytest.importorskip("litdata.streaming.fs_provider")


class FakeStorage:
    def __init__(self, data=b"", error=None):
        self.data, self.error, self.asked = data, error, []

    def download_file(self, remote, local):
        self.asked.append(remote)
        if self.error:
            raise self.error
        with open(local, "wb") as file:
            file.write(self.data)


def storage(monkeypatch, **settings):
    fake = FakeStorage(**settings)
    targets = []
    monkeypatch.setattr(fs_provider, "_get_fs_provider", lambda target: targets.append(target) or fake)
    return fake, targets


def test_a_remote_file_is_read_through_the_storage_client(monkeypatch):
    fake, targets = storage(monkeypatch, data=b"manifest bytes")
    assert read_remote("s3://bucket/corpus/", "manifest.json") == b"manifest bytes"
    assert targets == fake.asked == ["s3://bucket/corpus/manifest.json"]


@pytest.mark.parametrize(
    "url, error, message",
    [("s3://b/c", ImportError("No module named\n 'boto3'"),
      "reading s3://b/c/m.json needs a storage client that is not installed (No module named 'boto3')"),
     ("gs://b/c", RuntimeError("DefaultCredentialsError: no\ncredentials"),
      "cannot read gs://b/c/m.json (RuntimeError: DefaultCredentialsError: no credentials); no credentials were "
      "found: set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"),
     ("s3://b/c", type("NoCredentialsError", (Exception,), {})("Unable to locate"),
      "cannot read s3://b/c/m.json (NoCredentialsError: Unable to locate); no credentials were found: set "
      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance role applies"),
     ("s3://b/c", FileNotFoundError("b/c/m.json"),
      "cannot read s3://b/c/m.json (FileNotFoundError: b/c/m.json); check the URL, your network and your credentials")],
)  # fmt: skip
def test_a_remote_read_that_fails_is_one_line_with_what_to_do(monkeypatch, url, error, message):
    storage(monkeypatch, error=error)
    with pytest.raises(DataError) as raised:
        read_remote(url, "m.json")
    assert str(raised.value) == message


def test_a_long_storage_error_is_cut_to_300_characters(monkeypatch):
    storage(monkeypatch, error=OSError("x" * 1000))
    with pytest.raises(DataError) as raised:
        read_remote("s3://b", "m.json")
    assert f"(OSError: {'x' * 300}); check" in str(raised.value)
    storage(monkeypatch, error=ImportError("y" * 1000))
    with pytest.raises(DataError) as raised:
        read_remote("s3://b", "m.json")
    assert str(raised.value).endswith(f"({'y' * 300})")


def manifest(test_documents=2, left_out=None):
    return {
        "block_size": 15, "source": {"path": "/data/books"}, "sources": {"count": 1234, "bytes": 3 * 2**20, "sha256": "abc"},
        "splits": {"train": {"bytes": 2**20, "documents": 1200, "windows": 65536},
                   "validation": {"bytes": 4096, "documents": 30, "windows": 256},
                   "test": {"bytes": 2048 if test_documents else 0, "documents": test_documents,
                            "windows": 128 if test_documents else 0}},
        "left_out": left_out or {},
    }  # fmt: skip


def test_a_prepared_folder_describes_its_source_splits_and_what_was_left_out():
    prepared = Prepared("/runs/prepared", manifest())
    assert prepared.describe() == (
        "corpus /runs/prepared: prepared from /data/books, 1,234 files, 3.00 MiB, windows of 16 bytes; train 1.00 MiB "
        "(1,200 documents), validation 4.00 KiB (30 documents), test 2.00 KiB (2 documents)"
    )
    bare = Prepared("/p", manifest(test_documents=0, left_out={"empty": 3, "binary": 1200}))
    assert bare.describe().endswith(
        "validation 4.00 KiB (30 documents); no test split; left out: 1,200 binary, 3 empty"
    )
    assert bare.split_bytes() == {"train": 2**20, "validation": 4096, "test": 0} and bare.identity() == "abc"
    assert Prepared("s3://b/p/", manifest()).split_dir("train") == "s3://b/p/train"


@pytest.mark.parametrize(
    "per_pass, batches, position",
    [(10, 25, (2, 5)), (10, 30, (3, 0)), (10, 9, (0, 9)), (0, 7, (0, 7))],
)
def test_the_streams_position_counts_passes_over_the_training_split(per_pass, batches, position):
    prepared = Prepared("/p", manifest())
    if per_pass:
        prepared.stream = SimpleNamespace(loader=[None] * per_pass)
    assert prepared.position(batches) == {
        "batches": batches, "pass": position[0], "batches_in_pass": position[1], "batches_per_pass": per_pass
    }  # fmt: skip


def test_without_a_stream_the_position_is_all_in_the_first_pass():
    assert Prepared("/p", manifest()).position(4) == {
        "batches": 4,
        "pass": 0,
        "batches_in_pass": 4,
        "batches_per_pass": 0,
    }


def test_each_rank_reads_its_share_of_evenly_spaced_evaluation_windows():
    prepared = Prepared("/p", manifest())
    loader = prepared.eval_loader("validation", count=5, batch_size=2, rank=1, world_size=2, num_workers=0)
    windows = loader.dataset
    assert windows.split == "validation" and windows.batch_size == 2 and len(windows) == 1
    assert windows.indices.tolist() == [64, 191]  # of 0, 64, 128, 191, 255: every second from the second
    assert loader.batch_size is None and loader.num_workers == 0
    test = prepared.eval_loader("test", count=500, batch_size=4, rank=0, world_size=1, num_workers=0).dataset
    assert test.split == "test" and test.indices.tolist() == list(range(128)) and len(test) == 32
    assert test.indices.dtype == np.int64


def test_a_split_with_fewer_windows_than_devices_is_one_line():
    prepared = Prepared("/p", manifest())
    with pytest.raises(DataError) as error:
        prepared.eval_loader("test", count=3, batch_size=1, rank=0, world_size=4, num_workers=0)
    assert str(error.value) == (
        "the test split of /p has 3 windows for 4 devices; raise data.val_windows, or prepare again with a larger "
        "share for it"
    )
    assert len(prepared.eval_loader("test", count=4, batch_size=1, rank=3, world_size=4, num_workers=0).dataset) == 1
    assert litdata.SPLITS == ("train", "validation", "test")
