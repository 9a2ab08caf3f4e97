"""Issue 14's checks that need a GPU (skipped without one; benchmarks/gpu_suite.py runs them on one):
the dense-peak table against a large matmul, the memory estimate against torch.cuda.max_memory_allocated
and the device's own count, the default precision without a CUDA context (ddp_fork can still fork), TF32
in ddp_spawn workers, and MFU logged on this GPU.

`python tests/test_cuda_paths.py` runs them through pytest and prints the measured numbers (`-s`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_ENV, TINY_ARGS, scalars, write_letters
from measure import measure_step

from bdh_lightning import estimate
from bdh_lightning.estimate import estimate_memory
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.throughput import dense_peak_flops, find_peak, tf32_enabled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_suite.py)")


def matmul_flops_per_second(dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_dense_peak_bounds_a_large_matmul(dtype):
    """A large matmul reaches 50-100% of the table's dense peak: a sparse (2x) figure would read under 50%."""
    name = torch.cuda.get_device_name()
    peak_row = find_peak(name)
    if peak_row is None:
        pytest.skip(f"{name!r} is not in the table (no MFU is logged there)")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as fit's default --tf32 true
    try:
        achieved = matmul_flops_per_second(dtype)
        peak = dense_peak_flops(
            peak_row, dtype, tf32_enabled(), torch.cuda.get_device_properties(0).multi_processor_count
        )
    finally:
        torch.set_float32_matmul_precision(before)
    print(f"{name} {dtype}: {achieved / 1e12:.1f} TFLOP/s measured, table {peak / 1e12:.1f} ({achieved / peak:.0%})")
    assert 0.5 < achieved / peak <= 1.02


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_the_estimate_against_the_gpu(kernel, precision):
    """`peak_bytes` within 15% of max_memory_allocated; `device_bytes` covers what the device gave this process
    (total - free: context, workspaces, reserved blocks) without more than 50% to spare; prints the overheads."""
    B, T = 8, 256
    kwargs = dict(n_layer=2, n_embd=256, n_head=4, mlp_internal_dim_multiplier=32, dropout=0.1, kernel=kernel)
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = BDH(BDHConfig(**kwargs)).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 256, (B, T + 1), device="cuda")
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    measure_step(model, optimizer, idx, autocast)
    saved, peak = measure_step(model, optimizer, idx, autocast)
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.max_memory_reserved()
    predicted = estimate_memory(kwargs, B, T, precision, "cuda").kernels[kernel]
    print(f"{kernel} {precision}: saved {saved} vs {predicted.saved_bytes}; peak {peak} vs {predicted.peak_bytes}; "
          f"reserved/allocated {reserved / peak:.3f}; process uses {total - free} (context and workspaces about "
          f"{total - free - reserved}), predicted device {predicted.device_bytes}")  # fmt: skip
    assert abs(predicted.saved_bytes / saved - 1) < 0.15
    assert abs(predicted.peak_bytes / peak - 1) < 0.15
    assert reserved / peak <= 1 + 2 * estimate.ALLOCATOR_SLACK
    assert total - free - reserved <= 1.5 * (estimate.CUDA_CONTEXT_BYTES + estimate.CUBLAS_WORKSPACE_BYTES)
    # On a GPU shared with other processes total - free counts theirs too: only the upper bound is checked then.
    assert predicted.device_bytes >= 0.85 * (total - free) or torch.cuda.device_count() > 1


def test_default_precision_creates_no_context_so_ddp_fork_forks(tmp_path):
    code = "import torch; from bdh_lightning.precision import default_precision; p = default_precision(); print(p, torch.cuda.is_initialized())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV, check=False)
    chosen, initialised = done.stdout.split()
    major = torch.cuda.get_device_capability(0)[0]
    assert initialised == "False" and chosen == ("bf16-mixed" if major >= 8 else "16-mixed")
    write_letters(tmp_path / "corpus.txt")
    fit = subprocess.run([sys.executable, "-m", "bdh_lightning", "fit", "--data.path", "corpus.txt", *TINY_ARGS,
                          "--trainer.max_steps", "3", "--trainer.strategy", "ddp_fork", "--trainer.devices", "1"],
                         cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]


@pytest.mark.parametrize("tf32", ["true", "false"])
def test_tf32_reaches_ddp_spawn_workers(tmp_path, tf32):
    write_letters(tmp_path / "corpus.txt")
    (tmp_path / "record.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: fault_injectors.RecordTF32\n"
        f"      init_args: {{path: {tmp_path / 'tf32.txt'}}}\n"
    )
    fit = subprocess.run([sys.executable, "-m", "bdh_lightning", "fit", "--config", "record.yaml", "--data.path", "corpus.txt",
                          *TINY_ARGS, "--trainer.max_steps", "2", "--trainer.strategy", "ddp_spawn", "--trainer.devices", "1",
                          "--tf32", tf32],
                         cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "tf32.txt").read_text().split() == ["cuda", "True" if tf32 == "true" else "False"]


def test_mfu_is_logged_on_this_gpu(tmp_path):
    if find_peak(torch.cuda.get_device_name()) is None:
        pytest.skip("not in the table: the run says so in one line instead")
    write_letters(tmp_path / "corpus.txt", size=400_000)
    fit = subprocess.run([sys.executable, "-m", "bdh_lightning", "fit", "--data.path", "corpus.txt", *TINY_ARGS,
                          "--model.n_embd", "256", "--model.mlp_internal_dim_multiplier", "32", "--data.block_size", "256",
                          "--data.batch_size", "16", "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "10",
                          "--trainer.val_check_interval", "15"],
                         cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = next(Path(tmp_path, "lightning_logs").iterdir())
    mfu = scalars(run, "train/device/mfu")
    val = scalars(run, "validate/device/mfu")
    print(f"MFU train {sorted(mfu.items())}, validate {sorted(val.items())}")
    assert mfu and all(0 < v < 1 for v in mfu.values())
    assert val and all(0 < v < 1 for v in val.values())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q", "-p", "no:cacheprovider", f"--rootdir={Path(__file__).parent}"]))
