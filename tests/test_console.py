"""What a run prints (issue 10): header, progress in steps, closing block, quiet by default; resumes with nothing
to do; runs refused before they start when they cannot fit; validate/test write no run folder."""

import os
import pty
import subprocess
import sys

import pytest
from conftest import SUBPROCESS_ENV, TINY_ARGS, run_cli, scalar_tags, scalars, skip_under_mutmut, write_letters

from bdh_lightning import cli as cli_module
from bdh_lightning.console import format_bytes
from bdh_lightning.main import main

# TINY_ARGS without its "no progress bar": the report is the progress bar.
RUN = (
    "--model.n_layer 2 --model.n_embd 32 --model.n_head 2 --model.mlp_internal_dim_multiplier 8 --data.block_size 32 "
    "--data.batch_size 8 --data.val_windows 8 --trainer.val_check_interval 5 --trainer.log_every_n_steps 2"
).split()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One 10-step run through the real CLI, its stderr read as a log file (not a terminal)."""
    folder = tmp_path_factory.mktemp("console")
    write_letters(folder / "corpus.txt")
    done = run_cli(
        folder, "fit", "--data.path", "corpus.txt", *RUN, "--trainer.max_steps", "10", "--sample.length", "20"
    )
    assert done.returncode == 0, done.stderr
    return folder, done


def test_header_progress_and_closing_block_in_a_log_file(finished):
    folder, done = finished
    err = done.stderr
    lines = err.splitlines()
    for head in ("run ", "device ", "model ", "batch ", "kernel ", "memory ", "training "):
        assert any(line.startswith(head) for line in lines), (head, err)
    assert "version_0" in lines[0] and "checkpoints" in lines[0]
    assert "1 device(s) x 8 windows x 1 accumulated x 32 bytes = 256 bytes per optimizer step" in err
    assert "kernel     reference: on the CPU, below 2**23 elements" in err
    progress = [line for line in lines if line.startswith("step ") and "/10" in line]
    assert [line.split()[1] for line in progress] == [
        "2/10",
        "4/10",
        "6/10",
        "8/10",
        "10/10",
    ]  # every log_every_n_steps
    assert "\r" not in err  # no redraws in a file
    assert "step 5: val/loss" in err and "step 10: val/loss" in err
    closing = err[err.index("done ") :]
    assert "10 steps" in closing and "val/bpb" in closing and "last.ckpt" in closing and "best-step10.ckpt" in closing
    assert "tensorboard --logdir" in closing and "generate --ckpt_path" in closing


def test_quiet_by_default(finished):
    _, done = finished
    err = done.stderr
    for noise in ("GPU available", "Tip", "Warning", "warn", "v_num", "LeafSpec", "Seed set", "FLOPs", "| Name"):
        assert noise not in err, noise
    assert "--- sample after 10 steps ---" in done.stdout


def test_tensorboard_steps_agree_and_no_hp_metric(finished):
    folder, _ = finished
    run = folder / "lightning_logs" / "version_0"
    tags = scalar_tags(run)
    assert "hp_metric" not in tags
    val_steps = sorted(scalars(run, "val/loss"))
    assert len(val_steps) == 2 and sorted(scalars(run, "sparsity/layer0/a")) == val_steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run)).Reload()
    sample_steps = sorted(e.step for e in acc.Tensors("sample/text_summary"))
    assert sample_steps == val_steps


def test_a_terminal_gets_one_redrawn_progress_line(tmp_path):
    write_letters(tmp_path / "corpus.txt")
    skip_under_mutmut()
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bdh_lightning",
            "fit",
            "--data.path",
            "corpus.txt",
            *RUN,
            "--trainer.max_steps",
            "4",
            "--sample.length",
            "0",
        ],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=child_fd,
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    shown = b"".join(chunks).decode()
    assert "\r\x1b[K" in shown and "step 4/4" in shown and "done " in shown


def test_a_resume_with_nothing_to_do_says_so_and_writes_nothing(finished):
    folder, _ = finished
    done = run_cli(folder, "fit", "--data.path", "corpus.txt", *RUN, "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert done.returncode == 0
    named, said = done.stderr.splitlines()  # the checkpoint `last` chose, then why there is nothing to do
    assert named.startswith("--ckpt_path last: ") and "nothing to train" in said and "--trainer.max_steps" in said
    assert sorted(p.name for p in (folder / "lightning_logs").iterdir()) == ["version_0"]


def test_validate_and_test_write_no_run_folder(finished):
    folder, _ = finished
    ckpt = "lightning_logs/version_0/checkpoints/last.ckpt"
    done = run_cli(folder, "validate", "--data.path", "corpus.txt", *RUN, "--ckpt_path", ckpt)
    assert done.returncode == 0, done.stderr
    assert "val/loss" in done.stdout
    assert sorted(p.name for p in (folder / "lightning_logs").iterdir()) == ["version_0"]
    assert not (folder / "config.yaml").exists()


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    monkeypatch.setattr(cli_module, "device_memory", lambda device: (3 * 2**20, "available RAM is"))
    args = ["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--data.batch_size", "64", "--trainer.max_steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "available RAM is 3.00 MiB" in err
    assert "--data.batch_size" in err and "--trainer.accumulate_grad_batches" in err and "--force" in err
    assert not (tmp_path / "lightning_logs").exists()
    assert main([*args, "--force"]) == 0  # a prediction only: --force starts it


def test_every_input_safe_header_and_closing_block_without_the_progress_bar(tmp_path, monkeypatch, capsys):
    """Issue 29: --trainer.enable_progress_bar false (batch jobs) keeps the header and the closing block."""
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    args = ["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--trainer.max_steps", "2", "--sample.length", "0"]
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    for head in ("run ", "device ", "model ", "batch ", "kernel ", "memory ", "training ", "done ", "last "):
        assert any(line.startswith(head) for line in lines), (head, lines)
    assert not any(line.startswith("step ") for line in lines)  # the progress lines stay off


def test_format_bytes_at_each_unit_boundary():
    cases = {0: "0 B", 10.7: "10 B", 1023: "1023 B", 1024: "1.00 KiB", 1536: "1.50 KiB", 2**20 - 1: "1024.00 KiB",
             2**20: "1.00 MiB", 3 * 2**20: "3.00 MiB", 2**30: "1.00 GiB", 2**31: "2.00 GiB", 3 * 2**30: "3.00 GiB",
             -2048: "-2.00 KiB"}  # fmt: skip
    assert {n: format_bytes(n) for n in cases} == cases
