"""devices.py: GPU facts read through NVML (a fake libnvidia-ml here, answering as the real one does), the child
process fallback, and what each reader returns when nothing can answer. The real NVML is read by the GPU suite."""

from __future__ import annotations

import ctypes
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bdh_lightning import devices

GiB = 2**30


class FakeNvml:
    """libnvidia-ml.so.1 as ctypes sees it: each call returns 0 on success and fills the objects passed byref.
    `fail` names a call that returns NVML's 'unknown error' (999) instead."""

    def __init__(self, capabilities, totals, fail=None):
        self.capabilities, self.totals, self.fail = capabilities, totals, fail
        self.calls = []

    def answer(self, name):
        self.calls.append(name)
        return 999 if name == self.fail else 0

    def nvmlInit_v2(self):
        return self.answer("init")

    def nvmlShutdown(self):
        return self.answer("shutdown")

    def nvmlDeviceGetCount_v2(self, count):
        count._obj.value = len(self.totals)
        return self.answer("count")

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = 100 + index  # NVML's handles are opaque pointers: never 0
        return self.answer(f"handle {index}")

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):
        major._obj.value, minor._obj.value = self.capabilities[handle.value - 100]
        return self.answer("capability")

    def nvmlDeviceGetMemoryInfo(self, handle, memory):
        memory._obj.total = self.totals[handle.value - 100]
        memory._obj.free = memory._obj.used = 1
        return self.answer("memory")


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake NVML of three GPUs, all visible, with no CUDA context in this process."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    fake = FakeNvml([(8, 0), (9, 0), (7, 5)], [80 * GiB, 40 * GiB, 16 * GiB])
    opened = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: opened.append(name) or fake)
    monkeypatch.setattr(
        devices, "child_process_capabilities", lambda: pytest.fail("a child process asked, NVML answered")
    )
    fake.opened = opened
    return fake


def test_nvml_reads_each_gpus_capability_and_memory_and_shuts_down(nvml):
    assert devices.nvml_capabilities() == [(8, 0), (9, 0), (7, 5)]
    assert nvml.opened == ["libnvidia-ml.so.1"] and nvml.calls[0] == "init" and nvml.calls[-1] == "shutdown"
    assert devices.nvml_total_memory() == [80 * GiB, 40 * GiB, 16 * GiB]
    assert devices.gpu_capabilities() == [(8, 0), (9, 0), (7, 5)]
    assert [devices.cuda_total_memory(i) for i in range(4)] == [80 * GiB, 40 * GiB, 16 * GiB, None]
    assert devices.cuda_total_memory() == 80 * GiB  # the first GPU by default
    assert devices.device_memory(torch.device("cuda", 2)) == (16 * GiB, "the GPU has")
    assert devices.device_memory(torch.device("cuda")) == (80 * GiB, "the GPU has")  # no index: the first GPU


def test_nvml_follows_cuda_visible_devices_order(nvml, monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0: CUDA's GPU 0 is NVML's GPU 2, and NVML's GPU 1 is not asked about."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.nvml_total_memory() == [16 * GiB, 80 * GiB]
    assert [call for call in nvml.calls if call.startswith("handle")] == ["handle 2", "handle 0"]
    assert devices.nvml_capabilities() == [(7, 5), (8, 0)]


def test_nvml_numbers_every_gpu_when_the_visible_list_cannot_be_read(nvml, monkeypatch):
    def unreadable(index):
        raise RuntimeError("Can't get device UUIDs")

    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", unreadable)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.nvml_total_memory() == [80 * GiB, 40 * GiB, 16 * GiB]  # NVML's own count


@pytest.mark.parametrize("failing", ["init", "count", "handle 1", "capability", "memory"])
def test_any_failing_nvml_call_is_none_and_nvml_is_shut_down_once_started(nvml, failing):
    nvml.fail = failing
    capabilities, totals = devices.nvml_capabilities(), devices.nvml_total_memory()
    assert capabilities == (None if failing != "memory" else [(8, 0), (9, 0), (7, 5)])  # memory: not asked here
    assert totals == (None if failing != "capability" else [80 * GiB, 40 * GiB, 16 * GiB])
    started = failing != "init"
    assert nvml.calls.count("shutdown") == (2 if started else 0)


def test_no_nvml_library_is_none(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert devices.nvml_capabilities() is None and devices.nvml_total_memory() is None
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace())  # an old NVML without these functions
    assert devices.nvml_total_memory() is None


def test_without_nvml_capabilities_come_from_a_child_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(devices, "nvml_capabilities", lambda: None)
    monkeypatch.setattr(devices, "child_process_capabilities", lambda: [(8, 6)])
    assert devices.gpu_capabilities() == [(8, 6)]


def test_with_cuda_initialised_torch_answers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, i))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(i + 1) * GiB))
    monkeypatch.setattr(devices, "nvml_each", lambda query: pytest.fail("NVML asked with CUDA initialised"))
    assert devices.gpu_capabilities() == [(8, 0), (8, 1)]
    assert devices.cuda_total_memory(1) == 2 * GiB


def test_unreadable_nvml_with_a_gpu_is_unknown_memory_not_a_cuda_context(monkeypatch):
    """NVML unreadable but a GPU visible: device_memory says it does not know and never asks torch (a CUDA context
    in the launcher breaks ddp_fork). estimate.choose_kernel asks torch itself, in test_estimate.py."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(devices, "nvml_total_memory", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: pytest.fail("asked torch"))
    assert devices.device_memory(torch.device("cuda", 1)) == (None, "")


@pytest.mark.parametrize("count, present", [(0, False), (1, True), (2, True)])
def test_one_visible_gpu_is_cuda_present(monkeypatch, count, present):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert devices.cuda_present() is present


@pytest.mark.parametrize(
    "returncode, stdout, expected",
    [(0, "[[8, 0], [9, 0]]\n", [(8, 0), (9, 0)]), (0, "[]\n", []), (1, "[[8, 0]]", []), (0, "not json", []),
     (0, "null", [])],
)  # fmt: skip
def test_child_process_capabilities_reads_the_probes_json(monkeypatch, returncode, stdout, expected):
    asked = []

    def run(command, **kwargs):
        asked.append((command, kwargs))
        return subprocess.CompletedProcess(command, returncode, stdout, "")

    monkeypatch.setattr(devices.subprocess, "run", run)
    assert devices.child_process_capabilities() == expected
    (command, kwargs), *_ = asked
    assert command == [sys.executable, "-c", devices.CAPABILITY_PROBE]
    assert kwargs == {"capture_output": True, "text": True, "timeout": 120, "check": False}


@pytest.mark.parametrize("error", [OSError("no python"), subprocess.TimeoutExpired("python", 120)])
def test_a_child_process_that_cannot_run_is_no_capabilities(monkeypatch, error):
    def run(command, **kwargs):
        raise error

    monkeypatch.setattr(devices.subprocess, "run", run)
    assert devices.child_process_capabilities() == []


def test_the_probe_prints_each_gpus_capability_as_json(monkeypatch):
    """The probe's code run here, in this process, against a torch that reports two GPUs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7 + i, 5))
    printed = []
    monkeypatch.setattr("builtins.print", lambda text: printed.append(text))
    exec(devices.CAPABILITY_PROBE, {})
    assert json.loads(printed[0]) == [[7, 5], [8, 5]]


def test_device_memory_of_a_gpu_is_its_nvml_total(monkeypatch):
    """Catches the GPU's index lost (device cuda means index 0, cuda:1 index 1), its total not read, and a GPU NVML
    cannot read (no total) shown as a size."""
    asked = []
    totals = {0: 80 * 2**30, 1: 40 * 2**30}
    monkeypatch.setattr(devices, "cuda_total_memory", lambda index: asked.append(index) or totals.get(index))
    assert devices.device_memory(torch.device("cuda")) == (80 * 2**30, "the GPU has")
    assert devices.device_memory(torch.device("cuda", 1)) == (40 * 2**30, "the GPU has")
    assert devices.device_memory(torch.device("cuda", 2)) == (None, "")
    totals[0] = 0
    assert devices.device_memory(torch.device("cuda", 0)) == (None, "")
    assert asked == [0, 1, 2, 0]


MEMINFO = "MemTotal:       16318412 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\nBuffers: 1 kB\n"


def fake_open(files: dict[str, str]):
    def opened(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    return opened


def test_device_memory_of_the_cpu_is_memavailable_from_proc_meminfo(monkeypatch):
    """Catches /proc/meminfo misnamed, the wrong line read (MemTotal, MemFree), kB not taken as 1024 bytes, and an
    unreadable file or one without MemAvailable (old kernels) not read as "not known"."""
    monkeypatch.setattr(devices, "cuda_total_memory", lambda index: 2**40)  # a CPU never asks NVML
    monkeypatch.setattr(devices, "open", fake_open({"/proc/meminfo": MEMINFO}), raising=False)
    assert devices.device_memory(torch.device("cpu")) == (12345678 * 1024, "available RAM is")
    monkeypatch.setattr(devices, "open", fake_open({"/proc/meminfo": "MemTotal: 16318412 kB\n"}), raising=False)
    assert devices.device_memory(torch.device("cpu")) == (None, "")
    monkeypatch.setattr(devices, "open", fake_open({}), raising=False)
    assert devices.device_memory(torch.device("cpu")) == (None, "")
