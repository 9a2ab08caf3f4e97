"""MFU: the dense-peak table, the device it picks (CUDA faked on the CPU), forward-only FLOPs for validation,
and GPU synchronization only where a rate is reported."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL, write_letters
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import Logger

from bdh_lightning import throughput
from bdh_lightning.data import ByteDataModule
from bdh_lightning.module import BDHLitModule
from bdh_lightning.throughput import ThroughputMonitor, dense_peak_flops, device_peak_flops, find_peak


@pytest.mark.parametrize(
    "device_name, expected",
    [
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),  # Lightning's parser reads this as an L4
        ("NVIDIA L40", "L40"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        ("NVIDIA GeForce RTX 4080 SUPER", "GeForce RTX 4080 SUPER"),
        ("NVIDIA GeForce RTX 3090 Ti", "GeForce RTX 3090 Ti"),
        ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"),
        ("NVIDIA GeForce RTX 3080 Ti", "GeForce RTX 3080 Ti"),
        ("NVIDIA GeForce RTX 3070", "GeForce RTX 3070"),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", None),  # another chip under the same number
        ("NVIDIA A10G", None),  # no NVIDIA datasheet
        ("NVIDIA B200", None),
        ("Tesla T4", None),
    ],
)
def test_device_names_find_their_row(device_name, expected):
    peak = find_peak(device_name)
    assert (peak.name if peak else None) == expected


def test_the_table_is_dense_peaks():
    """Dense is half the sparse datasheet figure: H200 SXM bf16 989.5 TFLOP/s (Lightning: 2000), H100 NVL 835.5
    (Lightning: 1978.8). Across the table: FP16 = BF16 (both with FP32 accumulate), TF32 half of it, plain FP32
    at most TF32 (equal on GeForce cards, whose tensor cores run TF32 at the FP32 rate)."""
    assert find_peak("NVIDIA H200").bf16 == 989.5 and find_peak("NVIDIA H100 NVL").bf16 == 835.5
    for _, peak in throughput.PEAKS:
        assert peak.fp16 == peak.bf16 and peak.fp32 <= peak.tf32 < peak.bf16, peak.name
        ratio = peak.bf16 / peak.tf32
        assert ratio == pytest.approx(2, rel=0.01), peak.name
        if "GeForce" in peak.name:
            assert peak.fp32 == peak.tf32, peak.name
        assert peak.source and peak.sms > 0


def fake_cuda(monkeypatch, name: str, sms: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: SimpleNamespace(multi_processor_count=sms, major=9, minor=0),
    )


def test_lightning_misses_the_h200_and_we_do_not(monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA H200", 132)
    with pytest.warns(UserWarning, match="FLOPs not found"):
        assert get_available_flops(torch.device("cuda", 0), torch.bfloat16) is None
    assert device_peak_flops(torch.device("cuda", 0), "bf16-mixed") == (989.5e12, None)


@pytest.mark.parametrize(
    "precision, tf32, expected", [("bf16-mixed", False, 989.4e12), ("16-mixed", False, 989.4e12), ("bf16-true", True, 989.4e12),
                                  ("32-true", True, 494.7e12), ("32-true", False, 66.9e12)],
)  # fmt: skip
def test_peak_follows_the_precision_and_tf32(monkeypatch, precision, tf32, expected):
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    before = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        flops, note = device_peak_flops(torch.device("cuda", 0), precision)
    finally:
        torch.set_float32_matmul_precision(before)
    assert flops == pytest.approx(expected) and note is None


def test_a_mig_slice_gets_its_share(monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16)
    flops, _ = device_peak_flops(torch.device("cuda", 0), "bf16-mixed")
    assert flops == pytest.approx(989.4e12 * 16 / 132)


def test_unknown_device_or_dtype_is_no_mfu_and_one_line(monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA B200", 148)
    flops, note = device_peak_flops(torch.device("cuda", 0), "bf16-mixed")
    assert flops is None and note.startswith("note: no MFU: 'NVIDIA B200'") and "\n" not in note
    fake_cuda(monkeypatch, "NVIDIA A100-SXM4-40GB", 108)
    flops, note = device_peak_flops(torch.device("cuda", 0), "64-true")
    assert flops is None and "64-true" in note and "\n" not in note
    assert device_peak_flops(torch.device("cpu"), "32-true") == (None, None)  # the CPU: nothing to say
    assert dense_peak_flops(find_peak("NVIDIA L4"), torch.float64, tf32=True) is None


class MemoryLogger(Logger):
    """Keeps every logged metric as {name: [(step, value), ...]}."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))


def run_tiny_fit(tmp_path, monkeypatch, peak: float | None, max_steps=12, log_every=4, val_every=6):
    """A tiny CPU fit with the monitor, the device's peak faked to `peak`; counts the monitor's sync points."""
    monkeypatch.setattr(throughput, "device_peak_flops", lambda device, precision: (peak, None))
    syncs = []
    real_now = ThroughputMonitor.now
    monkeypatch.setattr(ThroughputMonitor, "now", staticmethod(lambda trainer: syncs.append(1) or real_now(trainer)))
    corpus = write_letters(tmp_path / "corpus.txt")
    module = BDHLitModule(**TINY_MODEL, learning_rate=3e-3)
    logger, monitor = MemoryLogger(), ThroughputMonitor()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=log_every, val_check_interval=val_every,
                        check_val_every_n_epoch=None, callbacks=[monitor], logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, ByteDataModule(str(corpus), block_size=32, batch_size=4, val_windows=8))
    return logger.metrics, module, len(syncs)


def test_validation_counts_forward_flops_and_mfu_uses_the_peak(tmp_path, monkeypatch):
    metrics, module, _ = run_tiny_fit(tmp_path, monkeypatch, peak=1e12)
    train_flops_per_byte = module.training_flops(4, 32) / (4 * 32)
    forward_flops_per_byte = module.forward_flops(4, 32) / (4 * 32)
    assert train_flops_per_byte == pytest.approx(3 * forward_flops_per_byte)
    for stage, per_byte in (("train", train_flops_per_byte), ("validate", forward_flops_per_byte)):
        flops = metrics[f"{stage}/device/flops_per_sec"]
        items = metrics[f"{stage}/device/items_per_sec"]
        mfu = metrics[f"{stage}/device/mfu"]
        assert len(flops) == len(items) == len(mfu) > 0, stage
        for (_, f), (_, i), (_, m) in zip(flops, items, mfu):
            assert f == pytest.approx(i * per_byte, rel=1e-6), stage  # validation: a forward, not 3x
            assert m == pytest.approx(f / 1e12, rel=1e-6), stage
    assert [step for step, _ in metrics["train/device/items_per_sec"]] == [3, 7, 11]  # train/loss's steps: 4, 8, 12
    assert len(metrics["validate/device/items_per_sec"]) == 2  # after steps 6 and 12
    bytes_per_window = [
        i / s for (_, i), (_, s) in zip(metrics["train/device/items_per_sec"], metrics["train/device/samples_per_sec"])
    ]
    assert bytes_per_window == pytest.approx([32] * 3)


def test_no_peak_no_mfu_and_syncs_only_at_reports(tmp_path, monkeypatch):
    metrics, _, syncs = run_tiny_fit(tmp_path, monkeypatch, peak=None, max_steps=24, log_every=8, val_every=12)
    assert "train/device/flops_per_sec" in metrics and not any(key.endswith("mfu") for key in metrics)
    # The start, 3 training reports, and the start and end of 2 validations: 9 of 24 steps, not one per batch.
    assert syncs == 1 + 3 + 2 * 2
