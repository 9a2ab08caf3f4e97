"""Helpers shared by the tests: tiny settings, generated corpora, running the real CLI, reading TensorBoard.

Tests import them by name (`from conftest import TINY_ARGS`); tests/ is on sys.path under pytest, and on
PYTHONPATH for the subprocesses (`SUBPROCESS_ENV`), which load tests/recorders.py callbacks from configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Inductor's C++ for the CPU without SIMD: the compile tests check that our code compiles and computes what eager
# does, not inductor's vectorisation; scalar kernels take half the compile time (a chunked layer, cold: 66 s of CPU
# to 33 s). Set before torch reads its inductor config, here and in every child (SUBPROCESS_ENV copies os.environ).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# Compile in the process itself: a pool of compile workers costs each compiling process about 20 s of start-up
# (a cold compile test, 58 s to 39 s) and gains nothing on two cores that pytest-xdist already keeps busy.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

# Under pytest-xdist (`-n 2`, what CI runs) each worker gets one thread: two 2-thread workers on 2 cores run slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# One OpenMP thread per child: two 2-thread torch processes on 2 cores run about 3x slower.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}

# The smallest BDH worth training, as model settings and as CLI arguments for a whole tiny run.
TINY_MODEL = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)
TINY_ARGS = (
    "--model.n_layer 2 --model.n_embd 32 --model.n_head 2 --model.mlp_internal_dim_multiplier 8 "
    "--model.learning_rate 3e-3 --data.block_size 32 --data.batch_size 8 --data.val_windows 8 "
    "--trainer.val_check_interval 5 --trainer.log_every_n_steps 1 "
    "--trainer.enable_progress_bar false --trainer.enable_model_summary false"
).split()


def write_letters(path: Path, size: int = 60000, seed: int = 0) -> Path:
    """Random lowercase letters: learnable (26 of 256 values) and no two windows alike."""
    gen = torch.Generator().manual_seed(seed)
    path.write_bytes(bytes(torch.randint(97, 123, (size,), generator=gen).tolist()))
    return path


def write_phrases(path: Path, size: int = 60000, seed: int = 0) -> Path:
    """A repeated random phrase book: structure a tiny model learns within a few dozen steps."""
    gen = torch.Generator().manual_seed(seed)
    words = [
        bytes(torch.randint(97, 123, (int(n),), generator=gen).tolist())
        for n in torch.randint(2, 8, (40,), generator=gen)
    ]
    order = torch.randint(0, len(words), (size // 4,), generator=gen).tolist()
    path.write_bytes(b" ".join(words[i] for i in order)[:size])
    return path


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A 60 kB letters corpus in tmp_path, which becomes the working directory."""
    monkeypatch.chdir(tmp_path)
    return write_letters(tmp_path / "corpus.txt")


def skip_under_mutmut() -> None:
    """A child process of a mutation run imports mutmut's trampolined package outside its folder and fails there
    (benchmarks/mutation.py): tests that need one are skipped in those runs only, never in the suite."""
    if "MUTANT_UNDER_TEST" in os.environ:
        pytest.skip("child processes do not run under mutmut")


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m bdh_lightning ARGS` in a fresh process; output captured (pipes drained by communicate)."""
    skip_under_mutmut()
    return subprocess.run(
        [sys.executable, "-m", "bdh_lightning", *args],
        cwd=cwd,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_process(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`argv` started in the background, its stderr appended to an unnamed file: a pipe that nobody reads while
    the test waits fills up (64 kB) and blocks the child. `stderr_of(proc)` reads what it wrote so far."""
    skip_under_mutmut()
    log = tempfile.TemporaryFile("a+b")  # O_APPEND: reading it back never moves where the child writes
    proc = subprocess.Popen(argv, cwd=cwd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=log)
    proc.stderr_log = log
    return proc


def start_cli(cwd: Path, *args: str) -> subprocess.Popen:
    """`python -m bdh_lightning ARGS` started in the background (start_process)."""
    return start_process([sys.executable, "-m", "bdh_lightning", *args], cwd)


def stderr_of(proc: subprocess.Popen) -> str:
    """Everything a start_process child has written to stderr so far."""
    fd = proc.stderr_log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a start_process child (killed after `timeout` seconds) and return its stderr."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running after {timeout}s: {stderr_of(proc)[-2000:]}") from None
    return stderr_of(proc)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Wait until the child's stderr holds a line starting with `marker` (one the code writes), and return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stderr_of(proc).splitlines():
            if line.startswith(marker):
                return line
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before writing {marker!r}: {stderr_of(proc)[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {marker!r} line within {timeout}s: {stderr_of(proc)[-2000:]}")


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """One TensorBoard scalar of a run folder: {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return {e.step: e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)}


def scalar_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]


def record_carried_losses(monkeypatch) -> list[float]:
    """The loss of every carried-state training window, as the module computes it (rounded to 6 places), in order."""
    from bdh_lightning.module import BDHLitModule

    seen: list[float] = []
    original = BDHLitModule.carried_loss

    def recording(self, batch):
        loss = original(self, batch)
        seen.append(round(float(loss), 6))
        return loss

    monkeypatch.setattr(BDHLitModule, "carried_loss", recording)
    return seen


# The files whose tests take longest (child processes, compiles), run first: pytest-xdist hands each worker a
# contiguous share and the idle one steals from the other's tail, so a long test left for the end would keep one
# core busy alone. Most expensive first, as measured under `-n 2`; every file stays contiguous (its fixtures are
# set up once), the rest keep their order.
EXPENSIVE_FIRST = (
    "test_kernels.py",
    "test_streams.py",
    "test_distributed.py",
    "test_fused.py",
    "test_gpu_suite.py",
    "test_prepare.py",
    "test_faults.py",
    "test_trust.py",
    "test_insight.py",
    "test_console.py",
    "test_fault_sync.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(EXPENSIVE_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
