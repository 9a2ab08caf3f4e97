"""Fault handling that never empties the GPU's queue each step, and an error on one rank that stops them all.

The non-finite check reads the device every `trainer.log_every_n_steps` steps and still names the step where
the loss went bad; an out-of-memory error (torch's, or cuBLAS's CUBLAS_STATUS_ALLOC_FAILED) is one line; a
rank that fails ends the others within seconds instead of NCCL's 30-minute timeout.
"""

import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, SUBPROCESS_ENV, TINY_ARGS, TINY_MODEL, write_letters

from bdh_lightning.data import ByteDataModule
from bdh_lightning.faults import StopOnNonFinite, is_out_of_memory
from bdh_lightning.main import main
from bdh_lightning.module import BDHLitModule

CUBLAS_ALLOC_FAILED = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


def test_out_of_memory_is_recognised_whoever_ran_out():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError(CUBLAS_ALLOC_FAILED))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a runtime failure


def poison_config(step: int, where: str = "loss") -> Path:
    config = Path("poison.yaml")
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: recorders.PoisonWeights\n"
                      f"      init_args: {{step: {step}, where: {where}}}\n")  # fmt: skip
    return config


def test_nan_checked_every_log_interval_names_its_step_and_saves_nothing(corpus, capsys):
    """Checked every 5 steps: the NaN of step 8 stops the run at the save due after step 9 (checkpoints every
    3 steps) with the step it went bad; last.ckpt stays step 6's."""
    args = [
        *TINY_ARGS,
        "--trainer.log_every_n_steps",
        "5",
        "--checkpoint.every_n_train_steps",
        "3",
        "--trainer.max_steps",
        "20",
    ]
    sys.path.insert(0, str(REPO / "tests"))
    try:
        code = main(["fit", "--config", str(poison_config(8)), "--data.path", str(corpus), *args])
    finally:
        sys.path.remove(str(REPO / "tests"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: training loss is nan at step 8; stopped without saving;"), err[0]
    last = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_nan_between_checks_and_no_save_is_caught_at_the_last_step(tmp_path):
    """No checkpoint between the bad step and the end of training: the last step's check still stops it."""
    checks = []

    class Counting(StopOnNonFinite):
        def stop_if_non_finite(self, trainer):
            checks.append(trainer.global_step)
            super().stop_if_non_finite(trainer)

    class NanAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 13:
                with torch.no_grad():
                    pl_module.model.lm_head[0, 0] = float("nan")

    corpus = write_letters(tmp_path / "corpus.txt")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=14, log_every_n_steps=5, callbacks=[Counting(), NanAtStep()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(Exception, match="training loss is nan at step 13; stopped without saving"):
        trainer.fit(BDHLitModule(**TINY_MODEL), ByteDataModule(str(corpus), block_size=32, batch_size=4, val_windows=8))
    assert checks == [5, 10, 14]  # 3 reads of the device in 14 steps, not 14


def test_cublas_alloc_failure_is_the_one_line_out_of_memory_error(corpus, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError(CUBLAS_ALLOC_FAILED)

    monkeypatch.setattr(BDHLitModule, "training_step", fail)
    code = main(["fit", "--data.path", str(corpus), *TINY_ARGS, "--trainer.max_steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: out of memory; lower data.batch_size"), err[-3:]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_out_of_memory_on_one_rank_stops_every_rank_within_seconds(tmp_path, failing_rank):
    """Two CPU ranks (DDP): one runs out of memory, the other hangs as in a dead peer's NCCL collective. Both
    processes are gone within seconds (the watcher polls once a second), with one line each, no traceback."""
    write_letters(tmp_path / "corpus.txt")
    config = tmp_path / "run.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 50
  log_every_n_steps: 1
  enable_progress_bar: false
  callbacks:
    - class_path: fault_injectors.OutOfMemoryOnRank
      init_args: {{rank: {failing_rank}, step: 3}}
data: {{path: corpus.txt, block_size: 32, batch_size: 4, val_windows: 8}}
model: {{n_layer: 2, n_embd: 32, n_head: 2, mlp_internal_dim_multiplier: 8}}
""")
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "bdh_lightning", "fit", "--config", str(config)], cwd=tmp_path, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    started = time.monotonic()
    lines, failed_at = [], None
    for line in proc.stderr:  # every rank writes to this pipe: it closes when the last one has ended
        lines.append(line.rstrip("\n"))
        if failed_at is None and line.startswith("error: out of memory"):
            failed_at = time.monotonic()
    proc.wait(timeout=60)
    stderr = "\n".join(lines)
    assert failed_at is not None, stderr[-3000:]
    assert time.monotonic() - failed_at < 15, stderr[-3000:]  # not the 30-minute collective timeout
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors[0].startswith("error: out of memory; lower data.batch_size"), errors
    other = 1 - failing_rank
    assert any(line.startswith("error: rank") and line.endswith(f"stopping rank {other} too") for line in errors), (
        errors
    )
    assert time.monotonic() - started < 280
