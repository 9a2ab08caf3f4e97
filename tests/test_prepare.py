"""`prepare` and prepared directories: split by document, manifest, resume, streaming with LitData, bad input."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from bdh_lightning.console import format_bytes
from bdh_lightning.data import ByteDataModule
from bdh_lightning.data import litdata as prepared_folders
from bdh_lightning.data import prepare as prepare_module
from bdh_lightning.data.prepare import PrepareData, document_split, prepare_command
from bdh_lightning.errors import DataError, ResourceError, UsageError

litdata = pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the test extra")

T, B = 16, 4


def random_letters(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(97, 123, size=n, dtype=np.uint8).tobytes()


def write_documents(root, count=60, seed=0) -> dict[str, bytes]:
    """`count` files of 300..2000 random letters (any window of T + 1 bytes occurs once)."""
    rng = np.random.default_rng(seed)
    docs = {}
    for i in range(count):
        name = f"d{i // 10}/doc{i:03d}.txt"
        docs[name] = random_letters(int(rng.integers(300, 2000)), seed * 1000 + i)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(docs[name])
    return docs


def prepare(source, output, **settings) -> int:
    options = {k: settings.pop(k) for k in ("text_key", "num_workers", "overwrite") if k in settings}
    data = PrepareData(path=str(source), block_size=settings.pop("block_size", T), **settings)
    return prepare_command(data, str(output), progress=False, **{"num_workers": 2, **options})


@pytest.fixture(autouse=True)
def in_a_folder_of_its_own(tmp_path_factory, monkeypatch):
    """Each test runs in an empty working directory: a mistake that writes beside the process (a relative path) shows,
    and files left there by another run cannot stand in for the ones prepare should find."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared directory for the tests that only read it: 60 documents, 20% validation, 10% test."""
    root = tmp_path_factory.mktemp("prepared")
    docs = write_documents(root / "source")
    assert prepare(root / "source", root / "out", val_fraction=0.2, test_fraction=0.1) == 0
    return SimpleNamespace(source=root / "source", out=root / "out", docs=docs)


def window_bytes(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    return [bytes(row.tolist()) + bytes([int(last)]) for row, last in zip(x, y[:, -1])]


def document_of(window: bytes, docs: dict[str, bytes]) -> str | None:
    """The document a window lies inside (None when it spans two documents)."""
    found = [name for name, raw in docs.items() if window in raw]
    return found[0] if found else None


def test_every_document_goes_whole_to_the_split_its_path_hashes_to(prepared):
    manifest = json.loads((prepared.out / prepared_folders.MANIFEST).read_text())
    expected = {name: document_split(name, 0.2, 0.1) for name in prepared.docs}
    for split in prepared_folders.SPLITS:
        names = [n for n, s in expected.items() if s == split]
        assert manifest["splits"][split]["documents"] == len(names) > 0
        assert manifest["splits"][split]["bytes"] == sum(len(prepared.docs[n]) for n in names)
    # sources.tsv: each source, its bytes and split; the manifest holds its checksum.
    sources = (prepared.out / "sources.tsv").read_text()
    assert sorted(sources.splitlines()) == sorted(f"{len(raw)}\t{expected[n]}\t{n}" for n, raw in prepared.docs.items())
    assert manifest["sources"] == {
        "file": "sources.tsv",
        "count": 60,
        "bytes": sum(map(len, prepared.docs.values())),
        "sha256": hashlib.sha256(sources.encode()).hexdigest(),
    }
    assert manifest["block_size"] == T and not (prepared.out / prepared_folders.INCOMPLETE).exists()
    # What each split's LitData dataset streams back lies inside documents of that split only.
    dm = ByteDataModule(str(prepared.out), block_size=T, batch_size=B, val_windows=40)
    for split, loader in (("validation", dm.val_dataloader()), ("test", dm.test_dataloader())):
        windows = [w for x, y in loader for w in window_bytes(x, y)]
        assert len(windows) == 40
        homes = {document_of(w, prepared.docs) for w in windows} - {None}
        assert homes and {expected[name] for name in homes} == {split}


def test_training_streams_shuffled_windows_of_the_train_split_only(prepared):
    dm = ByteDataModule(str(prepared.out), block_size=T, batch_size=B)
    batches = iter(dm.train_dataloader())
    first = [next(batches) for _ in range(30)]
    x, y = first[0]
    assert x.shape == y.shape == (B, T) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    splits = {
        document_split(n, 0.2, 0.1)
        for x, y in first
        for w in window_bytes(x, y)
        if (n := document_of(w, prepared.docs))
    }
    assert splits == {"train"}
    again = ByteDataModule(str(prepared.out), block_size=T, batch_size=B, seed=7)
    assert not torch.equal(next(iter(again.train_dataloader()))[0], x)  # the seed shuffles
    line = dm.describe()
    assert "\n" not in line and "60 files" in line and "windows of 17 bytes" in line and "test" in line


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_stream_resumes_at_any_batch_even_across_passes(prepared, num_workers):
    def module(step=0):
        dm = ByteDataModule(str(prepared.out), block_size=T, batch_size=8, num_workers=num_workers)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=step, accumulate_grad_batches=1)
        return dm

    stream = module().train_dataloader()
    per_pass = len(stream.loader)
    batches = iter(stream)
    uninterrupted = [next(batches)[0] for _ in range(per_pass + 12)]
    assert not torch.equal(uninterrupted[0], uninterrupted[per_pass])  # each pass is shuffled anew
    for start in (3, per_pass - 1, per_pass, per_pass + 2):
        resumed = iter(module(start).train_dataloader())
        assert all(torch.equal(next(resumed)[0], uninterrupted[start + i]) for i in range(6)), start


class RecordBatches(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(T, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return self.linear(batch[0].float()).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.linear(batch[0].float()).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(path, root, max_steps, ckpt_path=None):
    model = RecordBatches()
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=2, val_check_interval=4, check_val_every_n_epoch=None,
        limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, ByteDataModule(str(path), block_size=T, batch_size=B), ckpt_path=ckpt_path)
    return trainer, model.seen


def test_a_resumed_fit_streams_the_batches_of_an_uninterrupted_one(prepared, tmp_path):
    _, uninterrupted = fit(prepared.out, tmp_path / "a", max_steps=6)
    trainer, first = fit(prepared.out, tmp_path / "b", max_steps=3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    state = torch.load(tmp_path / "step3.ckpt", weights_only=True)["ByteDataModule"]
    assert state["train_batches"] == 6 and state["stream"]["batches"] == 6
    assert state["splits"] == {
        "kind": "prepared",
        "id": json.loads((prepared.out / prepared_folders.MANIFEST).read_text())["sources"]["sha256"],
    }
    _, rest = fit(prepared.out, tmp_path / "c", max_steps=6, ckpt_path=tmp_path / "step3.ckpt")
    assert len(uninterrupted) == 12 and len(first) == 6 and len(rest) == 6
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, first + rest))


def test_ranks_stream_disjoint_shares_of_the_train_split(prepared, monkeypatch):
    from litdata.streaming import dataset as litdata_dataset
    from litdata.utilities.env import _DistributedEnv

    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(
            litdata_dataset._DistributedEnv, "detect", classmethod(lambda cls, r=rank: _DistributedEnv(2, r, 1))
        )
        stream = ByteDataModule(str(prepared.out), block_size=T, batch_size=B).train_dataloader()
        batches = iter(stream)
        per_rank.append({bytes(row.tolist()) for _ in range(len(stream.loader)) for row in next(batches)[0]})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_jsonl_documents_are_lines_split_one_by_one(tmp_path, capsys):
    lines = [{"text": random_letters(200, i).decode(), "id": i} for i in range(80)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    assert prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.25) == 0
    manifest = json.loads((tmp_path / "out" / prepared_folders.MANIFEST).read_text())
    offsets, at = [], 0
    for line in lines:
        offsets.append(at)
        at += len(json.dumps(line)) + 1
    expected = [document_split(f"a.jsonl:{offset}", 0.25, 0.0) for offset in offsets]
    assert manifest["splits"]["validation"]["documents"] == expected.count("validation")
    assert manifest["splits"]["train"]["bytes"] == 200 * expected.count("train")
    assert "prepared" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, match",
    [('{"text": "fine"}\n{"body": "no text"}\n', r"a.jsonl:2 has no 'text' field"),
     ('{"text": "fine"}\nnot json\n', r"a.jsonl:2 is not a JSON object"),
     ('{"text": 5}\n', r"a.jsonl:1: the 'text' field is int, not text")],
)  # fmt: skip
def test_a_bad_jsonl_line_is_one_line_naming_it(tmp_path, content, match):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(DataError, match=match) as error:
        prepare(tmp_path / "a.jsonl", tmp_path / "out", val_fraction=0.5, num_workers=1)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="unfinished prepared directory"):
        ByteDataModule(str(tmp_path / "out"), block_size=T)


def test_text_key_chooses_the_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"body": random_letters(300, i).decode()}) + "\n" for i in range(40))
    )
    assert prepare(tmp_path / "a.jsonl", tmp_path / "out", val_fraction=0.3, text_key="body") == 0


def test_a_killed_prepare_never_loads_as_complete_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    write_documents(tmp_path / "src", count=30)
    real_optimize, calls = litdata.optimize, []

    def killed_at_validation(*args, **kwargs):
        calls.append(kwargs["output_dir"])
        if kwargs["output_dir"].endswith("validation"):
            raise KeyboardInterrupt  # what a kill leaves: train finished, validation half-written or not at all
        return real_optimize(*args, **kwargs)

    monkeypatch.setattr(litdata, "optimize", killed_at_validation)
    ctrl_c = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.3)
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # optimize's handler (it swallows Ctrl-C) is not left behind
    (tmp_path / "out" / "validation").mkdir(exist_ok=True)
    (tmp_path / "out" / "validation" / "chunk-0-0.bin").write_bytes(b"half")
    with pytest.raises(DataError, match="unfinished prepared directory.*run prepare again"):
        ByteDataModule(str(tmp_path / "out"), block_size=T)
    monkeypatch.setattr(litdata, "optimize", lambda *a, **k: (calls.append(k["output_dir"]), real_optimize(*a, **k)))
    calls.clear()
    assert prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.3) == 0
    assert [os.path.basename(c) for c in calls] == ["validation"]  # train was kept, validation redone
    assert not (tmp_path / "out" / "validation" / "chunk-0-0.bin").read_bytes() == b"half"
    dm = ByteDataModule(str(tmp_path / "out"), block_size=T, batch_size=B)
    assert len(list(dm.val_dataloader())) > 0
    # Other settings with an unfinished directory: it starts again.
    (tmp_path / "out" / prepared_folders.INCOMPLETE).write_text(
        json.dumps({"plan": "another", "finished": {"train": {}}})
    )
    calls.clear()
    assert prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.3) == 0
    assert [os.path.basename(c) for c in calls] == ["train", "validation"]


def test_output_is_never_someone_elses_directory(tmp_path, prepared):
    write_documents(tmp_path / "src", count=20)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not empty"):
        prepare(tmp_path / "src", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    copy = tmp_path / "copy"
    shutil.copytree(prepared.out, copy)
    with pytest.raises(UsageError, match="already a prepared directory.*--overwrite"):
        prepare(tmp_path / "src", copy)
    assert prepare(tmp_path / "src", copy, overwrite=True) == 0
    assert json.loads((copy / prepared_folders.MANIFEST).read_text())["sources"]["count"] == 20
    with pytest.raises(UsageError, match="inside data.path"):
        prepare(tmp_path / "src", tmp_path / "src" / "out")
    with pytest.raises(UsageError, match="local directory"):
        prepare(tmp_path / "src", "s3://bucket/out")
    with pytest.raises(DataError, match="already a prepared directory; give the source"):
        prepare(copy, tmp_path / "again")


def test_a_split_without_documents_is_refused_before_any_work(tmp_path):
    (tmp_path / "one.txt").write_bytes(random_letters(5000, 1))
    with pytest.raises(DataError, match="the validation split gets none of the 1 documents.*raise data.val_fraction"):
        prepare(tmp_path / "one.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def copy_of(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared.out, copy)
    return copy


def edit_manifest(folder, **changes):
    path = folder / prepared_folders.MANIFEST
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        target = manifest
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(manifest))


def one_line_data_error(match, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as error:
        ByteDataModule(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_prepared_directories_are_one_line_each(copy_of):
    one_line_data_error(
        r"prepared for data.block_size 16 \(windows of 17 bytes\), not 32.*--data.block_size 16",
        str(copy_of),
        block_size=32,
    )
    one_line_data_error("holds its own test split", str(copy_of), block_size=T, test_fraction=0.1)
    chunk = sorted((copy_of / "train").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    one_line_data_error(
        rf"train is missing 1 of its \d+ chunks or has them cut short \(e.g. {chunk.name}\)", str(copy_of), block_size=T
    )
    chunk.unlink()
    one_line_data_error("missing 1 of its", str(copy_of), block_size=T)
    edit_manifest(copy_of, version=99)
    one_line_data_error("prepared by another version of bdh-lightning.*format 99", str(copy_of), block_size=T)
    edit_manifest(
        copy_of,
        version=prepared_folders.FORMAT_VERSION,
        **{"splits.validation.windows": 0, "splits.validation.documents": 0},
    )
    one_line_data_error("the validation split of .* is empty", str(copy_of), block_size=T)
    (copy_of / prepared_folders.MANIFEST).unlink()
    one_line_data_error("has no bdh_prepared.json", str(copy_of), block_size=T)


DELETED = object()


def mutations(value) -> dict:
    """Values that break a field of the kind `value` is: deleted, another type, NaN, negative, huge."""
    out = {"deleted": DELETED, "a list": [], "a mapping": {"?": []}, "NaN": math.nan, "negative": -1,
           "huge": 10**30, "a fraction": 1.5}  # fmt: skip
    if not isinstance(value, str):
        out["text"] = "x"
    if not isinstance(value, bool):
        out["true"] = True
    return {name: new for name, new in out.items() if new is DELETED or json.dumps(new) != json.dumps(value)}


def fields(value, path=()):
    """The path of every field below `value` (mapping keys and list items), parents first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield (*path, key)
        yield from fields(inner, (*path, key))


def mutated(document, path, new):
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if new is DELETED and isinstance(target, dict):
        del target[path[-1]]
    elif new is not DELETED:
        target[path[-1]] = new
    else:
        return None  # list items are not deleted (a shorter list is the count check's case)
    return copy


def test_every_field_of_a_damaged_manifest_or_index_is_one_line(copy_of):
    """Fuzz: every field of the manifest and of a split's index.json deleted, of another type, NaN, negative or huge:
    refused in one line naming the field (never a KeyError or AttributeError), or, for the index fields LitData
    does not need, read as before."""
    manifest_file, index_file = copy_of / prepared_folders.MANIFEST, copy_of / "train" / "index.json"
    manifest, index = json.loads(manifest_file.read_text()), json.loads(index_file.read_text())
    cases = [(manifest_file, manifest, path) for path in fields(manifest)]
    cases += [(index_file, index, path) for path in fields(index)]
    tried = 0
    for file, document, path in cases:
        for name, value in mutations(eval_path(document, path)).items():
            broken = mutated(document, path, value)
            if broken is None:
                continue
            file.write_text(json.dumps(broken))
            where = f"{file.name} {'.'.join(map(str, path))} {name}"
            tried += 1
            try:
                dm = ByteDataModule(str(copy_of), block_size=T, batch_size=B)
            except DataError as error:
                message = str(error)
                assert "\n" not in message, where
                if path[0] in ("format", "version"):  # their own lines: not a manifest, another version
                    assert "manifest" in message or "another version" in message, (where, message)
                else:
                    assert message.startswith("this prepared folder is damaged: "), (where, message)
                    assert message.endswith(f"re-run prepare (data.path {copy_of})"), (where, message)
                continue
            finally:
                file.write_text(json.dumps(document))
            # Accepted: only where LitData does not read the field (or may do without it), and then it streams.
            config = prepared_folders.INDEX_SCHEMA["config"]
            optional = name == "deleted" and isinstance(config.get(path[-1]), prepared_folders.Absent)
            read = path[:1] == ("chunks",) or path == ("config",) or (path[0] == "config" and path[1] in config)
            assert file == index_file and (not read or optional), where
            file.write_text(json.dumps(broken))
            x, y = next(iter(dm.train_dataloader()))
            assert x.shape == (B, T), where
            file.write_text(json.dumps(document))
    assert tried > 300


def eval_path(document, path):
    for key in path:
        document = document[key]
    return document


def test_a_damaged_manifest_is_exit_2_and_one_line_on_the_command_line(copy_of, capsys):
    from bdh_lightning.main import main

    edit_manifest(copy_of, splits=[])  # a list where a mapping belongs
    code = main(["fit", "--data.path", str(copy_of), "--data.block_size", str(T), "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "this prepared folder is damaged: bdh_prepared.json.splits should be a mapping, not []" in err, err


def test_a_full_disk_or_an_unwritable_folder_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A disk without room for the chunks (refused before packing: LitData 0.2.76 waits forever for a chunk its writer
    failed to write), a full disk while the manifest is written, and an output that cannot be made: one line naming
    the path, and nothing of the run left (a folder prepare made goes; one that was there stays, empty)."""
    from bdh_lightning.files import write_failure

    docs = write_documents(tmp_path / "src", count=20)
    real_usage = shutil.disk_usage
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
        with pytest.raises(ResourceError) as error:
            prepare(tmp_path / "src", tmp_path / "out", num_workers=1)
    assert str(error.value) == (
        f"prepare needs about {format_bytes(sum(len(d) for d in docs.values()))} in {tmp_path / 'out'} but its disk has "
        "1000 B free; free some space or choose another --output"
    )
    assert not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    real_write = prepare_module.write_atomically

    def manifest_on_a_full_disk(path, data, what=None):
        if str(path).endswith(prepared_folders.MANIFEST):
            raise write_failure(str(path), OSError(errno.ENOSPC, "No space left on device"))
        return real_write(path, data, what)

    monkeypatch.setattr(prepare_module, "write_atomically", manifest_on_a_full_disk)
    with pytest.raises(ResourceError, match="cannot write .*bdh_prepared.json \\(No space left on device\\)"):
        prepare(tmp_path / "src", tmp_path / "out", num_workers=1)
    assert list((tmp_path / "out").iterdir()) == []  # the folder was there before: kept, empty

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ResourceError) as error:
        prepare(tmp_path / "src", tmp_path / "file" / "out", num_workers=1)
    assert str(error.value) == (
        f"cannot write {tmp_path / 'file' / 'out'} (Not a directory); nothing was left in {tmp_path / 'file' / 'out'}"
    )
    assert (tmp_path / "file").read_text() == "not a folder"


def test_without_a_test_split_test_refuses(tmp_path):
    write_documents(tmp_path / "src", count=20)
    prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.3)
    dm = ByteDataModule(str(tmp_path / "out"), block_size=T, batch_size=B)
    assert "no test split" in dm.describe()
    with pytest.raises(DataError, match="no test split"):
        dm.setup("test")


def test_an_object_storage_url_without_credentials_is_one_line(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)

    def no_network(*args, **kwargs):
        raise AssertionError("a test must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    message = one_line_data_error(
        "cannot read s3://bucket/corpus/bdh_prepared.json .*no credentials were found",
        "s3://bucket/corpus",
        block_size=T,
    )
    assert "AWS_ACCESS_KEY_ID" in message


def test_without_litdata_prepare_and_prepared_paths_say_how_to_install_it(prepared, monkeypatch):
    real_import = builtins.__import__

    def without_litdata(name, *args, **kwargs):
        if name == "litdata" or name.startswith("litdata."):
            raise ModuleNotFoundError("No module named 'litdata'", name="litdata")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_litdata)
    monkeypatch.delitem(sys.modules, "litdata")
    for call in (lambda: ByteDataModule(str(prepared.out), block_size=T), lambda: prepare(prepared.source, "unused")):
        with pytest.raises(
            DataError,
            match=r"needs LitData, which is not installed; install it with pip install 'bdh-lightning\[stream\]'",
        ):
            call()


def test_the_progress_bar_counts_bytes(tmp_path, capsys):
    write_documents(tmp_path / "src", count=20)
    data = PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3)
    assert prepare_command(data, str(tmp_path / "out"), num_workers=1) == 0
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "B/s" in err and "/s of source); train with --data.path" in err


def test_the_split_hash_is_stable():
    # Fixed values: a change here would move documents between the splits of directories already prepared.
    assert [document_split(f"doc{i}.txt", 0.1, 0.1) for i in range(8)] == [
        document_split(f"doc{i}.txt", 0.1, 0.1) for i in range(8)
    ]
    u = int.from_bytes(hashlib.blake2b(b"doc0.txt", digest_size=8).digest(), "big") / 2**64
    assert document_split("doc0.txt", 0.1, 0.1) == ("test" if u < 0.1 else "validation" if u < 0.2 else "train")


def test_units_group_small_files_and_cut_large_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 1000)
    files = [str(tmp_path / f"f{i}") for i in range(4)]
    units, documents, splits = prepare_module.plan_units(files, [400, 400, 2500, 100], str(tmp_path), 0.0, 0.0)
    assert splits == ["train"] * 4 and documents["train"] == 4
    pieces = [[(os.path.basename(f), start, length) for f, start, length in unit[1]] for unit in units["train"]]
    assert pieces == [[("f0", 0, 400), ("f1", 0, 400)], [("f2", 0, 1000)], [("f2", 1000, 1000)],
                      [("f2", 2000, 500), ("f3", 0, 100)]]  # fmt: skip


def test_prepare_and_fit_through_the_real_command_line(tmp_path, monkeypatch, capsys):
    """prepare from a shell (its workers, its progress in a log file); the refusal and the fit through `main`."""
    from conftest import TINY_ARGS, run_cli

    from bdh_lightning.main import main

    write_documents(tmp_path / "src", count=40)
    done = run_cli(tmp_path, "prepare", "--data.path", "src", "--output", "out", "--data.block_size", "32",
                   "--data.val_fraction", "0.2", "--data.test_fraction", "0.1", "--num_workers", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-2].startswith("prepare: 100%") and "B/s" in lines[-2]  # a log file gets lines, not redraws
    assert lines[-1].startswith(f"prepared {tmp_path / 'out'}: train ") and "--data.block_size 32" in lines[-1]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    again = main(["prepare", "--data.path", "src", "--output", "out", "--data.block_size", "32"])
    refused = f"error: --output {tmp_path / 'out'} is already a prepared directory"
    assert again == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"{refused}; give another --output, or --overwrite to replace it"
    ]
    assert main(["fit", "--data.path", "out", *TINY_ARGS, "--trainer.max_steps", "6"]) == 0
    assert list((tmp_path / "lightning_logs").glob("version_*/checkpoints/last.ckpt"))


def test_two_cpu_ranks_stream_disjoint_windows_of_a_prepared_directory(tmp_path):
    """Real DDP (two gloo processes): LitData shards the training windows between the ranks; validation too."""
    from conftest import run_cli

    write_documents(tmp_path / "src", count=40)
    prepare(tmp_path / "src", tmp_path / "out", block_size=32, val_fraction=0.25)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 8
  val_check_interval: 4
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: recorders.WindowRecorder
      init_args: {{out_dir: {tmp_path / "seen"}}}
model: {{n_layer: 1, n_embd: 32, n_head: 2, mlp_internal_dim_multiplier: 4}}
data: {{path: out, block_size: 32, batch_size: 8, val_windows: 8}}
""")
    fit = run_cli(tmp_path, "fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 8
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    val0, val1 = set(ranks[0]["val"]), set(ranks[1]["val"])
    assert len(val0) == len(val1) == 4 and not val0 & val1


def test_every_input_safe_overwrite_that_fails_keeps_the_old_prepared_folder(tmp_path, prepared, monkeypatch):
    """--overwrite builds the new folder beside the old one: a full disk while it is written leaves the old prepared
    folder exactly as it was (it still loads) and nothing beside it; a finished one replaces it."""
    from bdh_lightning.files import write_failure

    write_documents(tmp_path / "src", count=20)
    copy = tmp_path / "copy"
    shutil.copytree(prepared.out, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    real_write = prepare_module.write_atomically

    def manifest_on_a_full_disk(path, data, what=None):
        if str(path).endswith(prepared_folders.MANIFEST):
            raise write_failure(str(path), OSError(errno.ENOSPC, "No space left on device"))
        return real_write(path, data, what)

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "write_atomically", manifest_on_a_full_disk)
        with pytest.raises(ResourceError, match="No space left on device"):
            prepare(tmp_path / "src", copy, overwrite=True, num_workers=1)
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "src"]  # no half-built folder beside it
    assert prepare(tmp_path / "src", copy, overwrite=True, num_workers=1) == 0
    assert json.loads((copy / prepared_folders.MANIFEST).read_text())["sources"]["count"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "src"]
    assert not [p for p in copy.rglob(".old-*")]


# Packer runs inside LitData's worker processes; these call it here, on a few small files, and check what it yields.
def packer(tmp_path, units, split="train", val_fraction=0.0, test_fraction=0.0, text_key="text"):
    import multiprocessing

    error_file = str(tmp_path / prepare_module.ERROR)
    read, kept = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
    return prepare_module.Packer(units, split, val_fraction, test_fraction, text_key, error_file, read, kept)


def packed(packer, index) -> list[bytes]:
    out = list(packer(index))
    assert all(a.dtype == np.uint8 and a.ndim == 1 for a in out)
    return [a.tobytes() for a in out]


def test_a_files_unit_is_its_pieces_bytes_in_order_and_counts_them(tmp_path):
    raw = [random_letters(500, 11), random_letters(300, 12)]
    for i, data in enumerate(raw):
        (tmp_path / f"f{i}").write_bytes(data)
    f0, f1 = str(tmp_path / "f0"), str(tmp_path / "f1")
    units = [("files", [(f1, 0, 300)]), ("files", [(f0, 120, 250), (f1, 7, 93), (f0, 0, 1)])]
    p = packer(tmp_path, units)
    assert packed(p, 1) == [raw[0][120:370] + raw[1][7:100] + raw[0][:1]]
    assert p.bytes_read.value == 344 and p.documents.value == 0  # whole files are counted when planned
    assert packed(p, 0) == [raw[1]]
    assert p.bytes_read.value == 644 and not (tmp_path / prepare_module.ERROR).exists()


def test_a_file_shorter_than_planned_writes_one_line_and_yields_nothing(tmp_path):
    (tmp_path / "a").write_bytes(random_letters(100, 1))
    (tmp_path / "b").write_bytes(random_letters(50, 2))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = packer(tmp_path, [("files", [(a, 0, 100), (b, 10, 41), (a, 0, 10)])])
    assert packed(p, 0) == []
    assert p.bytes_read.value == 100  # the whole first piece, nothing of the short one
    assert (tmp_path / prepare_module.ERROR).read_text() == (
        f"data file {b} changed while it was being prepared (it is shorter than listed); prepare again"
    )
    # The first error wins: a second failing unit leaves the file as it is.
    packed(packer(tmp_path, [("files", [(a, 90, 11)])]), 0)
    assert (tmp_path / prepare_module.ERROR).read_text().startswith(f"data file {b} changed")


def jsonl_file(tmp_path, lines: list[str], name="docs.jsonl"):
    """A .jsonl of `lines` (each written with its newline); the offset of each line."""
    path = tmp_path / name
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass"))
    offsets, at = [], 0
    for line in lines:
        offsets.append(at)
        at += len((line + "\n").encode("utf-8", "surrogatepass"))
    return str(path), offsets


def test_a_jsonl_unit_keeps_the_lines_of_its_split_from_its_range_only(tmp_path):
    texts = [random_letters(int(n), i).decode() for i, n in enumerate(np.random.default_rng(5).integers(5, 40, 60))]
    texts[3] = "caf\u00e9 \u2014 \U0001f600 and a lone \ud800"  # non-ASCII text, a lone surrogate (kept as is)
    lines = [json.dumps({"text": t, "n": i}) for i, t in enumerate(texts)]
    lines.insert(10, "   ")  # blank lines are no documents of any split
    texts.insert(10, None)
    path, offsets = jsonl_file(tmp_path, lines)
    first, last = 2, 50  # a range starting and ending at line starts inside the file
    start, end = offsets[first], offsets[last]
    unit = ("jsonl", path, start, end, "sub/docs.jsonl")
    expected = {split: b"" for split in prepare_module.SPLITS}
    counts = dict.fromkeys(prepare_module.SPLITS, 0)
    for i in range(first, last):
        if texts[i] is not None:
            split = document_split(f"sub/docs.jsonl:{offsets[i]}", 0.3, 0.2)
            expected[split] += texts[i].encode("utf-8", "surrogatepass")
            counts[split] += 1
    assert all(counts.values())
    for split in prepare_module.SPLITS:
        p = packer(tmp_path, [("files", []), unit], split=split, val_fraction=0.3, test_fraction=0.2)
        assert packed(p, 1) == [expected[split]], split
        assert p.documents.value == counts[split] and p.bytes_read.value == end - start
    assert "\ud800".encode("utf-8", "surrogatepass") in b"".join(expected.values())


def test_a_jsonl_unit_without_lines_of_its_split_yields_nothing(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(20)]
    path, offsets = jsonl_file(tmp_path, lines)
    splits = [document_split(f"x.jsonl:{o}", 0.5, 0.0) for o in offsets]
    assert "validation" in splits and "train" in splits
    p = packer(tmp_path, [("jsonl", path, 0, offsets[-1] + len(lines[-1]) + 1, "x.jsonl")], split="test",
               val_fraction=0.5)  # fmt: skip
    assert packed(p, 0) == [] and p.documents.value == 0 and p.bytes_read.value == os.path.getsize(path)
    assert not (tmp_path / prepare_module.ERROR).exists()


@pytest.mark.parametrize(
    "bad, text_key, message",
    [('{"body": "no text"}', "text", "has no 'text' field; fix it, or choose the field with --text_key"),
     ('{"text": "no body"}', "body", "has no 'body' field; fix it, or choose the field with --text_key"),
     ("not json", "text", "is not a JSON object; fix it, or choose the field with --text_key"),
     ('["a", "list"]', "text", "is not a JSON object; fix it, or choose the field with --text_key"),
     ('"text"', "text", "is not a JSON object; fix it, or choose the field with --text_key"),
     ('{"text": 5}', "text", ": the 'text' field is int, not text"),
     ('{"body": null}', "body", ": the 'body' field is NoneType, not text"),
     ('{"text": ["a"]}', "text", ": the 'text' field is list, not text")],
)  # fmt: skip
def test_a_bad_jsonl_line_ends_its_unit_with_one_line_naming_file_and_line(tmp_path, bad, text_key, message):
    good = json.dumps({text_key: "fine"})
    lines = [good] * 3 + [bad] + [good] * 2
    path, offsets = jsonl_file(tmp_path, lines)
    p = packer(tmp_path, [("jsonl", path, offsets[1], os.path.getsize(path), "d.jsonl")], text_key=text_key)
    assert packed(p, 0) == []
    # line 4 of the file (counted from the file's start, not the range's); the lines before it are not counted
    separator = "" if message.startswith(":") else " "
    assert (tmp_path / prepare_module.ERROR).read_text() == f"{path}:4{separator}{message}"
    assert p.documents.value == 0 and p.bytes_read.value == os.path.getsize(path) - offsets[1]


def test_a_packing_workers_traceback_is_one_line_of_its_last_words():
    error = RuntimeError(
        "Worker 0 failed:\n\nTraceback (most recent call last):\n  File x, line 3\n  OSError: boom \n.\n \n"
    )
    assert str(prepare_module.worker_failure(error, "validation")) == (
        "packing the validation split failed (OSError: boom); fix it and run prepare again"
    )
    assert str(prepare_module.worker_failure(RuntimeError(""), "train")) == (
        "packing the train split failed (); fix it and run prepare again"
    )
    assert isinstance(prepare_module.worker_failure(RuntimeError("x"), "train"), DataError)


def test_the_split_fractions_are_half_open_intervals_of_the_hash():
    """A hash exactly at a fraction's edge goes to the split above it: test is [0, t), validation [t, t + v)."""
    u = int.from_bytes(hashlib.blake2b(b"doc0.txt", digest_size=8).digest(), "big") / 2**64
    assert document_split("doc0.txt", 0.0, u) == "train" and document_split("doc0.txt", 0.0, u + 1e-12) == "test"
    assert document_split("doc0.txt", u, 0.0) == "train" and document_split("doc0.txt", u + 1e-12, 0.0) == "validation"


def test_a_path_that_is_not_utf_8_hashes_by_its_bytes():
    """os.fsdecode turns undecodable bytes into lone surrogates; the hash reads the path's original bytes."""
    name = os.fsdecode(b"caf\xe9.txt")
    u = int.from_bytes(hashlib.blake2b(b"caf\xe9.txt", digest_size=8).digest(), "big") / 2**64
    assert document_split(name, 0.0, u) == "train" and document_split(name, 0.0, u + 1e-12) == "test"


@pytest.mark.parametrize(
    "unit, ranges",
    [(10, [(0, 21), (21, 35), (35, 37)]),  # cut at the first line start after each unit's end
     (33, [(0, 35), (35, 37)]),
     (36, [(0, 37)]),  # the unit ends inside the last line: one range
     (37, [(0, 37)]),
     (4, [(0, 5), (5, 21), (21, 35), (35, 37)]),  # a unit ending on a newline: the next line starts a range
     (5, [(0, 21), (21, 35), (35, 37)])],  # a unit ending on a line start: that whole line goes with it
)  # fmt: skip
def test_jsonl_ranges_start_at_line_starts_and_cover_the_file(tmp_path, monkeypatch, unit, ranges):
    data = b"0123\n" + b"5\xff\xfe\r9abcdefghij\n" + b"kl\n" + b"mnopqrstuv\n" + b"w\n"  # not UTF-8, a lone \r
    assert len(data) == 37 and [i for i, c in enumerate(data) if c == 10] == [4, 20, 23, 34, 36]
    (tmp_path / "a.jsonl").write_bytes(data)
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", unit)
    assert prepare_module.jsonl_ranges(str(tmp_path / "a.jsonl"), 37) == ranges


def test_swap_in_moves_the_new_entries_in_and_the_old_ones_out_with_the_build(tmp_path, monkeypatch):
    output, built = tmp_path / "out", tmp_path / "out.new"
    for folder, tag in ((output, "old"), (built, "new")):
        for split in ("train", "validation"):
            (folder / split).mkdir(parents=True)
            (folder / split / "chunk-0-0.bin").write_text(f"{tag} {split}")
        (folder / prepared_folders.MANIFEST).write_text(f"{tag} manifest")
        (folder / "sources.tsv").write_text(f"{tag} sources")
    (output / "test").mkdir()  # the old folder had a test split, the new one has none
    (output / "test" / "chunk-0-0.bin").write_text("old test")
    (output / "notes.txt").write_text("not prepare's")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing lands in the working directory
    prepare_module.swap_in(str(built), str(output))
    assert {str(p.relative_to(output)): p.read_text() for p in output.rglob("*") if p.is_file()} == {
        "train/chunk-0-0.bin": "new train",
        "validation/chunk-0-0.bin": "new validation",
        prepared_folders.MANIFEST: "new manifest",
        "sources.tsv": "new sources",
        "notes.txt": "not prepare's",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"] and not list((tmp_path / "cwd").iterdir())


def test_a_build_folder_that_cannot_be_removed_does_not_fail_a_finished_swap(tmp_path, monkeypatch):
    output, built = tmp_path / "out", tmp_path / "out.new"
    for folder in (output, built):
        (folder / "train").mkdir(parents=True)
        (folder / prepared_folders.MANIFEST).write_text(folder.name)
    real_rmdir = os.rmdir

    def refused(path, *args, **kwargs):
        if os.path.basename(str(path)) == "out.new":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", refused)
    prepare_module.swap_in(str(built), str(output))
    assert (output / prepared_folders.MANIFEST).read_text() == "out.new"


def test_a_progress_line_is_bytes_done_of_all_with_rate_and_time_left():
    import multiprocessing
    import time

    bar = prepare_module.Progress(242000, multiprocessing.Value("q", 115000), enabled=False)
    bar.close()
    bar.started = time.monotonic() - 10
    assert bar.line() == "prepare:  48% 115k/242k [00:10<00:11, 11.5kB/s]"


def marker(folder, state) -> None:
    (folder / prepared_folders.INCOMPLETE).write_text(state if isinstance(state, str) else json.dumps(state))


def test_claim_output_resumes_only_the_same_plan_and_says_what_it_keeps(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as error:
        prepare_module.claim_output(str(tmp_path / "file"), "plan", False)
    assert str(error.value) == f"--output {tmp_path / 'file'} is a file; give a new or empty directory"
    for split in prepared_folders.SPLITS:
        (out / split).mkdir(parents=True)
    marker(out, {"plan": "plan", "finished": {"train": {"bytes": 5}, "test": {"bytes": 1}}})
    assert prepare_module.claim_output(str(out), "plan", False) == {"train": {"bytes": 5}, "test": {"bytes": 1}}
    assert capsys.readouterr().err == f"prepare: resuming the unfinished run in {out} (kept: train, test)\n"
    assert sorted(p.name for p in out.iterdir()) == [prepared_folders.INCOMPLETE, "test", "train"]  # validation redone
    marker(out, {"plan": "plan"})  # nothing finished yet
    assert prepare_module.claim_output(str(out), "plan", False) == {}
    assert capsys.readouterr().err == f"prepare: resuming the unfinished run in {out} (kept: nothing)\n"
    assert json.loads((out / prepared_folders.INCOMPLETE).read_text()) == {"plan": "plan", "finished": {}}
    assert sorted(p.name for p in out.iterdir()) == [prepared_folders.INCOMPLETE]
    for state in ({"plan": "another", "finished": {"train": {}}}, "{not json", {"plan": "plan", "finished": {}}):
        (out / "train").mkdir()
        marker(out, state)
        overwrite = state == {"plan": "plan", "finished": {}}  # --overwrite starts the same plan again too
        assert prepare_module.claim_output(str(out), "plan", overwrite) == {}
        assert capsys.readouterr().err == (
            f"prepare: {out} holds an unfinished run of other sources or settings; starting again\n"
        )
        assert sorted(p.name for p in out.iterdir()) == [prepared_folders.INCOMPLETE]


def test_the_manifest_records_the_settings_sources_and_the_utc_time(tmp_path, monkeypatch):
    import datetime
    import time

    monkeypatch.setenv("TZ", "Etc/GMT-5")  # five hours east of UTC: local time is not what the manifest says
    time.tzset()
    try:
        data = PrepareData(path="src", block_size=8, val_fraction=0.25, test_fraction=0.125, exclude=["*.md"])
        listing = SimpleNamespace(files=["a", "b"], sizes=np.array([3, 4]), left_out={"hidden": 2})
        plan = prepare_module.Plan(listing, {}, {}, "", "abc", "digest")
        manifest = prepare_module.manifest_of(data, plan, "body", {"train": {}}, "9.9")
        now = datetime.datetime.now(datetime.timezone.utc)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    created = datetime.datetime.strptime(manifest.pop("created"), "%Y-%m-%dT%H:%M:%SZ")
    assert abs((created.replace(tzinfo=datetime.timezone.utc) - now).total_seconds()) < 60
    assert manifest == {
        "format": prepared_folders.FORMAT, "version": prepared_folders.FORMAT_VERSION, "block_size": 8,
        "source": {"path": "src", "exclude": ["*.md"], "include_hidden": False, "text_key": "body"},
        "val_fraction": 0.25, "test_fraction": 0.125,
        "sources": {"file": "sources.tsv", "count": 2, "bytes": 7, "sha256": "abc"},
        "left_out": {"hidden": 2}, "splits": {"train": {}}, "litdata": "9.9",
    }  # fmt: skip


def test_claim_output_refuses_a_prepared_or_foreign_folder_and_overwrite_clears_only_its_own(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / prepared_folders.MANIFEST).write_text("{}")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError) as error:
        prepare_module.claim_output(str(out), "plan", False)
    assert str(error.value) == (
        f"--output {out} is already a prepared directory; give another --output, or --overwrite to replace it"
    )
    assert prepare_module.claim_output(str(out), "plan", True) == {}
    assert sorted(p.name for p in out.iterdir()) == [prepared_folders.INCOMPLETE, "notes.txt"]
    with pytest.raises(UsageError) as error:
        prepare_module.claim_output(str(tmp_path), "plan", False)
    assert str(error.value) == (
        f"--output {tmp_path} exists and is not empty; give a new or empty directory (prepare deletes only its own "
        "output)"
    )


def test_json_files_are_written_indented_by_one_space(tmp_path):
    prepare_module.write_json(str(tmp_path / "a.json"), {"plan": "p", "finished": {"train": {"bytes": 1}}})
    assert (tmp_path / "a.json").read_text() == (
        '{\n "plan": "p",\n "finished": {\n  "train": {\n   "bytes": 1\n  }\n }\n}'
    )


def test_split_stats_of_an_absent_split_are_zeros(tmp_path):
    assert prepare_module.split_stats(str(tmp_path / "none"), 17) == {"bytes": 0, "windows": 0, "chunks": 0}
    (tmp_path / "index.json").write_text(json.dumps({"chunks": [{"dim": 40}, {"dim": None}, {"dim": 17}]}))
    assert prepare_module.split_stats(str(tmp_path), 17) == {"bytes": 57, "windows": 3, "chunks": 3}


class Ticks:
    """A stand-in for Progress's stop event: `wait` says 'not yet' `n` times, then 'stop'; it records the waits."""

    def __init__(self, n: int):
        self.n, self.waits = n, []

    def wait(self, timeout):
        self.waits.append(timeout)
        self.n -= 1
        return self.n < 0

    def set(self):
        pass


class FakeStderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty, self.flushes = tty, 0

    def isatty(self):
        return self.tty

    def flush(self):
        self.flushes += 1


def progress(monkeypatch, tty: bool, enabled: bool, done: int, total: int, ticks: int):
    """A Progress drawn on a fake stderr whose thread is not started: the test runs its loop for `ticks` ticks."""
    import multiprocessing
    import threading

    stderr, threads = FakeStderr(tty), []

    def thread(target, daemon):
        threads.append((target, daemon))
        return SimpleNamespace(start=lambda: threads.append("started"), join=lambda: None)

    monkeypatch.setattr(sys, "stderr", stderr)
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Thread", thread)
        bar = prepare_module.Progress(total, multiprocessing.Value("q", done), enabled)
    assert threads == [(bar.run, True), "started"]  # a daemon: it never keeps the process alive
    bar.done = Ticks(ticks)
    bar.run()
    assert bar.done.waits == [0.5] * (ticks + 1)  # it looks twice a second
    return bar, stderr


def test_a_log_file_gets_a_progress_line_every_log_every_seconds_and_one_at_the_end(monkeypatch):
    import time

    # A clock that stands still: a line is due once LOG_EVERY seconds (here 0) have passed, not only after more.
    monkeypatch.setattr(prepare_module, "time", SimpleNamespace(monotonic=lambda: 5.0, strftime=time.strftime))
    monkeypatch.setattr(prepare_module.Progress, "LOG_EVERY", 0.0)
    bar, stderr = progress(monkeypatch, tty=False, enabled=True, done=1000, total=4000, ticks=2)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("prepare:  25% 1.00k/4.00k [") for line in lines)
    assert stderr.flushes == 2  # each line reaches a log file as it is written
    bar.counter.value = 4000
    bar.close()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("prepare: 100% 4.00k/4.00k [") and stderr.flushes == 3
    monkeypatch.setattr(prepare_module.Progress, "LOG_EVERY", 10.0)
    _, stderr = progress(monkeypatch, tty=False, enabled=True, done=1000, total=4000, ticks=2)
    assert stderr.getvalue() == ""  # within 10 s: no line yet
    monkeypatch.setattr(prepare_module.Progress, "LOG_EVERY", 0.0)
    bar, stderr = progress(monkeypatch, tty=False, enabled=False, done=1000, total=4000, ticks=2)
    bar.close()
    assert stderr.getvalue() == ""  # --progress false: nothing at all


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch):
    bar, stderr = progress(monkeypatch, tty=True, enabled=True, done=3000, total=4000, ticks=1)
    assert bar.bar.n == 3000 and "\rprepare:  75%|" in stderr.getvalue() and "| 3.00k/4.00k [" in stderr.getvalue()
    bar.counter.value = 4000
    bar.close()
    assert "\rprepare: 100%|" in stderr.getvalue() and "| 4.00k/4.00k [" in stderr.getvalue()
    assert re.search(r"\| 4\.00k/4\.00k \[[^]]*\d[kMG]?B/s\]", stderr.getvalue())  # bytes: kB/s, MB/s
    assert "% 4.00k" not in stderr.getvalue()  # no log line (a bar has | after the percentage)
    bar, stderr = progress(monkeypatch, tty=True, enabled=False, done=3000, total=4000, ticks=1)
    bar.close()
    assert stderr.getvalue() == ""


@pytest.mark.parametrize(
    "settings, workers, error, message",
    [(dict(block_size=0), 0, DataError, "data.block_size must be a positive integer, got 0"),
     (dict(val_fraction=0.0), 0, DataError, "data.val_fraction must be in (0, 1), got 0.0"),
     (dict(val_fraction=1.0), 0, DataError, "data.val_fraction must be in (0, 1), got 1.0"),
     (dict(test_fraction=-0.1), 0, DataError, "data.test_fraction must be in [0, 1), got -0.1"),
     (dict(test_fraction=1.0), 0, DataError, "data.test_fraction must be in [0, 1), got 1.0"),
     (dict(val_fraction=0.75, test_fraction=0.25), 0, DataError,
      "data.val_fraction + data.test_fraction must be below 1 (training needs documents too), got 0.75 + 0.25"),
     ({}, -1, UsageError, "--num_workers must be a non-negative integer (0 = one per core), got -1"),
     ({}, 1.5, UsageError, "--num_workers must be a non-negative integer (0 = one per core), got 1.5")],
)  # fmt: skip
def test_bad_prepare_settings_are_refused_word_for_word(tmp_path, settings, workers, error, message):
    with pytest.raises(error) as raised:
        prepare_module.check_request(PrepareData(path=str(tmp_path), **settings), str(tmp_path / "out"), workers)
    assert str(raised.value) == message


def test_the_output_is_a_full_local_path_outside_a_source_folder(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    check = prepare_module.check_request
    assert check(PrepareData(path="src", val_fraction=0.5, test_fraction=0.49), "out", 0) == str(tmp_path / "out")
    assert check(PrepareData(path="src"), "~/out", 0) == str(tmp_path / "home" / "out")
    assert check(PrepareData(path="src/a.txt"), "src/out", 0) == str(tmp_path / "src" / "out")  # beside a file: fine
    assert check(PrepareData(path="src/*.txt"), "src/out", 0) == str(tmp_path / "src" / "out")  # a glob's folder too
    with pytest.raises(UsageError) as raised:
        check(PrepareData(path="src"), "src/out", 0)
    assert str(raised.value) == (
        f"--output {tmp_path / 'src' / 'out'} is inside data.path 'src'; write it somewhere else (a re-run would read "
        "it as source)"
    )
    with pytest.raises(UsageError) as raised:
        check(PrepareData(path="src"), "s3://bucket/out", 0)
    assert str(raised.value) == (
        "--output s3://bucket/out: prepare writes to a local directory; copy it to object storage afterwards (e.g. aws "
        "s3 sync DIR s3://bucket/DIR) and train with --data.path s3://bucket/DIR"
    )
    (tmp_path / "src" / prepared_folders.MANIFEST).write_text("{}")
    with pytest.raises(DataError) as raised:
        check(PrepareData(path="src"), "out", 0)
    assert str(raised.value) == "data.path 'src' is already a prepared directory; give the source files"


def test_document_ids_are_relative_to_the_folder_the_source_names(tmp_path, monkeypatch):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    root = prepare_module.source_root
    assert root("data") == "data" and root("~/data") == str(tmp_path / "data")
    assert root("data/a.txt") == "data" and root("a.txt") == "." and root("data/none.txt") == "data"
    (tmp_path / "b.txt").write_text("x")
    assert root("b.txt") == "."
    assert root("data/sub/*.txt") == "data/sub" and root("data/su?/x.txt") == "data" and root("data/[ab].txt") == "data"
    assert root("*.txt") == "." and root("data/**/x*.txt") == "data" and root("data/s[ub]/x.txt") == "data"


def split_of_each(names, val_fraction, test_fraction):
    return {name: document_split(name, val_fraction, test_fraction) for name in names}


def test_a_split_without_documents_is_named_with_the_setting_to_raise(tmp_path):
    names = [f"f{i}.txt" for i in range(40)]
    splits = split_of_each(names, 0.5, 0.0)
    for split, val_fraction, test_fraction, setting in (
        ("train", 0.5, 0.0, ""),
        ("validation", 0.5, 0.0, " or raise data.val_fraction"),
        ("test", 0.5, 1e-9, " or raise data.test_fraction"),
    ):
        folder = tmp_path / split
        folder.mkdir()
        chosen = [n for n in names if splits[n] != split][:2]
        if split == "test":  # one of each of the others
            chosen = [next(n for n in names if splits[n] == s) for s in ("train", "validation")]
        for name in chosen:
            (folder / name).write_bytes(random_letters(100, 0))
        data = PrepareData(path=str(folder), val_fraction=val_fraction, test_fraction=test_fraction)
        with pytest.raises(DataError) as raised:
            prepare_module.plan_run(data, "text")
        assert str(raised.value) == (
            f"the {split} split gets none of the 2 documents (each file goes whole to one split, by a hash of its "
            f"path); give more, smaller files{setting}"
        )


def test_a_plan_lists_each_sources_bytes_split_and_path_and_digests_the_settings(tmp_path):
    (tmp_path / "src" / "d").mkdir(parents=True)
    names = [f"d/f{i:02d}.txt" for i in range(12)] + ["lines.jsonl"]
    for i, name in enumerate(names):
        (tmp_path / "src" / name).write_bytes(random_letters(50 + i, i))
    data = PrepareData(path=str(tmp_path / "src"), block_size=8, val_fraction=0.3, test_fraction=0.2)
    plan = prepare_module.plan_run(data, "body")
    splits = {**split_of_each(names[:-1], 0.3, 0.2), "lines.jsonl": "-"}
    assert plan.sources == "".join(f"{50 + i}\t{splits[n]}\t{n}\n" for i, n in enumerate(names))
    assert plan.sources_sha256 == hashlib.sha256(plan.sources.encode()).hexdigest()
    settings = {"block_size": 8, "val_fraction": 0.3, "test_fraction": 0.2, "text_key": "body"}
    assert (
        plan.digest == hashlib.sha256((plan.sources_sha256 + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    )
    assert plan.documents == {s: list(splits.values()).count(s) for s in prepared_folders.SPLITS}
    jsonl = ("jsonl", str(tmp_path / "src" / "lines.jsonl"), 0, 62, "lines.jsonl")
    for split in prepared_folders.SPLITS:  # the .jsonl read by every split, then the small files: one unit per split
        files = [(str(tmp_path / "src" / n), 0, 50 + i) for i, n in enumerate(names) if splits[n] == split]
        assert files and plan.units[split] == [jsonl, ("files", files)], split
    assert list(plan.listing.files) == [str(tmp_path / "src" / n) for n in names]
    # Another setting: another digest (a run of other settings is not resumed).
    for change in (dict(block_size=9), dict(val_fraction=0.31), dict(test_fraction=0.21)):
        other = prepare_module.plan_run(PrepareData(**{**data.__dict__, **change}), "body")
        assert other.digest != plan.digest, change
    assert prepare_module.plan_run(data, "text").digest != plan.digest


def test_units_keep_each_split_to_itself_and_read_a_jsonl_in_every_split(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 1000)
    data = b"0123\n" + b"5\xff\xfe\r9abcdefghij\n" + b"kl\n" + b"mnopqrstuv\n" + b"w\n"
    (tmp_path / "a.jsonl").write_bytes(data)
    names = [f"g{i}" for i in range(30)]
    splits = split_of_each(names, 0.5, 0.0)
    train = [n for n in names if splits[n] == "train"][:3]
    val = [n for n in names if splits[n] == "validation"][:2]
    order = [train[0], val[0], "a.jsonl", train[1], val[1], train[2]]
    sizes = {train[0]: 600, val[0]: 700, "a.jsonl": 37, train[1]: 300, val[1]: 400, train[2]: 200}
    files = [str(tmp_path / n) for n in order]
    units, documents, source_splits = prepare_module.plan_units(
        files, [sizes[n] for n in order], str(tmp_path), 0.5, 0.0
    )
    assert source_splits == [splits[n] if n != "a.jsonl" else "-" for n in order]
    assert documents == {"train": 3, "validation": 2, "test": 0}
    jsonl = ("jsonl", str(tmp_path / "a.jsonl"), 0, 37, "a.jsonl")
    f = {n: str(tmp_path / n) for n in order}
    assert units == {
        "train": [jsonl, ("files", [(f[train[0]], 0, 600), (f[train[1]], 0, 300)]), ("files", [(f[train[2]], 0, 200)])],
        "validation": [jsonl, ("files", [(f[val[0]], 0, 700)]), ("files", [(f[val[1]], 0, 400)])],
        "test": [jsonl],
    }


@pytest.mark.parametrize("chunk_bytes, chunk_size", [(500, 29 * (T + 1)), (10, T + 1)])
def test_pack_checks_room_for_what_it_reads_and_sizes_chunks_in_whole_windows(tmp_path, monkeypatch, chunk_bytes,
                                                                              chunk_size):  # fmt: skip
    """The free-space check asks for every byte the splits to write read (a .jsonl once per split); LitData's chunks
    hold whole windows, at least one."""
    docs = write_documents(tmp_path / "src", count=12)
    lines = "".join(json.dumps({"text": random_letters(100, 50 + i).decode()}) + "\n" for i in range(6))
    (tmp_path / "src" / "lines.jsonl").write_text(lines)
    needed, calls, real_optimize = [], [], litdata.optimize
    monkeypatch.setattr(prepare_module, "check_free_space", lambda output, n: needed.append((output, n)))
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(litdata, "optimize", lambda **kwargs: (calls.append(kwargs), real_optimize(**kwargs))[1])
    assert prepare(tmp_path / "src", tmp_path / "out", val_fraction=0.3, test_fraction=0.2, num_workers=3) == 0
    assert needed == [(str(tmp_path / "out"), sum(map(len, docs.values())) + 3 * len(lines))]
    for split in prepared_folders.SPLITS:
        index = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert index["config"]["chunk_size"] == chunk_size, split
    # What LitData is asked: each split's units in order (a files unit and the .jsonl's), by forked workers, at most
    # one per unit, kept in order.
    assert [(os.path.basename(c["output_dir"]), c["inputs"], c["num_workers"]) for c in calls] == [
        (split, [0, 1], 2) for split in prepared_folders.SPLITS
    ]
    for c in calls:
        assert (c["chunk_size"], c["start_method"], c["keep_data_ordered"], c["reorder_files"], c["verbose"]) == (
            chunk_size, "fork", True, False, False)  # fmt: skip
        assert isinstance(c["item_loader"], litdata.TokensLoader) and isinstance(c["fn"], prepare_module.Packer)
        packer = c["fn"]
        assert (packer.split, packer.val_fraction, packer.test_fraction, packer.text_key, packer.error_file) == (
            os.path.basename(c["output_dir"]),
            0.3,
            0.2,
            "text",
            str(tmp_path / "out" / prepare_module.ERROR),
        )
        assert [u[0] for u in packer.units] == ["jsonl", "files"]  # fmt: skip


def test_pack_writes_only_the_splits_left_and_refuses_a_split_without_a_window(tmp_path, monkeypatch):
    """LitData stood in for (it writes nothing here): the bytes planned are those of the splits left to write (a
    .jsonl range's length); where fork is missing the workers are spawned; a split with no window is one line."""
    import multiprocessing

    calls, needed = [], []
    monkeypatch.setattr(litdata, "optimize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(prepare_module, "check_free_space", lambda output, n: needed.append(n))
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    jsonl = ("jsonl", "c.jsonl", 100, 250, "c.jsonl")
    units = {"train": [("files", [("a", 0, 40), ("b", 10, 5)]), jsonl], "validation": [jsonl], "test": []}
    plan = prepare_module.Plan(None, units, {"train": 2, "validation": 0, "test": 0}, "", "sha", "digest")
    out = tmp_path / "out"
    out.mkdir()
    validation = {"bytes": 170, "windows": 10, "chunks": 1, "documents": 3}
    with pytest.raises(DataError) as raised:
        prepare_module.pack(plan, PrepareData("src", block_size=16), str(out), {"validation": validation}, "text", 4,
                            False)  # fmt: skip
    assert str(raised.value) == (
        "the train split has 2 documents and no window of 17 bytes; raise data.val_fraction, lower data.block_size or "
        "give more data"
    )
    assert needed == [45 + 150]  # train's files and its .jsonl range; validation was finished, test has nothing
    assert [(os.path.basename(c["output_dir"]), c["num_workers"], c["start_method"]) for c in calls] == [
        ("train", 2, "spawn")
    ]
    train = {"bytes": 0, "windows": 0, "chunks": 0, "documents": 2}
    marker = json.loads((out / prepared_folders.INCOMPLETE).read_text())
    assert marker == {"plan": "digest", "finished": {"validation": validation, "train": train}}

    def writes_one_chunk(**kwargs):  # what LitData leaves: an index of one chunk of 40 bytes
        os.makedirs(kwargs["output_dir"])
        with open(os.path.join(kwargs["output_dir"], "index.json"), "w") as f:
            json.dump({"chunks": [{"dim": 40}]}, f)

    monkeypatch.setattr(litdata, "optimize", writes_one_chunk)
    splits = prepare_module.pack(plan, PrepareData("src", block_size=16), str(out), {"validation": validation}, "text",
                                 4, False)  # fmt: skip
    assert splits == {"train": {"bytes": 40, "windows": 2, "chunks": 1, "documents": 2}, "validation": validation,
                      "test": {"bytes": 0, "windows": 0, "chunks": 0, "documents": 0}}  # fmt: skip

    def worker_fails(**kwargs):
        raise RuntimeError("One of the workers failed.\nTraceback (most recent call last):\n  ValueError: bad\n")

    monkeypatch.setattr(litdata, "optimize", worker_fails)
    with pytest.raises(DataError) as raised:
        prepare_module.pack(plan, PrepareData("src", block_size=16), str(out), {}, "text", 4, False)
    assert str(raised.value) == "packing the train split failed (ValueError: bad); fix it and run prepare again"


def fake_optimize(monkeypatch, calls: list, stop_at: str | None = None):
    """LitData's optimize stood in for: it records what it is asked and leaves an index of one 170-byte chunk (10
    windows of T + 1); at `stop_at` it is interrupted as a killed run is."""

    def optimize(**kwargs):
        calls.append(kwargs)
        if os.path.basename(kwargs["output_dir"]) == stop_at:
            raise KeyboardInterrupt
        os.makedirs(kwargs["output_dir"])
        with open(os.path.join(kwargs["output_dir"], "index.json"), "w") as f:
            json.dump({"chunks": [{"dim": 170}]}, f)

    monkeypatch.setattr(litdata, "optimize", optimize)


def test_the_text_key_is_part_of_the_plan_and_overwrite_starts_an_unfinished_run_again(tmp_path, monkeypatch):
    write_documents(tmp_path / "src", count=20)
    data = PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3)
    calls = []
    fake_optimize(monkeypatch, calls, stop_at="validation")
    with pytest.raises(KeyboardInterrupt):
        prepare_command(data, str(tmp_path / "out"), text_key="body", num_workers=1, progress=False)
    marker = json.loads((tmp_path / "out" / prepared_folders.INCOMPLETE).read_text())
    assert marker["plan"] == prepare_module.plan_run(data, "body").digest != prepare_module.plan_run(data, "x").digest
    assert list(marker["finished"]) == ["train"]
    calls.clear()
    fake_optimize(monkeypatch, calls)
    prepare_command(data, str(tmp_path / "out"), text_key="body", num_workers=1, overwrite=True, progress=False)
    assert [os.path.basename(c["output_dir"]) for c in calls] == ["train", "validation"]  # not resumed: all again


def test_num_workers_0_is_one_per_core_and_overwrite_builds_beside_the_old_folder(tmp_path, monkeypatch):
    write_documents(tmp_path / "src", count=20)
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 500)  # each file cut into units: more units than cores
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    data = PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3)
    calls = []
    fake_optimize(monkeypatch, calls)
    assert prepare_command(data, str(tmp_path / "out"), progress=False) == 0
    assert [c["num_workers"] for c in calls] == [3, 3] and all(len(c["inputs"]) > 3 for c in calls)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    calls.clear()
    assert prepare_command(data, str(tmp_path / "out"), overwrite=True, progress=False) == 0
    assert [c["num_workers"] for c in calls] == [1, 1]
    built = {os.path.dirname(c["output_dir"]) for c in calls}
    assert len(built) == 1 and os.path.dirname(built.pop()) == str(tmp_path)  # a folder beside the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_sources_tsv_keeps_a_file_name_that_is_not_utf_8(tmp_path, monkeypatch):
    write_documents(tmp_path / "src", count=20)
    (tmp_path / "src" / os.fsdecode(b"caf\xe9.txt")).write_bytes(random_letters(300, 9))
    fake_optimize(monkeypatch, [])
    prepare_command(PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3), str(tmp_path / "out"),
                    num_workers=1, progress=False)  # fmt: skip
    assert b"\tcaf\xe9.txt\n" in (tmp_path / "out" / "sources.tsv").read_bytes()


def test_without_litdata_prepare_says_so_naming_itself(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)
    with pytest.raises(DataError) as raised:
        prepare_command(PrepareData(path=str(tmp_path)), str(tmp_path / "out"))
    assert str(raised.value) == (
        "prepare needs LitData, which is not installed; install it with pip install 'bdh-lightning[stream]'"
    )


def test_prepare_prints_one_line_of_what_it_wrote_in_what_time(tmp_path, monkeypatch, capsys):
    import time

    docs = write_documents(tmp_path / "src", count=20)
    fake_optimize(monkeypatch, [])
    ticks = iter([100.0])  # the start, then half a second later whenever asked
    clock = SimpleNamespace(monotonic=lambda: next(ticks, 100.5), strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr(prepare_module, "time", clock)
    out = tmp_path / "out"
    prepare_command(PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3), str(out), progress=False)
    counts = [sum(document_split(n, 0.3, 0.0) == split for n in docs) for split in ("train", "validation")]
    rate = format_bytes(int(sum(map(len, docs.values())) / 0.5))
    assert capsys.readouterr().err == (
        f"prepared {out}: train 170 B ({counts[0]:,} documents), validation 170 B ({counts[1]:,} documents) in 0.5 s "
        f"({rate}/s of source); train with --data.path {out} --data.block_size {T}\n"
    )


def test_a_failed_write_names_the_file_and_what_is_left(tmp_path, monkeypatch, prepared):
    write_documents(tmp_path / "src", count=20)
    fake_optimize(monkeypatch, [])
    data = PrepareData(path=str(tmp_path / "src"), block_size=T, val_fraction=0.3)

    def refused(path, data, what=None):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(prepare_module, "write_atomically", refused)
    copy = tmp_path / "copy"
    shutil.copytree(prepared.out, copy)
    for out, overwrite, left in ((tmp_path / "new", False, f"nothing was left in {tmp_path / 'new'}"),
                                 (copy, True, f"{copy} is as it was")):  # fmt: skip
        with pytest.raises(ResourceError) as raised:
            prepare_command(data, str(out), overwrite=overwrite, progress=False)
        folder = re.escape(str(out)) if not overwrite else re.escape(str(tmp_path)) + r"/\.[^/]+"  # built beside
        marker = re.escape(prepared_folders.INCOMPLETE)  # the first file written
        assert re.fullmatch(
            rf"cannot write {folder}/{marker} \(Permission denied\); {re.escape(left)}", str(raised.value)
        )


def test_a_unit_is_filled_up_to_exactly_unit_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 1000)
    files = [str(tmp_path / f"f{i}") for i in range(4)]
    units, _, _ = prepare_module.plan_units(files, [400, 600, 1000, 1], str(tmp_path), 0.0, 0.0)
    assert [[length for _, _, length in unit[1]] for unit in units["train"]] == [[400, 600], [1000], [1]]
    units, _, _ = prepare_module.plan_units(files[:3], [600, 500, 500], str(tmp_path), 0.0, 0.0)
    assert [[length for _, _, length in unit[1]] for unit in units["train"]] == [[600], [500, 500]]  # after a cut too


def test_the_plan_leaves_out_excluded_and_hidden_files_unless_asked(tmp_path):
    (tmp_path / "src").mkdir()
    for name in ("a.txt", "b.txt", "notes.md", ".hidden.txt"):
        (tmp_path / "src" / name).write_bytes(random_letters(100, len(name)))
    listed = {}
    for exclude, hidden in ((None, False), (["*.md"], False), (["*.md"], True)):
        data = PrepareData(path=str(tmp_path / "src"), val_fraction=0.7, exclude=exclude, include_hidden=hidden)
        plan = prepare_module.plan_run(data, "text")  # a.txt goes to train, b.txt to validation
        listed[(bool(exclude), hidden)] = [os.path.basename(f) for f in plan.listing.files]
    assert listed == {(False, False): ["a.txt", "b.txt", "notes.md"], (True, False): ["a.txt", "b.txt"],
                      (True, True): [".hidden.txt", "a.txt", "b.txt"]}  # fmt: skip


def test_a_disk_with_exactly_the_room_needed_is_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    prepare_module.check_free_space(str(tmp_path), 1000)
    with pytest.raises(ResourceError) as raised:
        prepare_module.check_free_space(str(tmp_path), 1001)
    assert str(raised.value) == (
        f"prepare needs about 1001 B in {tmp_path} but its disk has 1000 B free; free some space or choose another "
        "--output"
    )
