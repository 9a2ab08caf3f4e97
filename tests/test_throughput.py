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


def test_a_mobile_part_and_a_plain_sm_count_of_none(monkeypatch):
    assert find_peak("NVIDIA GeForce RTX 3080 Mobile") is None  # another chip under the same number
    peak = find_peak("NVIDIA A100-SXM4-80GB")
    assert dense_peak_flops(peak, torch.bfloat16, tf32=True) == 312.0e12  # no SM count: the whole part
    assert dense_peak_flops(peak, torch.bfloat16, tf32=True, sms=54) == 156.0e12


def test_the_peak_is_read_for_the_ranks_own_gpu(monkeypatch):
    """Two different GPUs in one machine: cuda:1's name and SM count are the ones asked."""
    names = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(multi_processor_count={0: 108, 1: 66}[device.index]))  # fmt: skip
    assert device_peak_flops(torch.device("cuda", 1), "bf16-mixed") == (pytest.approx(989.4e12 / 2), None)


class Clock:
    """time.perf_counter under the test's control."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_trainer(**settings):
    logger = MemoryLogger()
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, accumulate_grad_batches=1, log_every_n_steps=2,
                              max_steps=-1, global_step=0, should_stop=False, loggers=[logger], world_size=1,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="32-true")  # fmt: skip
    for key, value in settings.items():
        setattr(trainer, key, value)
    return trainer, logger.metrics


class Costed:
    """A module with the cost formulas: 10 FLOPs a byte forward, 30 trained."""

    @staticmethod
    def forward_flops(batch_size, block_size):
        return 10 * batch_size * block_size

    @staticmethod
    def training_flops(batch_size, block_size):
        return 30 * batch_size * block_size


BATCH = (torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long))  # 4 windows of 8 bytes


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    return clock


def train_steps(monitor, trainer, clock, steps, seconds_per_batch=0.5):
    """Lightning's order: each batch ends after its optimizer step (if any) has raised global_step."""
    for batch_idx in range(steps * trainer.accumulate_grad_batches):
        clock.now += seconds_per_batch
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            trainer.global_step += 1
        monitor.on_train_batch_end(trainer, Costed, None, BATCH, batch_idx)


def test_training_rates_are_exact_per_report_and_between_optimizer_steps_only(clock):
    """3 batches per optimizer step, a report every 2 steps: each covers 6 batches of 0.5 s, at the step
    before the one Lightning logs train/loss at."""
    trainer, metrics = fake_trainer(accumulate_grad_batches=3, log_every_n_steps=2)
    monitor = ThroughputMonitor()
    monitor.on_train_start(trainer, Costed)
    train_steps(monitor, trainer, clock, steps=4)
    assert metrics["train/device/batches_per_sec"] == [(1, 2.0), (3, 2.0)]
    assert metrics["train/device/samples_per_sec"] == [(1, 8.0), (3, 8.0)]
    assert metrics["train/device/items_per_sec"] == [(1, 64.0), (3, 64.0)]
    assert metrics["train/device/flops_per_sec"] == [(1, 30 * 64.0), (3, 30 * 64.0)]
    assert "train/batches_per_sec" not in metrics and "train/device/mfu" not in metrics  # one device, no peak


def test_several_devices_add_global_rates_and_a_peak_adds_mfu(clock):
    trainer, metrics = fake_trainer(world_size=2)
    monitor = ThroughputMonitor()
    monitor.world_size, monitor.available_flops = 2, 3840.0
    monitor.on_train_start(trainer, Costed)
    train_steps(monitor, trainer, clock, steps=2)
    assert metrics["train/device/items_per_sec"] == [(1, 64.0)] and metrics["train/items_per_sec"] == [(1, 128.0)]
    assert metrics["train/batches_per_sec"] == [(1, 4.0)] and metrics["train/device/mfu"] == [(1, 0.5)]


@pytest.mark.parametrize(
    "settings, stop_at, reported",
    [({"max_steps": 5}, None, [1, 3, 4]), ({"max_steps": 1, "log_every_n_steps": 50}, None, [0]),
     ({"log_every_n_steps": 50}, 3, [2]), ({"log_every_n_steps": 0, "max_steps": 3}, None, [2])],
)  # fmt: skip
def test_the_last_step_and_a_stop_are_reported_too(clock, settings, stop_at, reported):
    trainer, metrics = fake_trainer(**settings)
    monitor = ThroughputMonitor()
    monitor.on_train_start(trainer, Costed)
    for step in range(1, (trainer.max_steps if trainer.max_steps > 0 else 4) + 1):
        trainer.should_stop = step == stop_at
        train_steps(monitor, trainer, clock, steps=1)
        if trainer.should_stop:
            break
    assert [step for step, _ in metrics["train/device/batches_per_sec"]] == reported


def test_validation_inside_fit_is_not_training_time_and_is_logged_at_the_training_step(clock):
    """Two validations of 2 batches, 3 s each, inside one training report of 4 batches in 2 s."""
    trainer, metrics = fake_trainer(log_every_n_steps=4)
    monitor = ThroughputMonitor()
    monitor.on_train_start(trainer, Costed)
    for steps in (1, 1, 2):
        train_steps(monitor, trainer, clock, steps=steps)
        if trainer.global_step == 4:
            break
        monitor.on_validation_start(trainer, Costed)
        for batch_idx in range(2):
            clock.now += 1.5
            monitor.on_validation_batch_end(trainer, Costed, None, BATCH, batch_idx)
        monitor.on_validation_end(trainer, Costed)
    monitor.on_validation_end(trainer, Costed)  # an end without a start after them: nothing more
    assert metrics["validate/device/items_per_sec"] == [(0, 64 / 3), (1, 64 / 3)]
    assert metrics["validate/device/flops_per_sec"] == [(0, 10 * 64 / 3), (1, 10 * 64 / 3)]  # forward only
    assert metrics["train/device/batches_per_sec"] == [(3, 2.0)]  # the 6 s of both validations left out


def test_a_test_pass_is_reported_and_does_not_pause_training(clock):
    trainer, metrics = fake_trainer(global_step=5)
    monitor = ThroughputMonitor()
    monitor.train = throughput.Span(clock.now)
    monitor.on_test_start(trainer, Costed)
    clock.now += 2.0
    monitor.on_test_batch_end(trainer, Costed, None, BATCH, 0)
    monitor.on_test_end(trainer, Costed)
    assert metrics == {"test/device/batches_per_sec": [(4, 0.5)], "test/device/samples_per_sec": [(4, 2.0)],
                       "test/device/items_per_sec": [(4, 16.0)], "test/device/flops_per_sec": [(4, 160.0)]}  # fmt: skip
    assert monitor.train.paused == 0.0


def test_sanity_checks_other_ranks_and_ends_without_starts_report_nothing_and_never_sync(clock, monkeypatch):
    synced = []
    real_now = ThroughputMonitor.now
    monkeypatch.setattr(ThroughputMonitor, "now", staticmethod(lambda trainer: synced.append(1) or real_now(trainer)))
    trainer, metrics = fake_trainer(sanity_checking=True)
    monitor = ThroughputMonitor()
    for hooks in ((monitor.on_validation_start, monitor.on_validation_batch_end, monitor.on_validation_end),
                  (monitor.on_test_start, monitor.on_test_batch_end, monitor.on_test_end)):  # fmt: skip
        hooks[0](trainer, Costed)
        hooks[1](trainer, Costed, None, BATCH, 0)
        hooks[2](trainer, Costed)
    rank1, _ = fake_trainer(is_global_zero=False)
    rank1.loggers = trainer.loggers
    monitor.on_train_start(rank1, Costed)
    train_steps(monitor, rank1, clock, steps=4)
    monitor.on_validation_start(rank1, Costed)
    monitor.on_validation_batch_end(rank1, Costed, None, BATCH, 0)
    monitor.on_validation_end(rank1, Costed)
    awake, _ = fake_trainer()
    awake.loggers = trainer.loggers
    monitor.on_validation_batch_end(awake, Costed, None, BATCH, 0)  # a batch and an end without their start
    monitor.on_validation_end(awake, Costed)
    monitor.on_train_end(awake, Costed)
    monitor.on_train_batch_end(awake, Costed, None, BATCH, 0)  # a batch after training ended
    assert metrics == {} and synced == []


def test_a_module_without_cost_formulas_logs_rates_but_no_flops(clock):
    trainer, metrics = fake_trainer()
    monitor = ThroughputMonitor()
    monitor.available_flops = 1e12
    monitor.on_train_start(trainer, object())
    for batch_idx in range(2):
        clock.now += 1.0
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, object(), None, BATCH, batch_idx)
    assert sorted(metrics) == ["train/device/batches_per_sec", "train/device/items_per_sec",
                               "train/device/samples_per_sec"]  # fmt: skip


def test_no_time_passed_is_no_report():
    trainer, metrics = fake_trainer()
    span = throughput.Span(10.0, batches=1, windows=1, bytes=8)
    ThroughputMonitor().report(trainer, "train", span, 10.0, 0)
    ThroughputMonitor().report(trainer, "train", throughput.Span(10.0), 12.0, 0)  # time, but no batch
    assert metrics == {}


def test_reports_sync_the_ranks_own_gpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synced.append(device))
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 1)))
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    ThroughputMonitor.now(gpu)
    ThroughputMonitor.now(cpu)
    assert synced == [torch.device("cuda", 1)]


def test_setup_reads_the_ranks_device_and_precision_and_notes_an_unknown_gpu_once(monkeypatch, capsys):
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    trainer, _ = fake_trainer(world_size=4, precision="bf16-mixed")
    trainer.strategy.root_device = torch.device("cuda", 0)
    monitor = ThroughputMonitor()
    monitor.setup(trainer, None, "fit")
    assert (monitor.world_size, monitor.available_flops) == (4, pytest.approx(989.4e12))
    fake_cuda(monkeypatch, "NVIDIA B200", 148)
    monitor.setup(trainer, None, "fit")
    trainer.is_global_zero = False
    monitor.setup(trainer, None, "fit")
    err = capsys.readouterr().err
    assert err.startswith("note: no MFU: 'NVIDIA B200'") and err.count("\n") == 1 and err.endswith("still logged\n")
