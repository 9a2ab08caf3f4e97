"""One table of Lightning precisions: what each means for the weights, the activations and autocast.

Used by the CLI (the default), `generate` (its autocast), `estimate` (bytes) and the benchmarks.

The default is decided without creating a CUDA context in the launching process (`gpu_capabilities`
reads NVML, the driver's management library), so that fork-based launchers (`ddp_fork`, `ddp_notebook`)
can still start their ranks; TF32 is set by a callback in every rank (`TF32`), since `ddp_spawn`
workers start from a fresh interpreter.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str  # Lightning's string
    param_bytes: int  # bytes per weight (and per gradient, and per AdamW moment)
    activation_bytes: int  # bytes per activation element in the layers' products
    compute_dtype: torch.dtype  # the dtype the matmuls run in
    autocast: bool  # mixed: float32 weights, products in compute_dtype under torch.autocast


PRECISIONS = {
    p.name: p
    for p in (
        Precision("64-true", 8, 8, torch.float64, False),
        Precision("32-true", 4, 4, torch.float32, False),
        Precision("bf16-mixed", 4, 2, torch.bfloat16, True),
        Precision("16-mixed", 4, 2, torch.float16, True),
        Precision("bf16-true", 2, 2, torch.bfloat16, False),
        Precision("16-true", 2, 2, torch.float16, False),
    )
}
# Lightning's short names.
ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "transformer-engine": "bf16-mixed"}


def precision(name) -> Precision:
    """The table's row for a Lightning precision string (or its short form); ConfigError if unknown."""
    key = ALIASES.get(str(name), str(name))
    if key not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def compute_dtype(name: str | None) -> torch.dtype:
    """The dtype a precision computes in (float32 when unknown or not given)."""
    try:
        return precision(name or "32").compute_dtype
    except ConfigError:
        return torch.float32


def default_precision(accelerator=None) -> str:
    """The BDH guide's choice: bf16-mixed where every GPU supports bfloat16 (compute capability 8.0 up,
    Ampere and later), else 16-mixed on CUDA, else 32-true (the CPU, MPS, or `accelerator` cpu).

    Creates no CUDA context: `torch.cuda.device_count` and `gpu_capabilities` read NVML."""
    name = accelerator if isinstance(accelerator, str) else "auto"  # an Accelerator object: let the machine say
    if name not in ("auto", "cuda", "gpu") or torch.cuda.device_count() == 0:
        return "32-true"
    capabilities = gpu_capabilities()
    return "bf16-mixed" if capabilities and min(capabilities)[0] >= 8 else "16-mixed"


def cuda_present() -> bool:
    """Whether a CUDA GPU is visible, asked without initialising CUDA: `torch.cuda.device_count` reads NVML,
    where `torch.cuda.is_available` calls cuInit, after which a forked rank (ddp_fork) cannot use CUDA."""
    return torch.cuda.device_count() > 0


def cuda_total_memory(index: int = 0) -> int | None:
    """Total bytes of visible GPU `index`, without creating a CUDA context (NVML); from torch when this process
    has initialised CUDA already; None when neither can say."""
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_properties(index).total_memory
    totals = nvml_total_memory()
    return totals[index] if totals and index < len(totals) else None


def gpu_capabilities() -> list[tuple[int, int]]:
    """(major, minor) compute capability of each visible GPU, without creating a CUDA context here.

    Read from NVML; where NVML cannot be read, from a short-lived child process (which may create a context of
    its own); from torch directly when this process has initialised CUDA already. Empty if nothing answers."""
    if torch.cuda.is_initialized():
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    capabilities = nvml_capabilities()
    if capabilities is None:
        capabilities = child_process_capabilities()
    return capabilities


def nvml_each(query) -> list | None:
    """`query(nvml, handle)` for each GPU CUDA_VISIBLE_DEVICES lets this process see, through NVML (no CUDA
    context); None if NVML is missing or fails, or a query returns None (then the caller asks elsewhere)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            count = ctypes.c_uint()
            if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
                return None
            try:  # NVML numbers every GPU; CUDA_VISIBLE_DEVICES (indices or UUIDs) picks and orders them
                indices = [torch.cuda._get_nvml_device_index(i) for i in range(torch.cuda.device_count())]
            except (RuntimeError, AttributeError, IndexError, ValueError):
                indices = list(range(count.value))
            answers = []
            for index in indices:
                handle = ctypes.c_void_p()
                if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                    return None
                answer = query(nvml, handle)
                if answer is None:
                    return None
                answers.append(answer)
            return answers
        finally:
            nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return None


def nvml_capabilities() -> list[tuple[int, int]] | None:
    """(major, minor) compute capability of each visible GPU, from NVML."""

    def capability(nvml, handle):
        major, minor = ctypes.c_int(), ctypes.c_int()
        if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
            return None
        return major.value, minor.value

    return nvml_each(capability)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_total_memory() -> list[int] | None:
    """Total memory in bytes of each visible GPU, from NVML: what a launcher may read before its ranks start
    (torch.cuda.get_device_properties would create a CUDA context, which fork-based launchers cannot survive)."""

    def total(nvml, handle):
        memory = _NvmlMemory()
        return memory.total if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0 else None

    return nvml_each(total)


CAPABILITY_PROBE = "import json, torch; print(json.dumps([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]))"


def child_process_capabilities() -> list[tuple[int, int]]:
    """Ask a child Python (its CUDA context dies with it); empty if it fails."""
    try:
        command = [sys.executable, "-c", CAPABILITY_PROBE]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        return [tuple(pair) for pair in json.loads(done.stdout)] if done.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, TypeError, ValueError):
        return []


def set_tf32(allow: bool) -> None:
    """TF32 in float32 matmuls (cuBLAS) and convolutions (cuDNN): about 1e-3 relative error, several times faster."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


class TF32(Callback):
    """Sets TF32 on or off in each rank as it starts (`setup` runs in every rank: `ddp_spawn` workers are fresh
    interpreters that a setting made in the launching process never reaches). CUDA only."""

    def __init__(self, allow: bool = True):
        self.allow = allow

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.strategy.root_device.type == "cuda":
            set_tf32(self.allow)
