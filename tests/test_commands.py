"""The subcommands beside fit/validate/test: listed in --help, typed flags, one-line errors."""

import errno
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO

from bdh_lightning import commands, estimate, files, generate
from bdh_lightning.cli import COMMANDS, parse_settings
from bdh_lightning.console import shown
from bdh_lightning.errors import BDHError, ResourceError, UsageError
from bdh_lightning.main import command_function, main
from bdh_lightning.model import BDH, BDHConfig


def test_every_listed_command_resolves_to_a_documented_function(capsys):
    for name in COMMANDS:
        function = command_function(name)
        assert function.__doc__ and "Args:" in function.__doc__, name
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"python -m bdh_lightning {name}" in capsys.readouterr().out


def test_top_level_help_lists_every_command_and_ends_in_a_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", *COMMANDS))
    assert out.rstrip().endswith(".")


def test_estimate_describes_this_machine_by_default(capsys):
    assert main(["estimate", "--config", str(REPO / "configs" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "predicting for this machine: cpu, precision 32-true" in out and "device cpu" in out
    assert "fits" in out  # compared with this machine's memory without a --budget
    assert main(["estimate", "--config", str(REPO / "configs" / "tiny.yaml"), "--device", "cuda"]) == 0
    assert "precision bf16-mixed" in capsys.readouterr().out


def test_an_unknown_flag_is_one_line_naming_the_commands_help(capsys):
    assert main(["estimate", "--config", "x.yaml", "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "estimate --help" in err


# In-process checks of commands.py's pieces (the child-process tests elsewhere are skipped under mutmut).


def write_config(tmp_path, trainer=None, **data) -> str:
    """A fit config of a small model (batch 4 x block 32 unless `data` says otherwise)."""
    config = {
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "mlp_internal_dim_multiplier": 8},
        "data": {"path": "unused.txt", "block_size": 32, "batch_size": 4, **data},
        "trainer": {"max_steps": 1, **(trainer or {})},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def expected_estimate(config: str, first: str, precision: str, target: str, limit) -> str:
    kwargs = dict(vars(parse_settings(["--config", config]).model))
    table = estimate.render(estimate.estimate_memory(kwargs, 4, 32, precision, target), kwargs, limit)
    return f"{first}\n{table}\n"


@pytest.fixture
def machine(monkeypatch):
    """This machine as estimate sees it: CUDA or not (`machine(cuda)`), the memory device_memory reports for each
    device asked about (recorded), and default_precision's answer (16-true: what no fallback would pick)."""
    asked = []

    def set_up(cuda: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(commands, "default_precision", lambda: "16-true")

        def memory(device):
            asked.append(device)
            return 3 * 10**9, "available RAM is"

        monkeypatch.setattr(commands, "device_memory", memory)
        return asked

    return set_up


@pytest.mark.parametrize(
    "cuda, device, first, precision, target",
    [
        (False, "auto", "predicting for this machine: cpu, precision 16-true", "16-true", "cpu"),
        (True, "auto", "predicting for this machine: cuda, precision 16-true", "16-true", "cuda"),
        (False, "cpu", "predicting for this machine: cpu, precision 16-true", "16-true", "cpu"),
        (True, "cuda", "predicting for this machine: cuda, precision 16-true", "16-true", "cuda"),
        (False, "cuda", "predicting for cuda, precision bf16-mixed", "bf16-mixed", "cuda"),
        (True, "cpu", "predicting for cpu, precision 32-true", "32-true", "cpu"),
    ],
)
def test_estimate_prints_which_machine_and_precision_then_the_table(
    tmp_path, capsys, machine, cuda, device, first, precision, target
):
    """Catches: another machine or precision taken for `auto`, cuda and cpu (here: default_precision; elsewhere
    bf16-mixed on CUDA, 32-true on the CPU), this machine's memory asked of another device or asked at all when
    predicting for another machine (the fits column then absent), or the table not estimate's for the config."""
    asked = machine(cuda)
    config = write_config(tmp_path)
    if device == "auto":
        assert commands.estimate_command(config) == 0
    else:
        assert commands.estimate_command(config, device=device) == 0
    here = first.startswith("predicting for this machine")
    assert asked == ([torch.device(target)] if here else [])
    assert capsys.readouterr().out == expected_estimate(config, first, precision, target, 3 * 10**9 if here else None)


def test_estimate_precision_from_flag_then_config_and_budget_over_memory(tmp_path, capsys, machine):
    """Catches: --precision not overriding the config's trainer.precision, the config's ignored for the default,
    --budget not parsed as bytes or this machine's memory asked for despite it."""
    asked = machine(False)
    config = write_config(tmp_path, trainer={"precision": "bf16-mixed"})
    assert commands.estimate_command(config, budget="1GB") == 0
    first = "predicting for this machine: cpu, precision bf16-mixed"
    assert capsys.readouterr().out == expected_estimate(config, first, "bf16-mixed", "cpu", 10**9)
    assert commands.estimate_command(config, budget="2GiB", precision="16") == 0
    first = "predicting for this machine: cpu, precision 16-mixed"
    assert capsys.readouterr().out == expected_estimate(config, first, "16-mixed", "cpu", 2 * 2**30)
    assert asked == []


@pytest.mark.parametrize(
    "data, trainer, message",
    [
        ({"batch_size": 0}, None, "data.batch_size must be a positive integer, got 0"),
        ({"block_size": -1}, None, "data.block_size must be a positive integer, got -1"),
        ({}, {"accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches must be a positive integer, got 0"),
    ],
)
def test_estimate_refuses_what_fit_refuses(tmp_path, capsys, machine, data, trainer, message):
    """Catches: a batch, block or accumulation that fit refuses estimated anyway (or refused with another line)."""
    machine(False)
    with pytest.raises(BDHError) as refused:
        commands.estimate_command(write_config(tmp_path, trainer=trainer, **data))
    assert str(refused.value) == message and capsys.readouterr().out == ""


def test_estimate_refuses_a_missing_config_and_a_bad_model(tmp_path, capsys, machine):
    """Catches: a missing --config read anyway, a model fit would refuse (n_embd not divisible) estimated."""
    machine(False)
    with pytest.raises(UsageError, match=r"^--config .*nothing\.yaml: no such file$"):
        commands.estimate_command(str(tmp_path / "nothing.yaml"))
    config = write_config(tmp_path)
    Path(config).write_text(Path(config).read_text().replace("n_head: 2", "n_head: 3"))
    with pytest.raises(BDHError):
        commands.estimate_command(config)
    assert capsys.readouterr().out == ""


def test_estimate_accepts_one_accumulation_step(tmp_path, capsys, machine):
    """Catches: accumulate_grad_batches checked as anything but a positive integer (1 is fine)."""
    machine(False)
    assert commands.estimate_command(write_config(tmp_path, trainer={"accumulate_grad_batches": 1})) == 0
    assert capsys.readouterr().out.startswith("predicting for this machine: cpu, precision 16-true\nparameters: ")


SMALL = SimpleNamespace(config=SimpleNamespace(n_layer=2, n_head=3, neurons_per_head=5, n_embd=7))
# per sample, chunk 4: 4 * (2*3*5*7 state + 6*3*4*5 activations + 2*3*4*4 scores) = 4 * 666 bytes
PER_SAMPLE = 2664


def test_sample_memory_refused_one_byte_over_and_accepted_at_the_edge(monkeypatch):
    """Catches: another per-sample size (state, activations, scores, the chunk as max not min of chunk_size and
    the prompt), >= for >, another suggested --num_samples, or another message."""
    have = {}
    monkeypatch.setattr(commands, "device_memory", lambda where: (have["bytes"], "available RAM is"))
    for chunk_size, prompt_length in ((4, 9), (9, 4)):
        have["bytes"] = 10 * PER_SAMPLE
        commands.check_sample_memory(SMALL, 10, prompt_length, chunk_size, torch.device("cpu"))
        have["bytes"] = 10 * PER_SAMPLE - 1
        with pytest.raises(ResourceError) as refused:
            commands.check_sample_memory(SMALL, 10, prompt_length, chunk_size, torch.device("cpu"))
        assert str(refused.value) == (
            "--num_samples 10 needs about 26.02 KiB (2.60 KiB per sample: the recurrent state and a prompt chunk) "
            "but available RAM is 26.01 KiB; use at most --num_samples 4, or a smaller --chunk_size"
        )
    have["bytes"] = PER_SAMPLE - 1  # not even one fits: still suggest 1
    with pytest.raises(ResourceError, match="use at most --num_samples 1, or"):
        commands.check_sample_memory(SMALL, 1, 4, 4, torch.device("cpu"))


@pytest.mark.parametrize("have", [None, 0])
def test_sample_memory_unknown_is_not_refused(monkeypatch, have):
    """Catches: a machine whose memory is unknown (None, 0) refused as if it had none."""
    monkeypatch.setattr(commands, "device_memory", lambda where: (have, ""))
    commands.check_sample_memory(SMALL, 10**6, 4, 4, torch.device("cpu"))


def test_sample_memory_asks_the_sampling_device(monkeypatch):
    """Catches: the memory of another device than the one sampled on."""
    asked = []
    monkeypatch.setattr(commands, "device_memory", lambda where: asked.append(where) or (None, ""))
    commands.check_sample_memory(SMALL, 1, 4, 4, torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]


def run_folder(tmp_path, precision) -> Path:
    """A checkpoint path inside a run folder whose config.yaml says trainer.precision (none: no config.yaml)."""
    checkpoints = tmp_path / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if precision is not None:
        (tmp_path / "version_0" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"precision": precision}}))
    return checkpoints / "last.ckpt"


@pytest.mark.parametrize(
    "device, flag, run, dtype",
    [
        ("cpu", "bf16", "bf16-mixed", torch.float32),
        ("cpu", "auto", "16-mixed", torch.float32),
        ("cuda", "auto", "bf16-mixed", torch.bfloat16),
        ("cuda:1", "auto", "16-mixed", torch.float16),
        ("cuda", "auto", None, torch.float32),
        ("cuda", "32", "bf16-mixed", torch.float32),
        ("cuda", "bf16", None, torch.bfloat16),
        ("cuda", "16", "bf16-mixed", torch.float16),
    ],
)
def test_sampling_dtype(tmp_path, device, flag, run, dtype):
    """Catches: anything but float32 on the CPU, --precision not overriding the run's, auto not reading the run's
    config.yaml, or a run without one not float32."""
    assert commands.sampling_dtype(torch.device(device), flag, run_folder(tmp_path, run)) == dtype


class Terminal:
    """A stand-in standard output recording each write, flush and reconfigure, in order."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def reconfigure(self, **settings):
        self.calls.append(("reconfigure", settings))

    def write(self, text):
        if self.fail:
            raise self.fail
        self.calls.append(("write", text))

    def flush(self):
        self.calls.append(("flush",))

    def written(self) -> str:
        return "".join(call[1] for call in self.calls if call[0] == "write")


def test_one_sample_streams_as_text_each_piece_written_and_flushed(monkeypatch):
    """Catches: the prompt not shown at once, a byte held back or a partial UTF-8 sequence written early, empty
    writes, a missing flush, invalid bytes or control bytes unescaped, a tab or newline escaped, no final newline,
    or a terminal not told to escape what it cannot show."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    sink = commands.TextSink(1, b"a\tb\x1b\n")
    assert terminal.calls == [("reconfigure", {"errors": "backslashreplace"}), ("write", "a\tb\\x1b\n"), ("flush",)]
    del terminal.calls[:]
    for value in (0xC3, 0xA9, 0xFF, 0x07, 0xE2, 0x82):
        sink.add([value])
    assert terminal.calls == [("write", "\u00e9"), ("flush",), ("write", "\\xff"), ("flush",)] + [
        ("write", "\\x07"),
        ("flush",),
    ]
    sink.close()  # the unfinished sequence's bytes, then the newline
    assert terminal.calls[-2:] == [("write", "\\xe2\\x82\n"), ("flush",)]
    sink.abort()
    assert len(terminal.calls) == 8


def test_several_samples_are_printed_one_after_another_at_the_end(monkeypatch):
    """Catches: several samples streamed interleaved, a sample's bytes given to another, a header miscounted, an
    unfinished sequence dropped, or the blocks written in several writes."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    sink = commands.TextSink(3, b"\xc3")  # the prompt's own unfinished sequence, finished by the first sample
    for values in ([0xA9, 0x41, 0x0D], [0x42, 0x42, 0xF0]):
        sink.add(values)
    assert terminal.written() == ""
    sink.close()
    assert terminal.calls[1:] == [
        ("write", "--- sample 1/3 ---\n\u00e9B\n--- sample 2/3 ---\n\\xc3AB\n--- sample 3/3 ---\n\\xc3\\x0d\\xf0\n"),
        ("flush",),
    ]


def test_text_output_without_reconfigure_is_written_as_is(monkeypatch, capsys):
    """Catches: an output without reconfigure (a plain stream) refused; the text still goes to sys.stdout."""
    written = io.StringIO()
    monkeypatch.setattr(sys, "stdout", written)
    commands.TextSink(1, b"hi").close()
    assert written.getvalue() == "hi\n"


def test_a_closed_reader_ends_quietly_and_a_failed_write_is_one_error(monkeypatch):
    """Catches: a BrokenPipeError turned into an error line, or another OSError not reported as a failed write
    (standard output then pointed at /dev/null so the exit's flush cannot fail again)."""
    monkeypatch.setattr(sys, "stdout", Terminal(fail=BrokenPipeError(errno.EPIPE, "Broken pipe")))
    abandoned = []
    monkeypatch.setattr(commands, "abandon_stdout", lambda: abandoned.append(True))
    with pytest.raises(BrokenPipeError):
        commands.TextSink(1, b"x")
    assert abandoned == []
    monkeypatch.setattr(sys, "stdout", Terminal(fail=OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ResourceError) as failed:
        commands.TextSink(1, b"x")
    assert str(failed.value) == (
        "cannot write the generated text to standard output (No space left on device); free some space or write "
        "elsewhere; nothing more was written"
    )
    assert abandoned == [True]


class Bytes(io.BytesIO):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def write(self, data):
        self.log.append(("bytes", bytes(data)))
        return super().write(data)


def test_raw_output_is_the_exact_bytes_after_the_text_already_written(monkeypatch):
    """Catches: raw bytes written as text or escaped, anything added (a newline at close), or the text stream not
    flushed before bytes go under it."""
    terminal = Terminal()
    terminal.buffer = Bytes(terminal.calls)
    monkeypatch.setattr(sys, "stdout", terminal)
    sink = commands.RawSink(b"\x1bp\xff")
    sink.add([0x00])
    sink.add([0xC3])
    sink.close()
    assert terminal.calls == [("flush",), ("bytes", b"\x1bp\xff"), ("bytes", b"\x00"), ("bytes", b"\xc3")]
    assert terminal.buffer.getvalue() == b"\x1bp\xff\x00\xc3"


def test_raw_output_without_a_buffer_writes_to_the_stream_itself(monkeypatch):
    """Catches: a standard output without .buffer (already binary) refused."""
    stream = Bytes([])
    stream.flush = lambda: None
    monkeypatch.setattr(sys, "stdout", stream)
    commands.RawSink(b"ab").add([0x0A])
    assert stream.getvalue() == b"ab\n"


def test_files_are_written_beside_and_renamed_when_complete(tmp_path, monkeypatch):
    """Catches: the target written (or replaced) before the end, the temporary file not synced before its rename
    or left behind, a sample's bytes in another's file, or the prompt missing."""
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_bytes(b"old")
    sink = commands.FileSink(paths, b"p\n")
    sink.add([0x41, 0x42])
    sink.add([0xFF, 0x00])
    assert paths[0].read_bytes() == b"old" and not paths[1].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.txt", *(files.temporary_beside(p).name for p in paths)]
    )
    sink.close()
    assert [p.read_bytes() for p in paths] == [b"p\nA\xff", b"p\nB\x00"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert {str(files.temporary_beside(p)) for p in paths} <= set(synced)
    assert all(file.closed for file in sink.files)


def test_a_device_or_pipe_is_written_in_place(tmp_path, monkeypatch):
    """Catches: a target that is not a regular file (a FIFO, /dev/stdout) replaced through a rename, or fsynced."""
    monkeypatch.setattr(commands, "is_plain_target", lambda path: False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync of a pipe"))
    path = tmp_path / "pipe"
    sink = commands.FileSink([path], b"p")
    sink.add([0x71])
    sink.close()
    assert path.read_bytes() == b"pq" and [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_is_plain_target(tmp_path):
    """Catches: a FIFO or folder taken for a file that can be replaced by a rename, or a new name refused."""
    (tmp_path / "file").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    assert commands.is_plain_target(tmp_path / "file") and commands.is_plain_target(tmp_path / "new")
    assert not commands.is_plain_target(tmp_path / "fifo") and not commands.is_plain_target(tmp_path)


class FailingFile:
    """An open file whose write, flush or close fails (a full disk)."""

    def __init__(self, file, failing):
        self.file, self.failing = file, failing

    def __getattr__(self, name):
        if name in self.failing:

            def fail(*args):
                if name == "close":
                    self.file.close()
                raise OSError(errno.ENOSPC, "No space left on device")

            return fail
        return getattr(self.file, name)


FULL = (
    "cannot write --output {} (No space left on device); free some space or write elsewhere; nothing more was written"
)


@pytest.mark.parametrize("failing", ["write", "flush"])
def test_a_failed_write_removes_every_temporary_file_and_keeps_the_targets(tmp_path, failing):
    """Catches: a failure while writing or closing left as a traceback, the temporary files left behind, a target
    replaced by a partial file, or files left open."""
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_bytes(b"old")
    sink = commands.FileSink(paths, b"p")
    opened = list(sink.files)
    sink.files[0] = FailingFile(sink.files[0], {failing})
    with pytest.raises(ResourceError) as failed:
        sink.add([0x41, 0x42])
        sink.close()
    assert str(failed.value) == FULL.format(paths[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and paths[0].read_bytes() == b"old"
    assert all(file.closed for file in opened)


def test_a_failed_sync_removes_the_temporary_files(tmp_path, monkeypatch):
    """Catches: a failure to sync before the rename not reported, or the partial file renamed anyway."""
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    sink = commands.FileSink([tmp_path / "a.txt"], b"p")
    with pytest.raises(ResourceError, match=r"\(Input/output error\); nothing more was written$"):
        sink.close()
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_opened_is_one_error_and_removes_the_ones_opened(tmp_path):
    """Catches: a failure opening the second file left as a traceback, or the first's temporary file left."""
    paths = [tmp_path / "a.txt", tmp_path / "missing" / "b.txt"]
    with pytest.raises(ResourceError, match=r"^cannot write --output .*a\.txt \(No such file or directory\); noth"):
        commands.FileSink(paths, b"p")
    assert list(tmp_path.iterdir()) == []


def test_abort_closes_every_file_even_when_one_fails_to_close(tmp_path):
    """Catches: an abort stopped by a close that fails, a temporary file left, or a target in place (a pipe)
    removed."""
    (tmp_path / "pipe").write_bytes(b"")
    sink = commands.FileSink([tmp_path / "a.txt", tmp_path / "b.txt"], b"p")
    opened = list(sink.files)
    sink.files[0] = FailingFile(sink.files[0], {"close"})
    sink.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "pipe"] and all(file.closed for file in opened)
    sink.parts[1] = sink.paths[1] = tmp_path / "pipe"  # written in place: not removed
    sink.abort()
    assert (tmp_path / "pipe").exists()


class Collected:
    def __init__(self, fail_on=None):
        self.values, self.calls, self.fail_on, self.autocast = [], [], fail_on, []

    def add(self, values):
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        self.values.append(values)
        if self.fail_on == "add":
            raise KeyboardInterrupt

    def close(self):
        self.calls.append("close")
        if self.fail_on == "close":
            raise ResourceError("full")

    def abort(self):
        self.calls.append("abort")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)).eval()


def test_stream_samples_feeds_the_sink_then_closes_it(small_model, monkeypatch):
    """Catches: bytes other than sample_bytes' (seed, settings, samples, length not passed), the sink not closed
    (or aborted) after, autocast on in float32 or off (or in another dtype) in float16, or the time taken not end minus start."""
    settings = dict(temperature=0.5, top_k=5, top_p=0.9, chunk_size=2)
    expected = [b.tolist() for b in generate.sample_bytes(small_model, b"abc", 4, 2, 7, **settings)]
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(commands, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    sink = Collected()
    with warnings.catch_warnings():  # autocast asked for float32 would warn "disabling" (on CPU and CUDA alike)
        warnings.simplefilter("error")
        assert commands.stream_samples(small_model, sink, b"abc", 2, 4, 7, torch.float32, settings) == 2.5
    assert sink.values == expected and sink.calls == ["close"] and sink.autocast == [False] * 4
    sink = Collected()
    monkeypatch.setattr(commands, "time", time)
    commands.stream_samples(small_model, sink, b"abc", 1, 2, 7, torch.float16, settings)  # not CPU's default bf16
    assert sink.autocast == [torch.float16, torch.float16] and sink.calls == ["close"]


@pytest.mark.parametrize("fail_on, error", [("add", KeyboardInterrupt), ("close", ResourceError)])
def test_stream_samples_aborts_the_sink_on_any_failure(small_model, fail_on, error):
    """Catches: a sink left unaborted (temporary files behind) on Ctrl-C or a failed close, or the error swallowed."""
    sink = Collected(fail_on)
    settings = dict(temperature=1.0, top_k=None, top_p=1.0, chunk_size=256)
    with pytest.raises(error):
        commands.stream_samples(small_model, sink, b"a", 1, 3, 0, torch.float32, settings)
    assert sink.calls == (["abort"] if fail_on == "add" else ["close", "abort"])


def test_a_failure_closing_the_second_file_keeps_the_first_complete_one(tmp_path):
    """Catches: the abort after a first file was already renamed into place failing on its missing temporary file
    (a FileNotFoundError in place of the one-line error), or the second file's temporary file left behind."""
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    sink = commands.FileSink(paths, b"p")
    sink.files[1] = FailingFile(sink.files[1], {"flush"})
    with pytest.raises(ResourceError) as failed:
        sink.close()
    assert str(failed.value) == FULL.format(paths[0])
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and paths[0].read_bytes() == b"p"


def test_a_file_sink_refuses_a_sample_count_other_than_its_files(tmp_path):
    """Catches: bytes of more samples than files silently dropped (zip without strict)."""
    sink = commands.FileSink([tmp_path / "a.txt"], b"p")
    with pytest.raises(ValueError):
        sink.add([0x41, 0x42])
    sink.abort()


def test_resolve_device(monkeypatch):
    """Catches: auto not cuda where CUDA is, cpu or cuda:N refused (or another device type accepted), cuda taken
    where there is none, or the refusals' wording."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert commands.resolve_device("auto") == torch.device("cpu") == commands.resolve_device("cpu")
    for name, message in (
        ("gpu", "--device 'gpu' is not a device; use cpu, cuda, cuda:N or auto"),
        ("cuda", "--device cuda: CUDA is not available here; use --device cpu"),
        ("meta", "--device meta: only cpu and cuda are supported"),
    ):
        with pytest.raises(UsageError) as refused:
            commands.resolve_device(name)
        assert str(refused.value) == message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert commands.resolve_device("auto") == torch.device("cuda") == commands.resolve_device("cuda")
    assert commands.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert commands.resolve_device("cpu") == torch.device("cpu")


def test_sample_paths(tmp_path, monkeypatch):
    """Catches: several samples not written to FILE-1.ext, FILE-2.ext, --overwrite not passed on, or the refusals
    of --raw with --output or several samples, and of a closed standard output, worded otherwise."""
    path = tmp_path / "out.txt"
    assert commands.sample_paths(None, 1, False, False) == [] and commands.sample_paths(str(path), 1, False, False) == [
        path
    ]
    several = [tmp_path / "out-1.txt", tmp_path / "out-2.txt"]
    several[1].write_bytes(b"old")
    assert commands.sample_paths(str(path), 2, True, False) == several
    with pytest.raises(UsageError, match="out-2.txt exists"):
        commands.sample_paths(str(path), 2, False, False)
    for args, message in (
        ((str(path), 1, False, True), "give --raw (exact bytes to standard output) or --output FILE, not both"),
        (
            (None, 2, False, True),
            "--raw writes one sample's exact bytes; for several use --output FILE (FILE-1, FILE-2, ...)",
        ),
    ):
        with pytest.raises(UsageError) as refused:
            commands.sample_paths(*args)
        assert str(refused.value) == message
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(UsageError) as refused:
        commands.sample_paths(None, 1, False, False)
    assert str(refused.value) == "standard output is closed; give --output FILE to write the text to a file"


def test_generate_command_in_process(small_model, tmp_path, capsys, monkeypatch):
    """Catches: a setting (top_k, top_p, temperature, seed, n_layer, the device or dtype) not passed on to the
    sampler or the loader, the text not what sample_bytes gives, or the closing line's count or rate wrong."""
    weights = tmp_path / "weights.pt"
    torch.save(small_model.state_dict(), weights)
    settings = dict(temperature=0.7, top_k=5, top_p=0.9, chunk_size=1)
    args = dict(prompt="ab", max_new_tokens=6, seed=3, n_layer=2)
    streamed, stream_samples = [], commands.stream_samples
    monkeypatch.setattr(commands, "stream_samples", lambda *a: streamed.append(a[6]) or stream_samples(*a))
    assert commands.generate_command(str(weights), **args, **settings) == 0
    assert streamed == [torch.float32]
    sampled = [b.tolist() for b in generate.sample_bytes(small_model, b"ab", 6, 1, 3, **settings)]
    out, err = capsys.readouterr()
    text = b"ab" + bytes(v for values in sampled for v in values)
    assert out == shown(text.decode("utf-8", "backslashreplace")) + "\n"
    line = re.fullmatch(r"\[6 bytes in (\d+\.\d\d) s, (\d+\.\d) bytes/s, cpu, torch.float32\]\n", err)
    seconds, rate = float(line[1]), float(line[2])  # seconds shown rounded to 0.01
    assert 6 / (seconds + 0.005) - 0.05 <= rate <= 6 / max(seconds - 0.005, 1e-9) + 0.05
    output = tmp_path / "out.bin"
    assert commands.generate_command(str(weights), **args, **settings, output=str(output)) == 0
    assert output.read_bytes() == text
    assert capsys.readouterr().err.endswith(f", cpu, torch.float32, written to {output}]\n")
    outputs = [tmp_path / "many-1.bin", tmp_path / "many-2.bin"]
    many = str(tmp_path / "many.bin")
    assert commands.generate_command(str(weights), **args, **settings, output=many, num_samples=2) == 0
    err = capsys.readouterr().err
    assert err.startswith("[12 bytes in ") and err.endswith(f", written to {outputs[0]}, {outputs[1]}]\n")
    assert [p.stat().st_size for p in outputs] == [8, 8]
    with pytest.raises(UsageError, match="exists; give --overwrite true"):
        commands.generate_command(str(weights), n_layer=2, output=str(output))


def test_generate_command_defaults(small_model, tmp_path, capsys, monkeypatch):
    """Catches: another default length, sample count, temperature, top_p, device, precision or output mode."""
    weights = tmp_path / "weights.pt"
    torch.save(small_model.state_dict(), weights)
    output = tmp_path / "out.bin"
    asked, sampling_dtype = [], commands.sampling_dtype
    monkeypatch.setattr(commands, "sampling_dtype", lambda *args: asked.append(args) or sampling_dtype(*args))
    assert commands.generate_command(str(weights), n_layer=2, seed=4, output=str(output)) == 0
    assert asked == [(torch.device("cpu"), "auto", weights)]
    with pytest.raises(UsageError, match=r"^--n_layer must be a positive integer, got 0$"):
        commands.generate_command(str(weights), n_layer=0, output=str(tmp_path / "never.bin"))
    expected = [b.tolist() for b in generate.sample_bytes(small_model, b"\n", 500, 1, 4)]
    assert output.read_bytes() == b"\n" + bytes(v for values in expected for v in values)
    assert capsys.readouterr().err.startswith("[500 bytes in ")


@pytest.mark.parametrize(
    "position, value, message",
    [
        (0, 0, "--max_new_tokens must be a positive integer, got 0"),
        (3, -1.0, "--temperature must be"),
        (6, -1, "--seed must be"),
        (7, 0, "--n_layer must be a positive integer, got 0"),
    ],
)
def test_generate_settings_are_usage_errors(position, value, message):
    """Catches: a bad setting refused as another error class (another exit code) or named otherwise."""
    settings = [5, 1, 4, 1.0, None, 1.0, None, None]
    settings[position] = value
    with pytest.raises(BDHError) as refused:
        commands.check_generate_settings(*settings)
    assert type(refused.value) is UsageError and str(refused.value).startswith(message)


def test_prompt_bytes(tmp_path):
    """Catches: a prompt that is not UTF-8 text refused as another error class or named otherwise, or an
    unreadable --prompt_file's reason lost."""
    assert commands.prompt_bytes("h\udcffi", None) == b"h\xffi" and commands.prompt_bytes(None, None) == b"\n"
    with pytest.raises(BDHError) as refused:
        commands.prompt_bytes("\ud800", None)
    assert type(refused.value) is UsageError and str(refused.value).startswith("--prompt must be UTF-8 text")
    with pytest.raises(UsageError) as refused:
        commands.prompt_bytes(None, str(tmp_path))
    assert str(refused.value) == f"--prompt_file {tmp_path}: cannot read it (Is a directory)"
    for args, message in (
        (("", None), "the prompt is empty; give at least one byte with --prompt or --prompt_file"),
        (("a", "b"), "give --prompt or --prompt_file, not both"),
    ):
        with pytest.raises(UsageError) as refused:
            commands.prompt_bytes(*args)
        assert str(refused.value) == message
