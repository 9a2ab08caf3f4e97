"""What the machine has: CUDA GPUs, their memory and compute capability, read without creating a CUDA context.

The launching process must not initialise CUDA (fork-based launchers such as `ddp_fork` cannot fork after it), so
GPU facts come from NVML, the driver's management library, or a short-lived child process.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import torch


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


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes this device can give a run, what they are: "the GPU has" or "available RAM is"), or (None, "") when
    unknown: a GPU's total memory (cuda_total_memory: no CUDA context), the CPU's available RAM."""
    if device.type == "cuda":
        total = cuda_total_memory(device.index or 0)
        return (total, "the GPU has") if total else (None, "")
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM is"
    except OSError:
        pass
    return None, ""
