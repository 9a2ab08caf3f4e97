"""The command line end to end: real `fit` runs of a tiny model, TensorBoard read back, resume, configs, bad input."""

from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, scalar_tags, scalars, write_phrases
from conftest import TINY_ARGS as TINY

from bdh_lightning.cli import BDHCLI
from bdh_lightning.main import main
from bdh_lightning.model import BDH

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A learnable 60 kB corpus (loss must fall within a few dozen steps), and cwd set to tmp_path."""
    monkeypatch.chdir(tmp_path)
    return write_phrases(tmp_path / "corpus.txt")


def fit(corpus, *extra):
    return BDHCLI(args=["fit", "--data.path", str(corpus), *TINY, *extra])


def test_fit_logs_to_tensorboard_and_saves_checkpoints(corpus):
    cli = fit(corpus, "--trainer.max_steps", "25")
    run = Path(cli.trainer.log_dir)
    assert run.name == "version_0"
    logged = {tag: sorted(scalars(run, tag).items()) for tag in scalar_tags(run)}
    for tag in ("train/loss", "val/loss", "val/bpb", "train/lr", "train/device/items_per_sec"):
        assert tag in logged, f"{tag} missing from {sorted(logged)}"
    losses = [v for _, v in logged["train/loss"]]
    assert len(losses) == 25 and losses[-1] < losses[0] - 0.5
    bytes_per_sec = logged["train/device/items_per_sec"][-1][1]
    windows_per_sec = logged["train/device/samples_per_sec"][-1][1]
    assert bytes_per_sec == pytest.approx(32 * windows_per_sec, rel=1e-4)  # bytes: block_size per window
    val_loss, val_bpb = logged["val/loss"][-1][1], logged["val/bpb"][-1][1]
    assert val_bpb == pytest.approx(val_loss / torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert (run / "config.yaml").is_file()
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(name.startswith("best") for name in ckpts)


def test_resume_continues_at_saved_step(corpus, capsys):
    fit(corpus, "--trainer.max_steps", "10")
    first = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    assert torch.load(first, weights_only=True)["global_step"] == 10
    cli = fit(corpus, "--trainer.max_steps", "15", "--ckpt_path", "last", "--model.learning_rate", "1e-4")
    assert cli.trainer.global_step == 15
    assert cli.model.hparams.learning_rate == 3e-3  # LightningCLI: model settings come from the checkpoint...
    assert "learning_rate=0.003 (not 0.0001)" in capsys.readouterr().err  # ...and the user is told
    steps = sorted(scalars(Path(cli.trainer.log_dir), "train/loss"))
    assert steps[0] >= 10 and len(steps) == 5  # only the 5 new steps ran
    assert torch.load(Path(cli.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 15


def test_learning_rate_schedule_is_stepped(corpus):
    cli = fit(corpus, "--trainer.max_steps", "12", "--model.warmup_steps", "4", "--model.decay_steps", "8",
              "--model.min_learning_rate", "1e-4")  # fmt: skip
    lrs = scalars(Path(cli.trainer.log_dir), "train/lr")
    assert lrs[0] == pytest.approx(3e-3 / 4)
    assert max(lrs.values()) == pytest.approx(3e-3)
    assert lrs[max(lrs)] < 3e-3 / 2 and lrs[max(lrs)] >= 1e-4


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses_and_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.setenv("BDH_LIGHTNING_CACHE", str(tmp_path))  # nothing is downloaded at instantiation
    monkeypatch.chdir(REPO)
    with torch.device("meta"):  # the 24gb model has 100M parameters: build it without allocating
        cli = BDHCLI(args=["--config", str(config)], run=False)
    assert isinstance(cli.model.model, BDH)
    assert cli.datamodule.block_size > 0 and "block_size" not in cli.model.hparams  # a data setting only


def test_module_command_runs_end_to_end(corpus):
    """The installed entry point: `python -m bdh_lightning fit` in a fresh process."""
    done = run_cli(Path.cwd(), "fit", "--data.path", str(corpus), *TINY, "--trainer.max_steps", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path("lightning_logs/version_0/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.n_embd", "0"], "model.n_embd must be a positive integer"),
        (["--model.n_layer", "-1"], "model.n_layer must be a positive integer"),
        (["--model.dropout", "1.0"], "model.dropout must be in [0, 1)"),
        (["--model.vocab_size", "512"], "model.vocab_size must be 256"),
        (["--model.n_embd", "30", "--model.n_head", "2", "--model.mlp_internal_dim_multiplier", "1"], "even"),
        (["--data.path", "does/not/exist.txt"], "does/not/exist.txt"),
        (["--data.block_size", "100000"], "block_size"),
        (["--ckpt_path", "nope.ckpt"], "nope.ckpt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(corpus, capsys, args, expected):
    code = main(["fit", "--data.path", str(corpus), *TINY, "--trainer.max_steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and "\n" not in err, err
    assert not Path("lightning_logs/version_0/checkpoints").exists()  # nothing trained, nothing written


def test_resume_takes_the_architecture_from_the_checkpoint_and_the_kernel_from_the_command_line(corpus, capsys):
    first = fit(corpus, "--trainer.max_steps", "3", "--model.kernel", "reference")
    ckpt = Path(first.trainer.checkpoint_callback.last_model_path)
    resumed = fit(corpus, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), "--model.kernel", "chunked",
                  "--model.chunk_size", "4", "--model.n_embd", "64", "--model.learning_rate", "1e-2")  # fmt: skip
    hp = resumed.model.hparams
    assert (hp.kernel, hp.chunk_size) == ("chunked", 4)  # this machine's choice
    assert (hp.n_embd, hp.learning_rate) == (32, 3e-3)  # the trained model's
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert "n_embd=32 (not 64)" in note and "learning_rate=0.003 (not 0.01)" in note and "kernel" not in note
    assert resumed.trainer.global_step == 4


def test_version_and_the_subcommand_listing(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("bdh-lightning ")
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(name in err for name in ("fit", "generate", "estimate"))


def test_a_commands_help_is_its_docstrings_first_paragraph_then_its_options_ungrouped(capsys):
    """Catches another paragraph (or none) as a command's description, and its options put in a group of their own."""
    from bdh_lightning.export import export_command

    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    first = " ".join(export_command.__doc__.split("\n\n")[0].split())
    assert out.startswith("usage: python -m bdh_lightning export --ckpt_path CKPT_PATH ")
    assert f"[--logs_dir LOGS_DIR] {first} options: -h, --help Show this help message and exit. --ckpt_path" in out


@pytest.mark.parametrize(
    "said, line",
    [
        ("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1", "connection closed by peer"),
        ("Connection reset by peer", "connection reset by peer"),
        ("NCCL error: remote worker crashing", "remote worker crashing"),
        ("write: Broken pipe", "broken pipe"),
        ("NCCL communicator was aborted on rank 0", "NCCL communicator was aborted"),
        ("Connection Reset By Peer", "connection reset by peer"),
        ("CUDA error: an illegal memory access", None),
    ],
)
def test_a_lost_peer_is_named_in_what_gloo_or_nccl_said(said, line):
    """Catches the markers looked for in the wrong place, or their wording changed on the way to the line (NCCL once
    came out as "nCCL")."""
    from bdh_lightning.main import peer_lost

    assert peer_lost(RuntimeError(said)) == line


# ---------------------------------------------------------------------------------------------------------
# cli.py's helpers in process: what `--ckpt_path last` resolves to, which paths are exports, config shapes


def test_ckpt_path_last_is_resolved_once_and_the_ranks_it_starts_take_that_choice(tmp_path, monkeypatch):
    """Catches either environment variable misnamed, the parent's pid not compared (a rank would pick a last.ckpt
    saved since), an empty choice taken, and checkpoint.dirpath's last.ckpt not preferred or not checked."""
    import os

    from jsonargparse import Namespace

    from bdh_lightning import cli
    from bdh_lightning.errors import CheckpointError

    for name in ("BDH_CKPT_PATH_LAST", "BDH_CKPT_PATH_LAST_PARENT"):
        monkeypatch.delenv(name, raising=False)

    def save(version: int) -> Path:
        path = tmp_path / f"lightning_logs/version_{version}/checkpoints/last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, ns=(version * 10**9, version * 10**9))  # newer with each version
        return path

    config = Namespace(
        trainer=Namespace(default_root_dir=str(tmp_path), logger=None), checkpoint=Namespace(dirpath=None)
    )
    first = save(1)
    assert cli.resolve_last(config) == first
    assert os.environ["BDH_CKPT_PATH_LAST"] == str(first)
    assert os.environ["BDH_CKPT_PATH_LAST_PARENT"] == str(os.getpid())
    newer = save(2)
    monkeypatch.setattr(os, "getppid", lambda: int(os.environ["BDH_CKPT_PATH_LAST_PARENT"]))  # a rank it started
    assert cli.resolve_last(config) == first
    monkeypatch.setattr(os, "getppid", lambda: 1)  # another command: resolves for itself
    assert cli.resolve_last(config) == newer
    monkeypatch.setattr(os, "getppid", lambda: int(os.environ["BDH_CKPT_PATH_LAST_PARENT"]))
    monkeypatch.setenv("BDH_CKPT_PATH_LAST", "")  # no choice recorded: resolved here
    assert cli.resolve_last(config) == newer
    monkeypatch.setattr(os, "getppid", lambda: 1)
    folder = tmp_path / "kept"
    config.checkpoint.dirpath = str(folder)
    with pytest.raises(CheckpointError) as error:
        cli.resolve_last(config)
    assert str(error.value) == (
        f"--ckpt_path last: no last.ckpt in checkpoint.dirpath {folder}; train first or give a checkpoint path"
    )
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"x")
    assert cli.resolve_last(config) == folder / "last.ckpt"


def test_exports_are_told_from_checkpoints_by_suffix_or_folder_then_by_what_they_hold(tmp_path, monkeypatch):
    """Catches a suffix of the four miswritten or matched the wrong way, a folder not read, the kind compared the
    wrong way, and an unreadable file taken for an export (the checkpoint reader names what is wrong with it)."""
    from types import SimpleNamespace

    from bdh_lightning import cli
    from bdh_lightning.errors import CheckpointError

    kinds = {"hf": "hf", "w.pt": "reference", "w.pth": "reference", "w.bin": "reference", "w.safetensors": "safetensors",
             "fit.pt": "lightning", "bad.pt": CheckpointError("damaged")}  # fmt: skip
    read = []

    def read_weights(where):
        read.append(where.name)
        if isinstance(kinds[where.name], Exception):
            raise kinds[where.name]
        return SimpleNamespace(kind=kinds[where.name])

    monkeypatch.setattr(cli, "read_weights", read_weights)
    (tmp_path / "hf").mkdir()
    for name in ("hf", "w.pt", "w.pth", "w.bin", "w.safetensors"):
        assert cli.exported_weights(str(tmp_path / name)), name
    assert not cli.exported_weights(str(tmp_path / "fit.pt"))  # a fit checkpoint under an export's suffix
    assert not cli.exported_weights(str(tmp_path / "bad.pt"))
    for name in ("last.ckpt", "w.PT", "w.txt", "w"):  # never read: no suffix of an export, not a folder
        assert not cli.exported_weights(str(tmp_path / name)), name
    assert read == ["hf", "w.pt", "w.pth", "w.bin", "w.safetensors", "fit.pt", "bad.pt"]


def test_a_config_must_be_a_mapping_of_sections_none_of_them_empty():
    """Catches a list or a number taken for settings, an empty file refused, the type misnamed, and an empty section."""
    from bdh_lightning.cli import check_sections
    from bdh_lightning.errors import UsageError

    check_sections("c.yaml", "")  # nothing: the defaults
    check_sections("c.yaml", "model:\n  n_layer: 2\ntrainer: {}\n")
    check_sections("c.yaml", "model: [\n")  # not YAML: jsonargparse names the line
    for text, kind in (("- 1\n- 2\n", "list"), ("3\n", "int"), ("just words\n", "str")):
        with pytest.raises(UsageError) as error:
            check_sections("c.yaml", text)
        assert str(error.value) == f"--config c.yaml holds a {kind}, not settings (model:, data:, trainer:)"
    with pytest.raises(UsageError) as error:
        check_sections("c.yaml", "model:\n  n_layer: 2\ndata:\ntrainer:\n")
    assert str(error.value) == "--config c.yaml: section data: is empty; give its settings under it or remove it"
    check_sections("c.yaml", "notes:\nmodel: {}\n")  # not a section of ours: jsonargparse says what it thinks of it
