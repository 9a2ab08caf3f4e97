"""The default precision is decided without creating a CUDA context (fork-based launchers need that), and TF32
is set in every rank by a callback (ddp_spawn workers do not inherit the launcher's setting)."""

import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from conftest import SUBPROCESS_ENV

from bdh_lightning import devices, precision
from bdh_lightning.errors import ConfigError
from bdh_lightning.precision import TF32, default_precision


@pytest.fixture
def no_cuda_context(monkeypatch):
    """Anything that would create a CUDA context fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA context was asked for")

    for name in (
        "is_bf16_supported",
        "current_device",
        "get_device_properties",
        "get_device_capability",
        "_lazy_init",
        "init",
    ):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


@pytest.mark.parametrize(
    "capabilities, expected",
    [([(9, 0)], "bf16-mixed"), ([(8, 0), (8, 0)], "bf16-mixed"), ([(8, 6)], "bf16-mixed"), ([(7, 0)], "16-mixed"),
     ([(8, 0), (7, 5)], "16-mixed"), ([], "16-mixed")],
)  # fmt: skip
def test_gpus_pick_bf16_from_ampere_up_without_a_cuda_context(no_cuda_context, monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: max(1, len(capabilities)))
    monkeypatch.setattr(devices, "nvml_capabilities", lambda: capabilities)
    assert default_precision() == expected
    assert default_precision("cuda") == expected
    assert default_precision("gpu") == expected  # Lightning's other name for it
    assert default_precision("cpu") == "32-true"  # a CPU run on a GPU machine


def test_without_nvml_a_child_process_answers(no_cuda_context, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(devices, "nvml_capabilities", lambda: None)
    asked = []
    monkeypatch.setattr(devices, "child_process_capabilities", lambda: asked.append(1) or [(8, 9)])
    assert default_precision() == "bf16-mixed" and asked == [1]


def test_the_child_process_probe_runs():
    """The probe itself, for real (a child Python): on a CPU-only build it sees no GPU, an empty list."""
    expected = (
        []
        if torch.cuda.device_count() == 0
        else [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    )
    assert devices.child_process_capabilities() == expected


def test_no_gpu_is_32_true(no_cuda_context, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert default_precision() == "32-true"


def test_deciding_leaves_cuda_uninitialised_in_a_fresh_process():
    """What `fit` does before its ranks start; on a GPU machine this is the check that ddp_fork can still fork."""
    code = "import torch; from bdh_lightning.precision import default_precision; p = default_precision(); print(p, torch.cuda.is_initialized())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr
    chosen, initialised = done.stdout.split()
    assert initialised == "False" and chosen in ("32-true", "bf16-mixed", "16-mixed")


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_is_set_in_the_rank_on_cuda_only(allow):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not allow
        torch.backends.cudnn.allow_tf32 = not allow
        cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
        TF32(allow).setup(cpu, None, "fit")
        assert torch.backends.cuda.matmul.allow_tf32 is (not allow)  # the CPU: left alone
        cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
        TF32(allow).setup(cuda, None, "fit")
        assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_gpu_memory_is_read_without_a_cuda_context(no_cuda_context, monkeypatch):
    """What the launcher asks (the header's "the GPU has", auto's kernel choice) comes from NVML."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "nvml_total_memory", lambda: [80 * 2**30, 40 * 2**30])
    assert devices.cuda_present() and devices.cuda_total_memory(1) == 40 * 2**30
    assert devices.device_memory(torch.device("cuda", 0)) == (80 * 2**30, "the GPU has")
    assert devices.device_memory(torch.device("cuda", 1)) == (40 * 2**30, "the GPU has")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "nvml_total_memory", lambda: None)
    assert not devices.cuda_present() and devices.cuda_total_memory() is None
    assert devices.device_memory(torch.device("cuda")) == (None, "")


@pytest.mark.parametrize("short", ["16", 16, "bf16", "32", 32, "64", 64])
def test_short_names_mean_what_lightning_means(short):
    """`--trainer.precision 16` is Lightning's 16-mixed (float32 weights, float16 autocast), not 16-true: the
    table must read each short name as Lightning's connector does, or estimate and fit's pre-flight check count
    2-byte weights for a run that keeps 4-byte ones."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    with pytest.warns(match="historical reasons") if str(short)[:2] in ("16", "bf") else nullcontext():
        lightning_name = _convert_precision_to_unified_args(short)
    assert precision.precision(short).name == lightning_name


def test_the_16_alias_is_16_mixed_with_float32_weights_and_float16_products():
    row = precision.precision("16")
    assert (row.name, row.param_bytes, row.activation_bytes, row.compute_dtype, row.autocast) == (
        "16-mixed", 4, 2, torch.float16, True,
    )  # fmt: skip
    assert precision.compute_dtype("16") == torch.float16


@pytest.mark.parametrize("name", ["64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"])
def test_each_rows_compute_dtype_and_sizes_are_what_lightnings_plugin_uses(name):
    """The 16-mixed row computes in float16 (Lightning's autocast dtype), not bfloat16; the -true rows in the dtype
    Lightning converts the weights to; the mixed rows keep float32 weights."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision

    row = precision.PRECISIONS[name]
    if name.endswith("-mixed"):
        plugin_dtype, weight_dtype = MixedPrecision(name, "cpu").autocast_context_manager().fast_dtype, torch.float32
    else:
        plugin = {"64-true": DoublePrecision(), "32-true": None}.get(name) or HalfPrecision(name)
        weight_dtype = torch.float32 if name == "32-true" else plugin.convert_module(torch.nn.Linear(2, 2)).weight.dtype
        plugin_dtype = weight_dtype
    assert row.compute_dtype == plugin_dtype
    assert row.autocast is name.endswith("-mixed")
    assert row.param_bytes == weight_dtype.itemsize
    assert row.activation_bytes == plugin_dtype.itemsize
    assert precision.compute_dtype(name) == plugin_dtype


def test_an_unknown_precision_is_a_config_error_and_computes_in_float32():
    with pytest.raises(ConfigError, match=r"^unknown precision '8-true'; use one of 64-true, 32-true, bf16-mixed, "):
        precision.precision("8-true")
    assert precision.compute_dtype("8-true") == torch.float32
    assert precision.compute_dtype(None) == torch.float32


def test_tf32_is_on_by_default_on_cuda():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        TF32().setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0))), None, "fit")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
