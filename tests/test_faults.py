"""Crashes and bad input: kill and resume, SIGTERM and Ctrl-C, atomic checkpoint writes, NaN guard, float16
attention, untrusted or wrong checkpoints and user mistakes, each one clear line and nothing overwritten.

The runs are real `python -m bdh_lightning` processes (or `main()` in-process where no signal is involved) on a
tiny model and a generated corpus.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, SUBPROCESS_ENV, finish, scalars, stderr_of, wait_for_line, write_letters
from conftest import TINY_ARGS as TINY
from conftest import run_cli as run
from conftest import start_cli as start
from lightning.pytorch.plugins import MixedPrecision

from bdh_lightning.checkpoints import AtomicCheckpointIO, read_checkpoint
from bdh_lightning.cli import BDHCLI
from bdh_lightning.data import ByteDataModule
from bdh_lightning.data import corpus as data_module
from bdh_lightning.layer import reference_layer, rope, rope_cos_sin
from bdh_lightning.main import main
from bdh_lightning.module import BDHLitModule

ENV = SUBPROCESS_ENV
# A schedule that changes the learning rate every step, dropout on, a checkpoint every 3 steps.
RESUMABLE = [*TINY, "--model.warmup_steps", "4", "--model.decay_steps", "40", "--model.dropout", "0.2",
             "--checkpoint.every_n_train_steps", "3"]  # fmt: skip


def saved_step(path: Path) -> int | None:
    """global_step of the checkpoint at path, or None if there is none yet."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")["global_step"]
    except FileNotFoundError:
        return None


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, min_step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {stderr_of(proc)[-2000:]}"
        step = saved_step(path)
        if step is not None and step >= min_step:
            return step
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s")


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- kill, resume, signals


def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    """Run, SIGKILL mid-run, `--ckpt_path last`: the resumed losses and learning rates equal an uninterrupted run's.

    The killed run stalls (recorders.StallAt) once step 9 and its checkpoint are done and says so: the kill lands
    at that step on any machine, however fast or busy."""
    steps = 24
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, killed):
        folder.mkdir()
        write_letters(folder / "corpus.txt")
    (killed / "stall.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: recorders.StallAt\n      init_args: {step: 9}\n"
    )
    uninterrupted = start(reference, "fit", "--data.path", "corpus.txt", *RESUMABLE, "--trainer.max_steps", str(steps))
    proc = start(
        killed,
        "fit",
        "--config",
        "stall.yaml",
        "--data.path",
        "corpus.txt",
        *RESUMABLE,
        "--trainer.max_steps",
        "100000",
    )
    wait_for_line(proc, "stalled at step 9", timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved_step(killed / "lightning_logs/version_0/checkpoints/last.ckpt") == 9
    assert uninterrupted.wait(timeout=300) == 0, stderr_of(uninterrupted)[-2000:]

    resumed = run(
        killed, "fit", "--data.path", "corpus.txt", *RESUMABLE, "--trainer.max_steps", str(steps), "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_at = 9

    for tag in ("train/loss", "train/lr"):
        expected = scalars(reference / "lightning_logs/version_0", tag)
        got = scalars(killed / "lightning_logs/version_1", tag)
        assert sorted(got) == list(range(resumed_at, steps)), tag  # continued at the saved step, only the missing steps
        assert [got[s] for s in got] == [expected[s] for s in got], tag  # bit for bit on CPU
    assert saved_step(killed / "lightning_logs/version_1/checkpoints/last.ckpt") == steps


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "ctrl-c"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(corpus, signum, code):
    last = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    proc = start(Path.cwd(), "fit", "--data.path", str(corpus), *RESUMABLE, "--trainer.max_steps", "100000")
    wait_for_checkpoint(proc, last, min_step=3)
    proc.send_signal(signum)
    stderr = finish(proc, timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    stop = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(stop) == 1, stderr[-2000:]
    step = int(stop[0].split("after step ")[1].split(";")[0])
    assert f"saved {last.resolve()}" in stop[0]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == step
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]  # a full, resumable checkpoint
    assert not list(Path("lightning_logs").rglob("*.part"))


def test_training_ends_with_a_checkpoint_of_its_last_step(corpus):
    """max_steps between two saves (every 3 steps, validation every 5): last.ckpt still holds the final step."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["fit", "--data.path", str(corpus), *RESUMABLE, "--trainer.max_steps", "7"]) == 0
    assert saved_step(Path("lightning_logs/version_0/checkpoints/last.ckpt")) == 7
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back after fit


WRITER = """
import io, sys, time, torch
from bdh_lightning import checkpoints
from bdh_lightning.checkpoints import AtomicCheckpointIO

class Stalling(io.FileIO):
    # A disk that stops after the first megabyte of the second write: the kill lands mid-write, on any machine.
    def write(self, data):
        if self.tell() > 1_000_000:
            print("mid-write", flush=True)
            time.sleep(3600)
        return super().write(data)

io_ = AtomicCheckpointIO()
io_.save_checkpoint({"global_step": 1, "w": torch.arange(10.0)}, sys.argv[1])
print("first saved", flush=True)
checkpoints.open = lambda path, mode: Stalling(path, mode)
io_.save_checkpoint({"global_step": 2, "w": torch.ones(10_000_000)}, sys.argv[1])
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first saved"
    assert proc.stdout.readline().strip() == "mid-write"  # the child stops writing here and waits to be killed
    partial = path.with_name("last.ckpt.part")
    assert partial.stat().st_size > 1_000_000
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["w"], torch.arange(10.0))

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)  # the next save replaces the leftover part
    assert torch.load(path, weights_only=True)["global_step"] == 3 and not partial.exists()


# ---------------------------------------------------------------- NaN and float16


@pytest.mark.parametrize("where", ["loss", "update"])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(corpus, capsys, where):
    """A NaN loss at step 8 (or an infinite gradient that poisons only the update): one line, exit 1, last.ckpt
    stays the step-6 one."""
    config = Path("poison.yaml")
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: recorders.PoisonWeights\n"
                      f"      init_args: {{step: 8, where: {where}}}\n")  # fmt: skip
    sys.path.insert(0, str(REPO / "tests"))
    try:
        code = main(
            ["fit", "--config", str(config), "--data.path", str(corpus), *RESUMABLE, "--trainer.max_steps", "20"]
        )
    finally:
        sys.path.remove(str(REPO / "tests"))
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1, err
    last = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    if where == "loss":
        assert err[0].startswith("error: training loss is nan at step 8; stopped without saving;")
    else:  # the update of step 8 is the bad one; the checkpoint due after it (step 9) would hold it
        assert err[0].startswith("error: the weights became NaN or infinite at step 9; not saving them;")
    assert f"the last good checkpoint is {last.resolve()}" in err[0]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def overflowing_inputs(T=64, D=32, H=2, N=128):
    """Layer inputs whose attention scores and S @ x exceed float16's range (encoder weights 3.0, not 0.02)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(1, 1, T, D, generator=gen), (D,))
    encoder = torch.randn(H, D, N, generator=gen) * 3.0
    encoder_v = torch.randn(H, D, N, generator=gen) * 0.02
    decoder = torch.randn(H * N, D, generator=gen) * 0.02
    cos, sin = rope_cos_sin(torch.arange(T), N)
    return x, encoder, encoder_v, decoder, cos, sin


def test_attention_does_not_overflow_under_float16_autocast():
    x, encoder, encoder_v, decoder, cos, sin = overflowing_inputs()
    # These inputs do overflow float16 when attention is computed in it:
    q = rope(torch.relu(x @ encoder), cos, sin).half()
    assert not torch.isfinite((q @ q.transpose(-1, -2)).tril(-1) @ x.half()).all()

    expected = reference_layer(x, encoder, encoder_v, decoder, cos, sin, 0.0, False)
    with torch.autocast("cpu", dtype=torch.float16):
        got = reference_layer(x, encoder, encoder_v, decoder, cos, sin, 0.0, False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)


def test_a_few_16_mixed_steps_with_loss_scaling_on_cpu(tmp_path):
    """Lightning's float16 mixed precision (GradScaler loss scaling) against 32-true: same losses to ~1e-2."""
    corpus = write_letters(tmp_path / "corpus.txt")

    def losses(precision_plugin):
        L.seed_everything(0)
        module = BDHLitModule(
            n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0, learning_rate=3e-3
        )
        seen = []
        module.on_train_batch_end = lambda outputs, batch, batch_idx: seen.append(outputs["loss"].item())
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, plugins=precision_plugin, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(module, ByteDataModule(str(corpus), block_size=32, batch_size=8, val_windows=8))
        return seen, trainer

    full, _ = losses(None)
    half, trainer = losses([MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    assert trainer.precision == "16-mixed" and trainer.precision_plugin.scaler.get_scale() > 1
    assert all(math.isfinite(v) for v in half)
    assert half[-1] < half[0] - 0.3
    torch.testing.assert_close(torch.tensor(half), torch.tensor(full), atol=2e-2, rtol=0)


# ---------------------------------------------------------------- untrusted and wrong checkpoints, bad input


class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny finished run, and checkpoints derived from its last.ckpt: with a payload, truncated, not a
    checkpoint at all, and without its model settings (so the model shape must come from the command line)."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = write_letters(folder / "corpus.txt")
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: no function-scoped monkeypatch
        patch.chdir(folder)
        BDHCLI(args=["fit", "--data.path", str(corpus), *TINY, "--trainer.max_steps", "3"])
    last = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    torch.save({**checkpoint, "note": Payload(folder / "payload_ran")}, folder / "payload.ckpt")
    (folder / "truncated.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({k: v for k, v in checkpoint.items() if k != "hyper_parameters"}, folder / "bare.ckpt")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["fit", "validate", "generate"])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused(trained, capsys, monkeypatch, command):
    monkeypatch.chdir(trained)
    before = snapshot(trained)
    args = ["--ckpt_path", "payload.ckpt"]
    if command == "generate":
        args += ["--prompt", "hi"]
    else:
        args += ["--data.path", "corpus.txt", *TINY]
    code = main([command, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "payload.ckpt" in err and "pickled" in err, err
    assert not (trained / "payload_ran").exists()  # the payload never ran
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ckpt_path", "truncated.ckpt"], "checkpoint truncated.ckpt is truncated, corrupt or not a PyTorch checkpoint"),
        (["--ckpt_path", "notes.ckpt"], "checkpoint notes.ckpt is corrupt or not a PyTorch checkpoint; use another one"),
        (["--ckpt_path", "bare.ckpt", "--model.n_embd", "64"], "checkpoint bare.ckpt holds a model of another shape: model.encoder is (2, 32, 128) there but (2, 64, 256)"),
        (["--model.n_layr", "2"], "unrecognized arguments: --model.n_layr"),
        (["--model.n_layer", "two"], 'Parser key "model.n_layer": Expected a <class \'int\'>. Got value: two'),
        (["--config", "typo.yaml"], "does not accept option 'model.n_layr'"),
        (["--data.path", "missing.txt"], "data.path 'missing.txt' does not exist"),
        (["--data.path", "corpus.txt", "--data.block_size", "8000"], "but each split needs at least block_size + 1 = 8001"),
        (["--trainer.accelerator", "cpu", "--trainer.devices", str(len(os.sched_getaffinity(0)) + 1)], "CPU processes but this machine has"),
        # Lightning's word, one line: no CUDA here at all, or fewer than 1000 GPUs.
        (["--trainer.accelerator", "cuda", "--trainer.devices", "1000"],
         "only has" if torch.cuda.is_available() else "`CUDAAccelerator` can not run on your system since the accelerator is not available"),
    ],
    ids=["truncated", "not-a-checkpoint", "other-shape", "unknown-key", "wrong-type", "unknown-key-in-yaml",
         "missing-data", "block-size-over-val-split", "more-cpu-devices-than-cores", "more-gpus-than-exist"],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(trained, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(trained)
    (trained / "typo.yaml").write_text("model:\n  n_layr: 3\n")
    before = snapshot(trained)
    code = main(["fit", "--data.path", "corpus.txt", *TINY, "--trainer.max_steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
    assert snapshot(trained) == before  # no new run folder, nothing overwritten


def test_unreadable_data_file_is_one_line(trained, capsys, monkeypatch):
    """The OS refusing to open the corpus (EACCES; simulated, since the tests may run as root, who may read anything)."""
    monkeypatch.chdir(trained)
    real_open = open

    def refuse(file, *args, **kwargs):
        if str(file).endswith("corpus.txt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(data_module, "open", refuse, raising=False)
    code = main(["fit", "--data.path", "corpus.txt", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "cannot read data file corpus.txt: Permission denied" in err, err


def without_file_permission_override() -> list[str]:
    """A command prefix under which the OS enforces file modes: none for a normal user; for root, setpriv dropping
    the capabilities that let root read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH). Skips where neither works."""
    if os.geteuid() != 0:
        return []
    import shutil

    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without a working setpriv: the OS would let this process read any file")
    return prefix


def test_unreadable_data_file_is_one_line_for_real(tmp_path):
    """The same, with the OS refusing for real: a mode-000 corpus read by a process without root's override."""
    prefix = without_file_permission_override()
    corpus = write_letters(tmp_path / "corpus.txt")
    corpus.chmod(0)
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "bdh_lightning", "fit", "--data.path", "corpus.txt", *TINY],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        corpus.chmod(0o644)
    err = error_lines(result.stderr)
    assert result.returncode == 2 and len(err) == 1, result.stderr[-2000:]
    assert err[0].startswith("error: cannot read data file corpus.txt: Permission denied"), err
    assert not (tmp_path / "lightning_logs").exists()  # nothing written


def test_read_checkpoint_accepts_what_fit_writes(trained):
    checkpoint = read_checkpoint(trained / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == 3 and "model.encoder" in checkpoint["state_dict"]
