"""The fused Triton layer (`model.kernel: fused`) against `layer.reference_layer`: the forward and every
gradient, dropout masks bit for bit with masks.py, T and N not multiples of the tiles, several batch rows
and heads, and a whole model on weights from another kernel's checkpoint.

The kernels run through Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must be set before
triton is imported and would stick for the rest of the process, so every check runs in one child
process (tests/fused_checks.py) that reports its measurements as JSON; the tests here judge them. A
pytest started under the interpreter (fused.py's mutation runs) runs each check in process instead.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SUBPROCESS_ENV

from bdh_lightning.errors import ConfigError
from bdh_lightning.kernels import KERNELS, resolve_kernel

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
CHECKS = "fp32 fp32_dropout bf16 autocast_bf16 autocast_fp16 hash model float64_refused launches".split()
GRADIENTS = ("out", "d_x", "d_encoder", "d_encoder_v", "d_decoder")


@pytest.fixture(scope="module")
def measured():
    if os.environ.get("TRITON_INTERPRET") == "1":  # this process is under the interpreter already
        import fused_checks

        return fused_checks.Measured()
    env = {**SUBPROCESS_ENV, "TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fused_checks.py"), *CHECKS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check,dropped", [("fp32", 0.0), ("fp32_dropout", 0.3)])
def test_float32_forward_and_every_gradient_equal_the_reference(measured, check, dropped):
    errors = measured[check]
    assert errors["dropped"] == pytest.approx(dropped, abs=0.03)  # the mask did drop what p says
    assert errors["dtypes"] == ["float32", "float32"]
    for name in GRADIENTS:
        assert errors[name] <= 1e-4, (name, errors[name])


@pytest.mark.parametrize("check", ["bf16", "autocast_bf16", "autocast_fp16"])
def test_low_precision_forward_and_every_gradient_equal_the_reference(measured, check):
    errors = measured[check]
    assert errors["dropped"] == pytest.approx(0.2, abs=0.03)
    fused_dtype, reference_dtype = errors["dtypes"]  # bf16-true's layer gives bfloat16, autocast's float32
    assert fused_dtype == reference_dtype == ("bfloat16" if check == "bf16" else "float32")
    for name in GRADIENTS:
        assert errors[name] <= 2e-2, (name, errors[name])


def test_the_kernels_dropout_hash_is_masks_py_bit_for_bit(measured):
    hashes = measured["hash"]
    assert hashes["entries"] > 30000
    assert hashes["hash_mismatches"] == 0 and hashes["keep_mismatches"] == 0


def test_a_model_on_fused_equals_the_other_kernels_on_the_same_weights(measured):
    model = measured["model"]
    assert model["eval_logits"] <= 1e-4 and model["eval_grads"] <= 1e-4  # against reference, no dropout
    assert model["train_logits"] <= 1e-4 and model["train_grads"] <= 1e-4  # against chunked, same masks
    assert model["train_vs_eval"] > 0.01  # training did drop out


def test_float64_is_refused_in_one_line(measured):
    assert measured["float64_refused"] == {
        "refused": 1.0,
        "message": "model.kernel=fused computes in float32, bfloat16 or float16, not torch.float64; "
        "use model.kernel=chunked for other precisions",
    }


def test_every_launch_gets_its_dtypes_contiguous_and_only_its_own_parameters(measured):
    """bf16-mixed: each kernel gets x, the weights, dL/du, the scores and their gradient in bfloat16; the layer
    norm's output, cos/sin and every accumulator in float32; all contiguous (the kernels index raw pointers); and
    no keyword that is not one of its parameters (the interpreter drops one silently, compiled Triton refuses it)."""
    b, f = "bfloat16", "float32"
    expected = {
        "_scores_kernel": [b, b, f, f, b],  # x, E, cos, sin -> scores
        "_decode_kernel": [b, f, b, b, b, f],  # x, y, E, Ev, Dec -> u
        "_rows_z_kernel": [b, f, b, b, b, b, f, f],  # x, y, du, E, Ev, Dec -> dy, dx per head
        "_rows_q_kernel": [b, b, f, f, b, f],  # x, E, cos, sin, dS -> dx per head
        "_cols_kernel": [b, f, b, b, b, b, f, f, b, f, f, f],  # x, y, du, E, Ev, Dec, cos, sin, dS -> dE, dEv, dDec
    }
    launches = measured["launches"]
    assert {name: launch["dtypes"] for name, launch in launches.items()} == expected
    assert all(launch["contiguous"] and launch["unknown"] == [] for launch in launches.values())


@pytest.mark.parametrize("name", ["rows", "pairs", "depth", "wide_rows"])
def test_tiles_are_powers_of_two_of_at_least_16(name):
    from bdh_lightning.kernels.fused import Tiles

    for size in (16, 32, 128):
        assert getattr(Tiles(**{name: size}), name) == size
    for size in (8, 1, 0, 48, 17):
        with pytest.raises(ValueError) as error:
            Tiles(**{name: size})
        assert str(error.value) == f"Tiles.{name} must be a power of two of at least 16, got {size}"


def test_the_compiled_kernels_build_for_an_h100_without_one(tmp_path):
    # The GPU code path (tensor-core bf16 dots) is never compiled by the interpreter: build it for sm_90
    # through PTX to a cubin with triton's bundled ptxas, in a child without TRITON_INTERPRET.
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    tool = str(REPO / "benchmarks" / "fused_tools.py")
    done = subprocess.run([sys.executable, tool, "compile"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(usage) == ["cols", "decode", "rows_q", "rows_z", "scores"]
    assert all(u["registers"] is None or 0 < u["registers"] <= 255 for u in usage.values())


def test_fused_resolves_on_cuda_and_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernel("fused", torch.device("cuda")) == "fused"
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1") as error:
        resolve_kernel("fused", torch.device("cpu"))
    assert "\n" not in str(error.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("fused", torch.device("cpu")) == "fused"


def test_auto_never_picks_fused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "fused" in KERNELS
    for device in ("cpu", "cuda"):
        for n_wide in (0, 2**20, 2**23, 2**30):
            assert resolve_kernel("auto", torch.device(device), n_wide=n_wide) != "fused"


@CUDA
@pytest.mark.parametrize("autocast,tol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_cuda_compiled_fused_equals_the_cpu_reference(autocast, tol, small_tiles):
    # The compiled kernels (tensor-core dots), which the interpreter never runs. The reference runs on the
    # CPU: benchmarks/gpu_suite.py turns TF32 on for CUDA float32 matmuls, which would blur a 1e-4 check.
    from bdh_lightning.kernels import fused, masks
    from bdh_lightning.layer import layer_norm, reference_layer, rope_cos_sin

    B, T, D, H, N, p, seed = 3, 200, 96, 2, 1000, 0.2, 1234  # ragged ends on every tile size
    gen = torch.Generator().manual_seed(0)
    x = layer_norm(torch.randn(B, 1, T, D, generator=gen)).requires_grad_()
    weights = [(torch.randn(H, D, N, generator=gen) * 0.1).requires_grad_() for _ in range(2)]
    weights.append((torch.randn(H * N, D, generator=gen) * 0.05).requires_grad_())
    cos, sin = rope_cos_sin(torch.arange(T), N)
    grad_out = torch.randn(B, 1, T, D, generator=gen)
    tiles = fused.Tiles(rows=32, pairs=16, depth=32, wide_rows=16) if small_tiles else fused.Tiles()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        expected = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=masks.dropout_mask(seed, B, H, T, N, p))
    inputs = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast is not None):
        got = fused.fused_layer(*inputs, cos.cuda(), sin.cuda(), p, seed=seed, tiles=tiles)
    assert ((got.float().cpu() - expected.float()).norm() / expected.float().norm()).item() <= tol
    want = torch.autograd.grad(expected, [x, *weights], grad_out.to(expected.dtype))
    have = torch.autograd.grad(got, inputs, grad_out.cuda().to(got.dtype))
    for g, e in zip(have, want):
        assert ((g.float().cpu() - e.float()).norm() / e.float().norm()).item() <= tol
