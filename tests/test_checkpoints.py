"""Checkpoints (bdh_lightning/checkpoints.py) in process: reading without running code, finding `last`, the shape and
loadability checks and their one-line messages, atomic writes, the precision of the run that wrote one."""

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL

from bdh_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_loadable,
    check_model_shape,
    find_last,
    last_good_checkpoint,
    load_plain,
    read_checkpoint,
    run_precision,
)
from bdh_lightning.errors import CheckpointError, ResourceError
from bdh_lightning.module import BDHLitModule
from bdh_lightning.weights import load_model_from_checkpoint


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint a Lightning Trainer wrote for a tiny BDHLitModule after 2 steps, and the module."""
    folder = tmp_path_factory.mktemp("written")
    L.seed_everything(0)
    module = BDHLitModule(**TINY_MODEL)
    data = torch.randint(0, 256, (16, 17))
    trainer = L.Trainer(
        max_steps=2,
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=8))
    path = folder / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    return path, module


def message(error_info) -> str:
    text = str(error_info.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- read_checkpoint


def test_read_checkpoint_returns_what_was_written(written):
    path, module = written
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["n_embd"] == 32
    for name, value in module.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
    assert read_checkpoint(str(path))["global_step"] == 2  # a str path too


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_read_checkpoint_refuses_a_pickled_call_naming_it(tmp_path):
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "note": Payload()}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert message(error) == (
        f"checkpoint {path} contains a pickled reference to posix.getcwd, which loading would run; "
        "refused (only tensors and plain values are loaded): use a checkpoint written by `fit`"
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            b"not a checkpoint\n",  # not torch.save's zip: the legacy unpickler reads it and fails
            "is corrupt or not a PyTorch checkpoint; use another one (e.g. an earlier .ckpt",
        ),
        (b"", "is truncated, corrupt or not a PyTorch checkpoint"),
    ],
)
def test_read_checkpoint_of_foreign_bytes_is_one_line(tmp_path, content, expected):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert message(error).startswith(f"checkpoint {path} ") and expected in message(error)


def test_read_checkpoint_of_a_truncated_file(tmp_path, written):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(written[0].read_bytes()[:4000])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert "is truncated, corrupt or not a PyTorch checkpoint" in message(error)


def test_read_checkpoint_of_a_missing_file_or_a_folder(tmp_path):
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "missing.ckpt")
    assert message(error) == f"cannot read checkpoint {tmp_path / 'missing.ckpt'}: No such file or directory"
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert message(error).startswith(f"cannot read checkpoint {tmp_path}: ")


def test_load_plain_words_its_errors_for_a_weights_file(tmp_path):
    """The same safe load for exported weights and reference state_dicts (weights.py): messages name the file
    alone and point to `fit` or `export`."""
    cases = {
        "payload.pt": (lambda p: torch.save({"w": Payload()}, p),
                       "{} contains a pickled reference to posix.getcwd, which loading would run; refused (only "
                       "tensors and plain values are loaded): use a file written by `fit` or `export`"),
        "notes.pt": (lambda p: p.write_bytes(b"not a checkpoint\n"),
                     "{} is corrupt or not a PyTorch file; use another one"),
        "empty.pt": (lambda p: p.write_bytes(b""),
                     "{} is truncated, corrupt or neither a PyTorch nor a safetensors file; use another one"),
        "missing.pt": (lambda p: None, "cannot read {}: No such file or directory"),
    }  # fmt: skip
    for name, (write, expected) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError) as error:
            load_plain(path)
        assert message(error) == expected.format(path)


def test_load_plain_maps_torch_save_files_and_reads_legacy_ones(tmp_path):
    """torch.save's zip format is memory-mapped (its tensors are not read into memory until touched); the legacy
    format, which cannot be mapped, is read whole."""
    zipped, legacy = tmp_path / "zipped-weights.pt", tmp_path / "legacy-weights.pt"
    weights = {"w": torch.randn(64, 64)}
    torch.save(weights, zipped)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    mapped = load_plain(zipped)
    assert str(zipped) in Path("/proc/self/maps").read_text()
    assert torch.equal(mapped["w"], weights["w"])
    read = load_plain(legacy)
    assert torch.equal(read["w"], weights["w"]) and str(legacy) not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("content", [[1, 2, 3], {"weights": {}}, {"state_dict": [1]}])
def test_read_checkpoint_wants_a_lightning_state_dict(tmp_path, content):
    path = tmp_path / "plain.ckpt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert (
        message(error) == f"checkpoint {path} is not a Lightning checkpoint (no state_dict); use one written by `fit`"
    )


# ---------------------------------------------------------------- find_last


def touch(path: Path, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_find_last_picks_the_newest_run(tmp_path):
    touch(tmp_path / "version_0/checkpoints/last.ckpt", 100)
    newest = touch(tmp_path / "version_1/checkpoints/last.ckpt", 10)
    touch(tmp_path / "version_2/checkpoints/last.ckpt", 300)
    touch(tmp_path / "version_3/checkpoints/best.ckpt", 0)  # not a last.ckpt
    assert find_last(tmp_path) == newest
    assert find_last(str(tmp_path)) == newest
    loose = touch(tmp_path / "checkpoints/last.ckpt", 1)  # a command without a logger
    assert find_last(tmp_path) == loose


def test_find_last_with_no_run_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError) as error:
        find_last(tmp_path / "logs")
    assert message(error) == (
        f"--ckpt_path last: no {tmp_path / 'logs'}/version_*/checkpoints/last.ckpt found; train first "
        "or give a checkpoint path"
    )


def test_find_last_default_root_is_lightning_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    newest = touch(tmp_path / "lightning_logs/version_4/checkpoints/last.ckpt", 0)
    assert find_last().resolve() == newest


# ---------------------------------------------------------------- check_model_shape, check_loadable


def test_check_model_shape_accepts_the_settings_it_was_trained_with(written):
    check_model_shape(read_checkpoint(written[0]), written[0], {**TINY_MODEL, "n_layer": 5})  # depth: no shape


def test_check_model_shape_names_the_weight_and_the_trained_settings(written, tmp_path):
    checkpoint = read_checkpoint(written[0])
    with pytest.raises(CheckpointError) as error:
        check_model_shape(checkpoint, written[0], {**TINY_MODEL, "n_embd": 64})
    assert message(error) == (
        f"checkpoint {written[0]} holds a model of another shape: model.encoder is (2, 32, 128) there but (2, 64, 256) "
        "with these settings; use the model settings it was trained with (n_embd=32, n_head=2, "
        "mlp_internal_dim_multiplier=8)"
    )
    (written[0].parent.parent / "config.yaml").write_text("model: {}\n")
    try:
        with pytest.raises(CheckpointError) as error:
            check_model_shape(checkpoint, written[0], {**TINY_MODEL, "mlp_internal_dim_multiplier": 4})
        assert message(error).endswith(f" (e.g. --config {written[0].parent.parent / 'config.yaml'})")
        assert "model.encoder is (2, 32, 128) there but (2, 32, 64)" in message(error)
    finally:
        (written[0].parent.parent / "config.yaml").unlink()
    bare = {"state_dict": checkpoint["state_dict"]}
    with pytest.raises(CheckpointError) as error:
        check_model_shape(bare, "bare.ckpt", {**TINY_MODEL, "n_head": 4})
    assert message(error).endswith("with these settings; use the model settings it was trained with")


def test_check_model_shape_refuses_other_models_and_extra_weights(written):
    checkpoint = read_checkpoint(written[0])
    with pytest.raises(CheckpointError) as error:
        check_model_shape({"state_dict": {"a.weight": torch.zeros(2), "b": 3}}, "other.ckpt", TINY_MODEL)
    assert message(error) == "checkpoint other.ckpt holds no BDH weights (['a.weight']...); use one written by `fit`"
    extra = {"state_dict": {**checkpoint["state_dict"], "model.extra": torch.zeros(1), "model.more": torch.zeros(1)}}
    with pytest.raises(CheckpointError) as error:
        check_model_shape(extra, "edited.ckpt", TINY_MODEL)
    assert message(error) == (
        "checkpoint edited.ckpt holds weights BDH does not have (model.extra, model.more); it is of "
        "another model or was edited: use one written by `fit`"
    )


def test_check_loadable_accepts_what_fit_writes_for_resume_too(written):
    checkpoint = read_checkpoint(written[0])
    check_loadable(checkpoint, written[0], resume=False)
    check_loadable(checkpoint, written[0], resume=True)


@pytest.mark.parametrize(
    "change, resume, expected",
    [
        (
            lambda c: c.pop("pytorch-lightning_version"),
            False,
            "has no pytorch-lightning_version: it was not written by `fit`; use one that was "
            "(to start a new run from its weights: --model.init_from P)",
        ),
        (
            lambda c: c.update(hyper_parameters=[1]),
            False,
            "has hyper_parameters that are not a mapping; use one written by `fit`",
        ),
        (
            lambda c: c.pop("optimizer_states"),
            True,
            "holds no optimizer state, so training cannot continue from it; start a new run from its weights with "
            "--model.init_from P (fresh optimizer, step 0)",
        ),
        (lambda c: c.update(optimizer_states=[]), True, "holds no optimizer state"),
        (lambda c: c.update(optimizer_states=[1]), True, "holds no optimizer state"),
        (lambda c: c.update(global_step="2"), True, "has a global_step that is not a int; use one written by `fit`"),
        (lambda c: c.update(epoch=0.5), True, "has a epoch that is not a int"),
        (lambda c: c.update(loops=[]), True, "has a loops that is not a dict"),
        (lambda c: c.update(lr_schedulers={}), True, "has a lr_schedulers that is not a list"),
        (
            lambda c: c["state_dict"].update({"model.lm_head": torch.full((32, 256), float("nan"))}),
            False,
            "holds non-finite weights (NaN or infinity in model.lm_head); use an earlier checkpoint",
        ),
        (
            lambda c: c["state_dict"].update({"model.decoder": torch.tensor([1.0, float("inf")])}),
            False,
            "holds non-finite weights (NaN or infinity in model.decoder)",
        ),
        (
            lambda c: c["state_dict"].update({"model.decoder": torch.tensor([-float("inf"), 0.0])}),
            False,
            "holds non-finite weights",
        ),
    ],
    ids=[
        "no-version",
        "hparams-not-mapping",
        "no-optimizer",
        "empty-optimizer",
        "optimizer-not-dict",
        "step-str",
        "epoch-float",
        "loops-list",
        "schedulers-dict",
        "nan",
        "inf",
        "minus-inf",
    ],
)
def test_check_loadable_refuses_in_one_line(written, change, resume, expected):
    checkpoint = dict(read_checkpoint(written[0]))
    checkpoint["state_dict"] = dict(checkpoint["state_dict"])
    change(checkpoint)
    with pytest.raises(CheckpointError) as error:
        check_loadable(checkpoint, "P", resume=resume)
    assert message(error).startswith("checkpoint P ") and expected in message(error)


def test_check_loadable_without_resume_ignores_the_training_state(written):
    checkpoint = {k: v for k, v in read_checkpoint(written[0]).items() if k not in ("optimizer_states", "loops")}
    checkpoint["global_step"] = "not checked"
    check_loadable(checkpoint, "P", resume=False)
    checkpoint["state_dict"] = {
        **checkpoint["state_dict"],
        "model.steps": torch.tensor([3]),
        "model.none": torch.zeros(0),
    }
    check_loadable(checkpoint, "P", resume=False)  # integer and empty tensors are not checked for finiteness


# ---------------------------------------------------------------- loading the model, the run's precision


def test_load_model_from_checkpoint_is_float32_eval_with_the_weights(written):
    path, module = written
    model = load_model_from_checkpoint(path)
    assert not model.training and model.encoder.dtype == torch.float32 and model.encoder.device.type == "cpu"
    for name, value in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    deeper = load_model_from_checkpoint(path, settings={"n_layer": 4})
    assert deeper.config.n_layer == 4 and model.config.n_layer == 2


def test_run_precision_reads_the_config_beside_the_run(tmp_path):
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    config = tmp_path / "version_0" / "config.yaml"
    assert run_precision(ckpt) is None  # no config.yaml
    config.write_text("trainer:\n  precision: bf16-mixed\n")
    assert run_precision(ckpt) == "bf16-mixed"
    config.write_text("trainer:\n  precision: 32\n")
    assert run_precision(ckpt) == "32"
    for text in ("trainer: {}\n", "", "model: {n_layer: 2}\n", "trainer: [1, 2]\n", "a: [unclosed\n"):
        config.write_text(text)
        assert run_precision(ckpt) is None, text


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_the_file_and_leaves_no_part(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "deep" / "folder" / "last.ckpt"  # folders are made
    io.save_checkpoint({"global_step": 1, "w": torch.arange(3.0)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.arange(4.0)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    other = tmp_path / "best.ckpt"
    io.save_checkpoint({"global_step": 3}, str(other))
    assert io.written == [(str(path), 2), (str(other), 3)]  # one entry per path, newest last
    assert io.last_good_words() == (
        f"the last good checkpoint of this run is {other} (step 3); free some space and resume from it with --ckpt_path"
    )


def test_a_failed_write_removes_its_part_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    import bdh_lightning.checkpoints as checkpoints

    io = AtomicCheckpointIO()
    assert io.last_good_words() == "this run saved no checkpoint before it; free some space and start again"
    good = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 5}, good)

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(ResourceError) as error:
        io.save_checkpoint({"global_step": 6}, tmp_path / "step6.ckpt")
    assert message(error) == (
        f"cannot write checkpoint {tmp_path / 'step6.ckpt'} (No space left on device); the last "
        f"good checkpoint of this run is {good} (step 5); free some space and resume from it with "
        "--ckpt_path"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .part left
    good.unlink()
    assert io.last_good_words() == "this run saved no checkpoint before it; free some space and start again"


def test_last_good_checkpoint_is_this_runs_newest_on_disk(tmp_path):
    io = AtomicCheckpointIO()
    trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=io))
    assert last_good_checkpoint(trainer) is None
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    io.save_checkpoint({"global_step": 3}, first)
    io.save_checkpoint({"global_step": 6}, second)
    assert last_good_checkpoint(trainer) == (str(second), 6)
    second.unlink()
    assert last_good_checkpoint(trainer) == (str(first), 3)
    assert last_good_checkpoint(SimpleNamespace(strategy=SimpleNamespace())) is None


# ---------------------------------------------------------------- RunCheckpoint


class RecordingIO(AtomicCheckpointIO):
    def __init__(self):
        super().__init__()
        self.saves = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saves.append((Path(path).name, checkpoint["global_step"]))


def fit_with_run_checkpoint(folder: Path, max_steps: int, **settings):
    from bdh_lightning.checkpoints import RunCheckpoint

    L.seed_everything(0)
    module = BDHLitModule(**TINY_MODEL)
    data = torch.randint(0, 256, (16, 17))
    pairs = list(zip(data[:, :-1], data[:, 1:]))
    checkpoint = RunCheckpoint(dirpath=folder, **settings)
    io = RecordingIO()
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=5,
        default_root_dir=folder,
        logger=False,
        callbacks=[checkpoint],
        plugins=[io],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(pairs, batch_size=2)
    trainer.fit(module, loader, torch.utils.data.DataLoader(pairs[:4], batch_size=2))
    return io.saves, checkpoint


def test_run_checkpoint_saves_last_from_the_start_and_at_the_end(tmp_path):
    settings = dict(
        monitor="val/loss",
        save_last=True,
        every_n_train_steps=3,
        filename="best-step{step}",
        auto_insert_metric_name=False,
    )
    (tmp_path / "last.ckpt").write_bytes(b"a last.ckpt this run did not write")
    saves, checkpoint = fit_with_run_checkpoint(tmp_path, 7, **settings)
    last_steps = [step for name, step in saves if name == "last.ckpt"]
    assert last_steps[0] == 3  # before the first validation: Lightning's own would wait for val/loss
    assert last_steps[-1] == 7  # the final step, between two saves
    assert ("best-step6.ckpt", 6) in saves  # the monitored save once val/loss exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step6.ckpt", "last.ckpt"]  # no last-v1.ckpt
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 7
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert checkpoint.state_key == ModelCheckpoint(dirpath=tmp_path, **settings).state_key  # resumable either way


def test_run_checkpoint_without_save_last_or_steps(tmp_path):
    saves, _ = fit_with_run_checkpoint(
        tmp_path,
        6,
        monitor="val/loss",
        save_last=False,
        every_n_train_steps=3,
        filename="best-step{step}",
        auto_insert_metric_name=False,
    )
    assert saves == [("best-step6.ckpt", 6)]  # no last.ckpt at all; step 3 had no val/loss yet
    saves, _ = fit_with_run_checkpoint(tmp_path / "plain", 5, save_last=True)
    assert [name for name, _ in saves].count("last.ckpt") >= 1 and saves[-1] == ("last.ckpt", 5)


# ---------------------------------------------------------------- what the first mutation run left


def test_an_unpickling_error_without_a_payload_is_corrupt(tmp_path):
    import zipfile

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}}, good)
    names = zipfile.ZipFile(good).namelist()
    bad = tmp_path / "bad.ckpt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in names:  # an INST opcode: refused by the weights-only unpickler, naming no global
            dst.writestr(name, b"\x80\x02(I1\ni." if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(bad)
    assert message(error) == (
        f"checkpoint {bad} is corrupt or not a PyTorch checkpoint; use another one "
        "(e.g. an earlier .ckpt in the same checkpoints/ folder)"
    )


def test_foreign_names_are_listed_three_at_most():
    foreign = {f"w{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(CheckpointError) as error:
        check_model_shape({"state_dict": foreign}, "f.ckpt", TINY_MODEL)
    assert "(['w0', 'w1', 'w2']...)" in message(error)


def test_extra_names_are_listed_three_at_most(written):
    state = dict(read_checkpoint(written[0])["state_dict"])
    state.update({f"model.extra{i}": torch.zeros(1) for i in range(4)})
    with pytest.raises(CheckpointError) as error:
        check_model_shape({"state_dict": state}, "e.ckpt", TINY_MODEL)
    assert "(model.extra0, model.extra1, model.extra2); it is" in message(error)


def test_find_last_skips_a_run_removed_while_it_looks(tmp_path, monkeypatch):
    runs = [touch(tmp_path / f"version_{v}/checkpoints/last.ckpt", 10 * v) for v in range(3)]
    real_stat = Path.stat
    vanished = []

    def stat(self, *args, **kwargs):
        # Whichever run find_last's own loop looks at first is gone (glob's existence checks stat too).
        if self.name == "last.ckpt" and not vanished and "find_last" in sys._getframe(1).f_code.co_name:
            vanished.append(self)
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    found = find_last(tmp_path)
    assert len(vanished) == 1  # version_0 is the newest (age 0); the others are 10 and 20 s old
    assert found == min((p for p in runs if p != vanished[0]), key=lambda p: int(p.parts[-3][8:]))


def test_remote_paths_and_storage_options_go_to_lightnings_writer(tmp_path):
    import uuid

    import fsspec

    remote = f"memory://bdh-test-{uuid.uuid4().hex}/last.ckpt"  # fresh: the memory file system outlives a test
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "w": torch.arange(3.0)}, remote)
    with fsspec.open(remote, "rb") as file:
        assert torch.load(file, weights_only=True)["global_step"] == 4
    with pytest.raises(TypeError, match="storage_options"):  # Lightning's local writer takes no storage options
        io.save_checkpoint({"global_step": 5}, tmp_path / "local.ckpt", storage_options={"compression": None})
    assert not list(tmp_path.iterdir())


def test_the_part_file_sits_beside_the_checkpoint_while_it_is_written(tmp_path, monkeypatch):
    import bdh_lightning.checkpoints as checkpoints

    real_save = checkpoints.torch.save
    seen = []

    def watching_save(obj, file, *args, **kwargs):
        seen.append(sorted(os.listdir(tmp_path)))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", watching_save)
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert seen == [["last.ckpt.part"]] and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_a_folder_that_cannot_be_made_is_a_resource_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ResourceError) as error:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "file" / "last.ckpt")
    assert message(error).startswith(f"cannot write checkpoint {tmp_path / 'file' / 'last.ckpt'} (")


def test_torch_write_failures_are_resource_errors_and_other_errors_pass(tmp_path, monkeypatch):
    import bdh_lightning.checkpoints as checkpoints

    def failing(error):
        def save(obj, file, *args, **kwargs):
            file.write(b"partial")
            raise error

        return save

    io = AtomicCheckpointIO()
    monkeypatch.setattr(checkpoints.torch, "save", failing(RuntimeError("[enforce fail] file write failed\nat 0")))
    with pytest.raises(ResourceError) as error:
        io.save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    assert message(error).startswith(
        f"cannot write checkpoint {tmp_path / 'a.ckpt'} ([enforce fail] file write failed at 0); "
    )
    monkeypatch.setattr(checkpoints.torch, "save", failing(RuntimeError("a bug, not the disk")))
    with pytest.raises(RuntimeError, match="^a bug, not the disk$"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "b.ckpt")
    monkeypatch.setattr(checkpoints.torch, "save", failing(ValueError("writing went wrong")))
    with pytest.raises(ValueError):
        io.save_checkpoint({"global_step": 1}, tmp_path / "c.ckpt")
    assert not list(tmp_path.iterdir())  # every .part removed


def test_run_checkpoint_every_step_and_a_last_name_with_the_step(tmp_path):
    from bdh_lightning.checkpoints import RunCheckpoint

    saves, _ = fit_with_run_checkpoint(tmp_path, 2, monitor="val/loss", save_last=True, every_n_train_steps=1)
    assert [s for s in saves if s[0] == "last.ckpt"][:2] == [("last.ckpt", 1), ("last.ckpt", 2)]  # from step 1 on
    RunCheckpoint.CHECKPOINT_NAME_LAST = "last-{step}"
    try:
        saves, _ = fit_with_run_checkpoint(
            tmp_path / "named", 4, monitor="val/loss", save_last=True, every_n_train_steps=3
        )
    finally:
        RunCheckpoint.CHECKPOINT_NAME_LAST = "last"
    assert ("last-step=3.ckpt", 3) in saves and saves[-1] == ("last-step=4.ckpt", 4)  # the name's metrics filled in


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_every_input_safe_a_real_full_disk_during_a_checkpoint_write(tmp_path):
    """Issue 29: on a full tmpfs torch's zip writer fails with 'unexpected pos' (no errno): one line saying the disk
    is full and naming the last good checkpoint, which stays whole, and no .part left."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        io = AtomicCheckpointIO()
        last = mount / "last.ckpt"
        io.save_checkpoint({"global_step": 2, "w": torch.arange(1000.0)}, last)
        with pytest.raises(ResourceError) as error:
            io.save_checkpoint({"global_step": 4, "w": torch.rand(1_000_000)}, mount / "best.ckpt")
        assert message(error) == (
            f"cannot write checkpoint {mount / 'best.ckpt'} (No space left on device); the last good checkpoint of "
            f"this run is {last} (step 2); free some space and resume from it with --ckpt_path"
        )
        assert os.listdir(mount) == ["last.ckpt"] and torch.load(last, weights_only=True)["global_step"] == 2
    finally:
        subprocess.run(["umount", str(mount)])
