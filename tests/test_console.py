"""What a run prints (issue 10): header, progress in steps, closing block, quiet by default; resumes with nothing
to do; runs refused before they start when they cannot fit; validate/test write no run folder. Through the real CLI,
then in-process: console.py's pieces word for word, driven with fake trainers and a fake clock."""

import io
import logging
import os
import pty
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import SUBPROCESS_ENV, TINY_ARGS, run_cli, scalar_tags, scalars, skip_under_mutmut, write_letters

from bdh_lightning import cli as cli_module
from bdh_lightning import console
from bdh_lightning.console import RunReport, RunSummary, format_bytes
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


def test_a_resume_with_nothing_to_do_says_so_and_writes_nothing(finished, monkeypatch, capsys):
    folder, _ = finished
    monkeypatch.chdir(folder)
    assert main(["fit", "--data.path", "corpus.txt", *RUN, "--trainer.max_steps", "10", "--ckpt_path", "last"]) == 0
    named, said = capsys.readouterr().err.splitlines()  # the checkpoint `last` chose, then why there is nothing to do
    assert named.startswith("--ckpt_path last: ") and "nothing to train" in said and "--trainer.max_steps" in said
    assert sorted(p.name for p in (folder / "lightning_logs").iterdir()) == ["version_0"]


def test_validate_and_test_write_no_run_folder(finished, monkeypatch, capsys):
    folder, _ = finished
    monkeypatch.chdir(folder)
    ckpt = "lightning_logs/version_0/checkpoints/last.ckpt"
    assert main(["validate", "--data.path", "corpus.txt", *RUN, "--ckpt_path", ckpt]) == 0
    assert "val/loss" in capsys.readouterr().out
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


# -- in-process: the console's pieces driven directly with fake trainers (the tests above run the real CLI) -------
class Clock:
    """time.perf_counter as the test sets it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console, "time", clock)
    return clock


def fake_trainer(**settings):
    """A trainer as the console reads one: 2 devices x 4 windows x 3 accumulated x 250 bytes = 6,000 bytes a step."""
    data = SimpleNamespace(batch_size=4, block_size=250, describe=lambda: "corpus corpus.txt: 1 file, 58.59 KiB")
    trainer = SimpleNamespace(
        datamodule=data, world_size=2, num_devices=2, num_nodes=1, accumulate_grad_batches=3, precision="bf16-mixed",
        strategy=SimpleNamespace(root_device=torch.device("cpu")), checkpoint_callback=None, default_root_dir="home",
        log_dir="runs/lightning_logs/version_3", is_global_zero=True, sanity_checking=False, max_steps=12,
        global_step=0, val_check_interval=5, log_every_n_steps=3, callback_metrics={}, progress_bar_metrics={},
        state=SimpleNamespace(fn="fit"),
    )  # fmt: skip
    for key, value in settings.items():
        setattr(trainer, key, value)
    return trainer


MODULE = SimpleNamespace(
    config=SimpleNamespace(num_parameters=1234567, n_layer=6, n_embd=256, n_head=4, neurons_per_head=8192, dropout=0.1)
)
HEADER = [
    "run        runs/lightning_logs/version_3",
    "device     2 x cpu, precision bf16-mixed",
    "model      1,234,567 parameters: 6 layers, D 256, 4 heads x N 8192 neurons, dropout 0.1",
    "batch      2 device(s) x 4 windows x 3 accumulated x 250 bytes = 6,000 bytes per optimizer step",
    "corpus     corpus.txt: 1 file, 58.59 KiB",
    "kernel     reference",
    "training   12 steps to step 12; validation every 5 batches",
]


def checkpoints(dirpath="runs/lightning_logs/version_3/checkpoints", last="", best=""):
    return SimpleNamespace(dirpath=dirpath, last_model_path=last, best_model_path=best)


def test_the_header_word_for_word(capsys, clock):
    """Catches a header line missing, reordered or miswritten, the CLI's own lines (kernel) dropped or misplaced, the
    run folder taken from elsewhere than trainer.log_dir, and the header printed on ranks other than global zero."""
    summary = RunSummary(["kernel     reference"])
    summary.on_train_start(fake_trainer(default_root_dir="elsewhere"), MODULE)
    assert capsys.readouterr().err.splitlines() == HEADER
    assert summary.start_time == 1000.0 and summary.start_step == 0
    RunSummary(["kernel     reference"]).on_train_start(fake_trainer(is_global_zero=False), MODULE)
    assert capsys.readouterr().err == ""


def test_the_header_of_a_resumed_multi_node_run_with_checkpoints():
    """Catches a wrong resume count (steps to do = max_steps - global_step), the resume note or the node count shown
    when they do not apply (one node, step 0), and the checkpoint folder left out of the run line."""
    trainer = fake_trainer(num_nodes=2, global_step=4, checkpoint_callback=checkpoints())
    lines = RunSummary().header(trainer, MODULE, "runs/lightning_logs/version_3")
    assert (
        lines[0]
        == "run        runs/lightning_logs/version_3   (checkpoints: runs/lightning_logs/version_3/checkpoints)"
    )
    assert lines[1] == "device     2 x cpu x 2 nodes, precision bf16-mixed"
    assert lines[-1] == "training   8 steps to step 12, resuming at step 4; validation every 5 batches"
    one_step = RunSummary().header(fake_trainer(max_steps=1, num_nodes=1), MODULE, None)
    assert one_step[1] == "device     2 x cpu, precision bf16-mixed"  # one node: no " x 1 nodes"
    assert one_step[-1] == "training   1 steps to step 1; validation every 5 batches"


@pytest.mark.parametrize("max_steps", [-1, 0, None])
def test_a_header_without_a_step_limit_has_no_training_line(max_steps):
    """Catches a training line computed from max_steps -1 (Lightning's "no limit"), 0 or None."""
    lines = RunSummary().header(fake_trainer(max_steps=max_steps), MODULE, "run")
    assert not any(line.startswith("training") for line in lines) and len(lines) == 5


def test_the_header_without_a_log_folder_data_description_or_checkpoint_folder():
    """Catches the run line not falling back to default_root_dir, a "(checkpoints: None)" from a callback with no
    folder, a corpus line without describe() (or a prefix stripped from the wrong end), and batch lines without data."""
    no_folder = checkpoints(dirpath=None)
    lines = RunSummary().header(fake_trainer(checkpoint_callback=no_folder), MODULE, None)
    assert lines[0] == "run        home"
    data = SimpleNamespace(batch_size=4, block_size=250)  # no describe()
    lines = RunSummary().header(fake_trainer(datamodule=data), MODULE, "run")
    assert [line[:11] for line in lines] == ["run        ", "device     ", "model      ", "batch      ", "training   "]
    data.describe = "not callable"
    assert RunSummary().header(fake_trainer(datamodule=data), MODULE, "run") == lines
    data.describe = lambda: "corpus corpus a corpus "
    assert RunSummary().header(fake_trainer(datamodule=data), MODULE, "run")[4] == "corpus     corpus a corpus "
    lines = RunSummary().header(fake_trainer(datamodule=None), MODULE, "run")
    assert [line[:11] for line in lines] == ["run        ", "device     ", "model      ", "training   "]


def test_bytes_per_step_is_the_product_of_devices_windows_accumulation_and_block():
    """Catches a division for any of the three products."""
    trainer = fake_trainer(world_size=2, accumulate_grad_batches=5)
    assert console.bytes_per_step(trainer, SimpleNamespace(batch_size=3, block_size=7)) == 210


def test_the_closing_block_word_for_word(capsys, clock, tmp_path):
    """Catches wrong step counts (done = now - start), elapsed time or average rate, val/bpb not val/loss / ln 2, a
    missing best or last checkpoint line, the TensorBoard folder not the parent of the run's, and paths unquoted."""
    summary = RunSummary()
    summary.on_train_start(fake_trainer(global_step=4), MODULE)
    capsys.readouterr()
    clock.now += 40.9
    callback = checkpoints(last="my runs/last.ckpt", best="my runs/best-step12.ckpt")
    trainer = fake_trainer(
        global_step=12, checkpoint_callback=callback, log_dir="my runs/lightning_logs/version_3",
        callback_metrics={"val/loss": torch.tensor(1.5)}, default_root_dir="elsewhere",
    )  # fmt: skip
    summary.on_fit_end(trainer, MODULE)
    assert capsys.readouterr().err.splitlines() == [
        "done       8 steps (now at step 12) in 0:00:40, 1.2 kB/s on average",
        "val/loss   1.5000   val/bpb 2.1640",
        "best       my runs/best-step12.ckpt",
        "last       my runs/last.ckpt",
        "next       tensorboard --logdir 'my runs/lightning_logs'",
        "           python -m bdh_lightning generate --ckpt_path 'my runs/last.ckpt' --prompt \"To be\"",
    ]
    summary.on_fit_end(fake_trainer(is_global_zero=False), MODULE)
    assert capsys.readouterr().err == ""


def test_the_closing_block_finds_last_ckpt_in_the_checkpoint_folder(clock, tmp_path):
    """Catches last.ckpt looked for elsewhere (or taken without checking that it exists) when Lightning's
    last_model_path is empty, and last_model_path ignored when it is set."""
    summary = RunSummary()
    summary.on_train_start(fake_trainer(), MODULE)
    callback = checkpoints(dirpath=str(tmp_path))
    trainer = fake_trainer(checkpoint_callback=callback)
    assert not any(line.startswith("last") for line in summary.closing(trainer, None))
    (tmp_path / "last.ckpt").write_bytes(b"")
    lines = summary.closing(trainer, None)
    assert lines[1:] == [
        f"last       {tmp_path}/last.ckpt",
        f'           python -m bdh_lightning generate --ckpt_path {tmp_path}/last.ckpt --prompt "To be"',
    ]
    callback.last_model_path = "named/last-v1.ckpt"
    assert summary.closing(trainer, None)[1] == "last       named/last-v1.ckpt"
    callback.dirpath = None
    assert summary.closing(trainer, None)[1] == "last       named/last-v1.ckpt"
    callback.last_model_path = ""
    assert summary.closing(trainer, None) == ["done       0 steps (now at step 0) in 0:00:00"]


def test_the_closing_block_of_a_run_without_steps_time_data_or_checkpoints(clock):
    """Catches an average rate from no steps, from no elapsed time (a division by zero) or without data, a rate shown
    for under a second, and checkpoint or generate lines without a checkpoint callback."""
    summary = RunSummary()
    summary.on_train_start(fake_trainer(global_step=2), MODULE)
    assert summary.closing(fake_trainer(global_step=2), None) == ["done       0 steps (now at step 2) in 0:00:00"]
    assert summary.closing(fake_trainer(global_step=5), None) == ["done       3 steps (now at step 5) in 0:00:00"]
    clock.now += 0.5
    assert summary.closing(fake_trainer(global_step=5), None) == [
        "done       3 steps (now at step 5) in 0:00:00, 36.0 kB/s on average"
    ]
    assert summary.closing(fake_trainer(global_step=5, datamodule=None), "a/b/c") == [
        "done       3 steps (now at step 5) in 0:00:00",
        "next       tensorboard --logdir a/b",
    ]


def test_a_fit_that_trains_nothing_closes_with_zero_steps_in_no_time(capsys, clock):
    """Catches the closing block of a fit whose training never started (`--trainer.limit_train_batches 0`: Lightning
    skips on_train_start) timing it from the clock's zero ("in 6:26:16") and counting the resumed steps as done."""
    summary = RunSummary()
    summary.on_fit_end(fake_trainer(global_step=7, log_dir=None), MODULE)
    assert capsys.readouterr().err == "done       0 steps (now at step 7) in 0:00:00\n"


@pytest.mark.parametrize(
    "seconds, text",
    [(-3.0, "0:00:00"), (0.0, "0:00:00"), (0.99, "0:00:00"), (1.0, "0:00:01"), (59.9, "0:00:59"), (60, "0:01:00"),
     (3725.9, "1:02:05"), (86400 + 1, "1 day, 0:00:01"), (2 * 86400, "2 days, 0:00:00")],
)  # fmt: skip
def test_durations_in_whole_seconds_and_never_negative(seconds, text):
    """Catches durations rounded instead of cut, a negative one (a clock step back) shown, and a floor above 0."""
    assert console.duration(seconds) == text


@pytest.mark.parametrize(
    "speed, text",
    [(0, "0 B/s"), (999.4, "999 B/s"), (1000, "1.0 kB/s"), (1000.5, "1.0 kB/s"), (36_000, "36.0 kB/s"),
     (999_949, "999.9 kB/s"), (1e6, "1.0 MB/s"), (2.46e6, "2.5 MB/s"), (1.5e9, "1500.0 MB/s")],
)  # fmt: skip
def test_rates_at_each_unit_edge(speed, text):
    """Catches a unit's threshold moved or made strict (1000 B/s is 1.0 kB/s), a unit miswritten, a multiplication."""
    assert console.rate(speed) == text


def test_memory_line_with_and_without_a_known_size(monkeypatch):
    """Catches the size shown when the device's memory is not known, or left out when it is."""
    monkeypatch.setattr(console, "device_memory", lambda device: (3 * 2**30, "available RAM is"))
    assert console.memory_line(1536 * 2**20, torch.device("cpu")) == (
        "memory     predicted peak 1.50 GiB (available RAM is 3.00 GiB); a prediction, not yet measured on this device"
    )
    monkeypatch.setattr(console, "device_memory", lambda device: (None, ""))
    assert console.memory_line(2048, torch.device("cpu")) == (
        "memory     predicted peak 2.00 KiB; a prediction, not yet measured on this device"
    )


def test_shown_escapes_control_bytes_and_lone_surrogates_only():
    """Catches control bytes (ESC, CR, BS, DEL, C1) printed raw, newline or tab escaped, non-ASCII text escaped, and a
    lone surrogate (a non-UTF-8 byte of a shell argument) raising instead of showing as \\udcNN."""
    assert console.shown("a\x1b[31mb\rc\x08d\x7fe\x85f") == "a\\x1b[31mb\\x0dc\\x08d\\x7fe\\xc2\\x85f"
    assert console.shown("line\n\ttab é ü 龍") == "line\n\ttab é ü 龍"
    assert console.shown("bad \udcff name") == "bad \\udcff name"


def test_say_is_one_escaped_line(capsys):
    """Catches a line written without its newline or with its control bytes raw."""
    console.say("run \x1b]0;title\x07 \udcfe")
    assert capsys.readouterr().err == "run \\x1b]0;title\\x07 \\udcfe\n"


def test_abandon_stdout_points_standard_output_at_dev_null(monkeypatch, tmp_path):
    """Catches standard output left where it was (a later flush at exit fails again), a descriptor leaked, and a
    standard output without a descriptor raising instead of being left alone."""
    path = tmp_path / "stdout"
    with path.open("wb") as file:
        monkeypatch.setattr(sys, "stdout", file)
        before = sorted(os.listdir("/proc/self/fd"))
        console.abandon_stdout()
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert os.path.samestat(os.fstat(file.fileno()), os.stat(os.devnull))
        os.write(file.fileno(), b"lost")
    assert path.read_bytes() == b""
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no descriptor: io.UnsupportedOperation
    console.abandon_stdout()
    monkeypatch.setattr(sys, "stdout", None)  # pythonw: no standard output at all
    console.abandon_stdout()


def test_quiet_silences_lightnings_notices_and_keeps_the_users_warnings(monkeypatch):
    """Catches a framework package whose deprecations still show, a deprecation or user warning of the user's own
    module silenced, a framework's own user warnings silenced wholesale, and a framework logger left at INFO (or the
    root logger raised instead)."""
    loggers = ["lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", ""]
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            console.quiet()
            for module in ("lightning.pytorch.trainer", "lightning", "pytorch_lightning.core", "torch.nn.modules",
                           "torch", "jsonargparse._core", "torchmetrics.metric"):  # fmt: skip
                for category in (DeprecationWarning, FutureWarning):
                    warnings.warn_explicit(f"old {module}", category, "f.py", 1, module=module)
            warnings.warn_explicit("The dirpath has changed from a to b", UserWarning, "f.py", 1, module="lightning")
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.warn_explicit(f"mine {category.__name__}", category, "f.py", 1, module="mytool.train")
            warnings.warn_explicit("a lightning warning", UserWarning, "f.py", 1, module="lightning.pytorch.trainer")
        assert [str(w.message) for w in caught] == [
            "mine DeprecationWarning",
            "mine FutureWarning",
            "mine UserWarning",
            "a lightning warning",
        ]
        assert {name: logging.getLogger(name).level for name in loggers} == {
            **{name: logging.WARNING for name in loggers[:-1]},
            "": logging.INFO,
        }
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# -- RunReport: progress between the header and the closing block ----------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def terminal(monkeypatch) -> Terminal:
    """stderr a terminal, read back afterwards with .getvalue() (set in the test itself: pytest's capture replaces
    sys.stderr after the fixtures are set up)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def started(trainer, header_lines=None) -> RunReport:
    report = RunReport(header_lines)
    report.on_train_start(trainer, MODULE)
    return report


def test_a_report_is_a_progress_bar_with_the_header_lines_and_stderrs_terminal_test(monkeypatch):
    """Catches the CLI's header lines lost by the report, the report created disabled, disable/enable swapped, and
    whether stderr is a terminal not read when the report is made."""
    terminal(monkeypatch)
    report = RunReport(["kernel     reference"])
    assert report.header_lines == ["kernel     reference"] and report.is_enabled and report.tty is True
    report.disable()
    assert report.is_enabled is False
    report.enable()
    assert report.is_enabled is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert RunReport().tty is False


def test_progress_in_a_log_file_every_log_interval_and_at_the_last_step(capsys, clock):
    """Catches progress lines on other steps than every log_every_n_steps-th and the last, on micro-batches that do
    not end an accumulation (3 here), on other ranks, during the sanity check, when disabled, and a wrong line."""
    trainer = fake_trainer(global_step=2, log_every_n_steps=3, accumulate_grad_batches=3, max_steps=7)
    report = started(trainer)
    capsys.readouterr()
    shown = {}
    for batch_idx in range(6, 21):  # steps 3 to 7: the step counts up as each third micro-batch ends
        trainer.global_step = (batch_idx + 1) // 3
        clock.now = 1000.0 + 10.0 * (trainer.global_step - 2)
        report.on_train_batch_end(trainer, MODULE, None, None, batch_idx)
        if err := capsys.readouterr().err:
            shown[batch_idx] = err
    assert shown == {
        8: "step 3/7  600 B/s  0:00:40 left\n",
        17: "step 6/7  600 B/s  0:00:10 left\n",
        20: "step 7/7  600 B/s  0:00:00 left\n",
    }
    for setting in ({"is_global_zero": False}, {"sanity_checking": True}):
        report.on_train_batch_end(fake_trainer(global_step=6, **setting), MODULE, None, None, 2)
    report.disable()
    report.on_train_batch_end(fake_trainer(global_step=6), MODULE, None, None, 2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("every, steps", [(1, [3, 4, 5]), (0, [3, 4, 5]), (2, [4])])
def test_log_every_n_steps_zero_means_every_step(capsys, clock, every, steps):
    """Catches an interval of 0 read as no progress (or a division by zero), and a floor of 2 instead of 1."""
    trainer = fake_trainer(log_every_n_steps=every, accumulate_grad_batches=1, max_steps=-1)
    report = started(trainer)
    capsys.readouterr()
    for step in (3, 4, 5):
        trainer.global_step = step
        clock.now += 1.0 if step > 3 else 3.0
        report.on_train_batch_end(trainer, MODULE, None, None, step)
    assert capsys.readouterr().err.splitlines() == [f"step {step}  2.0 kB/s" for step in steps]


def test_a_terminal_redraws_one_line_at_most_twice_a_second(monkeypatch, clock):
    """Catches redraws more often than every half second (or only every 1.5 s), the time since the last redraw
    measured from elsewhere, the line's erase sequence, redraws in a log file, and end_redraw's newline missing."""
    trainer = fake_trainer(global_step=1, log_every_n_steps=50, accumulate_grad_batches=1, max_steps=100)
    stream = terminal(monkeypatch)
    report = started(trainer)
    assert report.tty is True and report.last_time == clock.now
    stream.truncate(0)
    stream.seek(0)
    for step, seconds in ((2, 0.25), (3, 0.25), (4, 0.375), (5, 0.75), (6, 0.25)):  # exact in binary
        trainer.global_step = step
        clock.now += seconds
        report.on_train_batch_end(trainer, MODULE, None, None, step)
    assert stream.getvalue() == "\r\x1b[Kstep 3/100  8.0 kB/s  0:00:24 left\r\x1b[Kstep 5/100  4.9 kB/s  0:00:38 left"
    report.on_train_end(trainer, MODULE)
    report.on_train_end(trainer, MODULE)  # once only
    assert stream.getvalue().endswith("left\n") and report.redrawn is False


def test_the_progress_line_word_for_word(capsys, clock):
    """Catches the train loss, the last validation loss, the rate or the time left miswritten or shown when unknown
    (no loss logged, no validation yet, no step done, no step limit, under a second), and the parts' separator."""
    report = started(fake_trainer(global_step=2))
    capsys.readouterr()
    clock.now += 40.0
    trainer = fake_trainer(progress_bar_metrics={"train/loss": torch.tensor(2.34567)})
    report.show(trainer, 6)
    report.val_loss = 2.1
    report.show(trainer, 6)
    report.show(fake_trainer(max_steps=-1), 6)
    report.show(fake_trainer(max_steps=0), 2)
    report.show(fake_trainer(max_steps=1), 2)
    assert capsys.readouterr().err.splitlines() == [
        "step 6/12  loss 2.3457  600 B/s  0:01:00 left",
        "step 6/12  loss 2.3457  val 2.1000  600 B/s  0:01:00 left",
        "step 6  val 2.1000  600 B/s",
        "step 2  val 2.1000",
        "step 2/1  val 2.1000",
    ]
    report = started(fake_trainer())
    capsys.readouterr()
    clock.now += 0.5
    report.show(fake_trainer(), 1)
    report.start_time = clock.now
    report.show(fake_trainer(), 1)  # no time elapsed yet: no rate, no division by zero
    assert capsys.readouterr().err.splitlines() == ["step 1/12  12.0 kB/s  0:00:05 left", "step 1/12  0:00:00 left"]


def test_validation_prints_its_loss_once_and_the_progress_line_keeps_it(monkeypatch, clock):
    """Catches the validation line missing, miswritten, printed without a loss, on other ranks, in the sanity check,
    or outside fit (validate and test print their own table), and the terminal's line not ended before it."""
    trainer = fake_trainer(global_step=5, log_every_n_steps=50, accumulate_grad_batches=1)
    stream = terminal(monkeypatch)
    report = started(trainer)
    stream.truncate(0)
    stream.seek(0)
    clock.now += 1.0
    report.on_train_batch_end(trainer, MODULE, None, None, 0)
    for setting in ({}, {"is_global_zero": False}, {"sanity_checking": True}):
        report.on_validation_end(fake_trainer(**setting), MODULE)  # no val/loss
    assert report.val_loss is None
    for setting in ({"is_global_zero": False}, {"sanity_checking": True}):
        report.on_validation_end(fake_trainer(callback_metrics={"val/loss": torch.tensor(9.0)}, **setting), MODULE)
    assert report.val_loss is None
    report.on_validation_end(fake_trainer(global_step=5, callback_metrics={"val/loss": torch.tensor(2.0)}), MODULE)
    assert stream.getvalue() == "\r\x1b[Kstep 5/12\nstep 5: val/loss 2.0000, val/bpb 2.8854\n"
    validate = fake_trainer(callback_metrics={"val/loss": torch.tensor(3.0)}, state=SimpleNamespace(fn="validate"))
    report.on_validation_end(validate, MODULE)
    assert report.val_loss == 3.0 and stream.getvalue().endswith("val/bpb 2.8854\n")


def test_a_log_file_gets_no_stray_newline_at_the_end_of_training(capsys, clock):
    """Catches end_redraw writing a newline after no redraw (a blank line in every log), or on other ranks."""
    report = started(fake_trainer())
    report.on_train_end(fake_trainer(), MODULE)
    report.redrawn = True
    report.on_train_end(fake_trainer(is_global_zero=False), MODULE)
    assert capsys.readouterr().err.splitlines() == [line for line in HEADER if not line.startswith("kernel")]
