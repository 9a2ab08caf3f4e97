"""Seeing inside: the FLOPs count, the sparsity counts, and what a tiny run writes to TensorBoard."""

import io
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from bdh_lightning.errors import ConfigError
from bdh_lightning.layer import layer_norm, reference_layer, rope, rope_cos_sin
from bdh_lightning.module import BDHLitModule
from bdh_lightning.monitor import SparsityMonitor, TextSample, count_active

TINY = TINY_MODEL


@pytest.mark.parametrize("batch_size, block_size", [(2, 16), (3, 40)])
def test_training_flops_match_a_measured_count(batch_size, block_size):
    """`training_flops` against torch's FlopCounterMode on one forward + backward of the reference kernel.

    Both count 2 FLOPs per multiply-add of the matrix products only: x @ encoder, y @ encoder_v, @ decoder
    (2·H·D·N per token and layer each), the full T x T product q @ qᵀ (2·H·N·T per token: the formula
    counts the whole product the kernel computes, not only its useful lower half), S @ x (2·H·D·T) and
    lm_head (2·D·V per token). Backward is exactly twice: every product needs the gradients of both inputs
    (the embedding output requires grad too). Neither counts layer norms, rope, relu, dropout, the
    embedding lookup or the loss: elementwise work, small next to the products.
    """
    module = BDHLitModule(**TINY, kernel="reference", dropout=0.0)
    x = torch.randint(0, 256, (batch_size, block_size))
    y = torch.randint(0, 256, (batch_size, block_size))
    with FlopCounterMode(display=False) as counter:
        module.loss((x, y)).backward()
    assert counter.get_total_flops() == module.training_flops(batch_size, block_size)


def plain_active_counts(model, idx):
    """The counts written plainly: a and b of all heads at once, x carried on by `reference_layer`."""
    N = model.config.neurons_per_head
    cos, sin = rope_cos_sin(torch.arange(idx.shape[1]), N)
    x = model.embed_bytes(idx)
    counts = []
    for _ in range(model.config.n_layer):
        a = F.relu(x @ model.encoder)
        q = rope(a, cos, sin)
        b = F.relu(layer_norm((q @ q.transpose(-1, -2)).tril(diagonal=-1) @ x) @ model.encoder_v)
        counts.append([(a > 0).sum().item(), (b > 0).sum().item(), ((a > 0) & (b > 0)).sum().item()])
        x = reference_layer(x, model.encoder, model.encoder_v, model.decoder, cos, sin, 0.0, False)
    return torch.tensor(counts)


def test_count_active_matches_the_plain_computation():
    torch.manual_seed(0)
    module = BDHLitModule(**{**TINY, "n_layer": 3}, dropout=0.0)
    idx = torch.randint(0, 256, (3, 48))
    with torch.no_grad():
        counts = count_active(module.model, idx)
        expected = plain_active_counts(module.model, idx)
    entries = idx.numel() * module.config.n_head * module.config.neurons_per_head
    assert counts.shape == (3, 3)
    assert (counts > 0).all() and (counts < entries).all()  # a real fraction, neither 0 nor 1
    # Heads one at a time vs all at once round differently: allow a value at zero to flip, rarely.
    assert (counts - expected).abs().max().item() <= entries * 1e-4, (counts, expected)


def test_callbacks_reject_bad_settings():
    for make in (lambda: TextSample(prompt=""), lambda: TextSample(length=-1), lambda: TextSample(top_k=0),
                 lambda: TextSample(temperature=-1.0), lambda: SparsityMonitor(max_batches=0)):  # fmt: skip
        with pytest.raises(ConfigError):
            make()


def test_tiny_run_writes_sparsity_and_text_samples_to_tensorboard(tmp_path, capsys):
    L.seed_everything(0)
    module = BDHLitModule(**TINY)
    data = torch.randint(0, 256, (40, 17))
    pairs = list(zip(data[:, :-1], data[:, 1:]))
    train = torch.utils.data.DataLoader(pairs[:32], batch_size=8)
    val = torch.utils.data.DataLoader(pairs[32:], batch_size=4)
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path),
        callbacks=[TextSample(prompt="To be", length=30), SparsityMonitor()], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, train, val)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    for layer in range(TINY["n_layer"]):
        for name in ("a", "b", "ab"):
            values = [e.value for e in events.Scalars(f"sparsity/layer{layer}/{name}")]
            assert len(values) == 2 and all(0.0 < v < 1.0 for v in values), (layer, name, values)
    samples = events.Tensors("sample/text_summary")
    # At the step Lightning gives that validation's scalars (one validation, one step in TensorBoard).
    assert [e.step for e in samples] == [e.step for e in events.Scalars("sparsity/layer0/a")] == [1, 3]
    assert all(e.tensor_proto.string_val[0].decode().startswith("    To be") for e in samples)
    printed = capsys.readouterr().out
    assert "--- sample after 4 steps ---\nTo be" in printed


def test_sparsity_max_batches_counts_only_the_first_batches_and_sample_length_0_writes_no_sample(tmp_path, capsys):
    L.seed_everything(1)
    module = BDHLitModule(**TINY, dropout=0.0)
    data = torch.randint(0, 256, (12, 17))
    pairs = list(zip(data[:, :-1], data[:, 1:]))
    val = torch.utils.data.DataLoader(pairs, batch_size=4)  # three batches; the monitor reads the first two
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path),
        callbacks=[TextSample(prompt="To be", length=0), SparsityMonitor(max_batches=2)], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(pairs, batch_size=4), val)
    first_two = data[:8, :-1]
    with torch.no_grad():
        counts = count_active(module.model, first_two)
        everything = count_active(module.model, data[:, :-1])
    entries = first_two.numel() * module.config.n_head * module.config.neurons_per_head
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    for layer in range(TINY["n_layer"]):
        for i, name in enumerate(("a", "b", "ab")):
            (logged,) = [e.value for e in events.Scalars(f"sparsity/layer{layer}/{name}")]
            assert logged == pytest.approx(counts[layer, i].item() / entries, rel=1e-6), (layer, name)
            assert logged != pytest.approx(everything[layer, i].item() / (entries * 1.5), rel=1e-6)  # what all 3 give
    assert "sample/text_summary" not in events.Tags()["tensors"]  # length 0: no sample written
    assert "--- sample" not in capsys.readouterr().out  # nor printed at the end


def test_text_sample_settings_reach_the_sample(tmp_path):
    sample = TextSample(prompt="ab", length=7, temperature=0.0, top_k=3, seed=5)
    assert (sample.prompt, sample.length, sample.temperature, sample.top_k, sample.seed) == ("ab", 7, 0.0, 3, 5)
    module = BDHLitModule(**TINY, dropout=0.0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    text = sample.sample(trainer, module)
    assert text.startswith("ab") and len(text.encode("utf-8", errors="surrogateescape")) >= 9
    assert text == sample.sample(trainer, module)  # the same seed each time


def test_every_input_safe_the_closing_sample_escapes_control_bytes_as_generate_does(monkeypatch, capsys):
    """Issue 29: a model's ESC, BEL, CR and C1 bytes reach the terminal as \\xNN (console.shown, generate's escaping)."""
    sample = TextSample(prompt="ab", length=5)
    monkeypatch.setattr(sample, "sample", lambda trainer, module: "To be\x1b[2J\x1b]0;owned\x07\r\x9b\tok\n")
    trainer = type("Trainer", (), {"is_global_zero": True, "global_step": 3})()
    sample.on_fit_end(trainer, None)
    printed = capsys.readouterr().out
    assert printed == "\n--- sample after 3 steps ---\nTo be\\x1b[2J\\x1b]0;owned\\x07\\x0d\\xc2\\x9b\tok\n\n---\n"


@pytest.mark.parametrize(
    "make, message",
    [(lambda: TextSample(prompt=""), "sample.prompt must hold at least one byte"),
     (lambda: TextSample(prompt=1), "sample.prompt must be UTF-8 text, got 1"),
     (lambda: TextSample(length=-1), "sample.length must be a non-negative integer (0 = no sample), got -1"),
     (lambda: TextSample(top_k=0), "sample.top_k must be in 1..256 (there are 256 bytes), got 0"),
     (lambda: TextSample(temperature=-1.0), "sample.temperature must be"),
     (lambda: TextSample(seed=-1), "sample.seed must be an integer from 0 to 2**64 - 1, got -1"),
     (lambda: SparsityMonitor(max_batches=0), "sparsity.max_batches must be positive or null (all batches), got 0")],
)  # fmt: skip
def test_bad_callback_settings_are_named_with_their_config_key(make, message):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value).startswith(message)


def test_callback_defaults_are_the_documented_ones():
    sample = TextSample()
    assert (sample.prompt, sample.length, sample.temperature, sample.top_k, sample.seed) == ("\n", 200, 0.8, None, 1337)
    assert SparsityMonitor().max_batches is None and SparsityMonitor(max_batches=1).max_batches == 1


def test_the_sample_is_generate_text_with_every_setting(tmp_path):
    """Prompt bytes the shell passed undecoded (0xff) are kept, and temperature, top_k and seed all reach the
    sampler: the sample is exactly generate_text's continuation of those bytes."""
    from bdh_lightning.generate import generate_text

    torch.manual_seed(0)
    module = BDHLitModule(**TINY, dropout=0.0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    sample = TextSample(prompt="a\udcff", length=24, temperature=0.05, top_k=3, seed=11)
    (new,) = generate_text(module.model, b"a\xff", 24, temperature=0.05, top_k=3, seed=11)
    text = sample.sample(trainer, module)
    assert text == (b"a\xff" + new).decode("utf-8", errors="backslashreplace") and text.startswith("a\\xff")
    others = [generate_text(module.model, b"a\xff", 24, **settings)[0] for settings in
              ({"temperature": 1.0, "top_k": 3, "seed": 11}, {"temperature": 0.05, "seed": 11},
               {"temperature": 0.05, "top_k": 3, "seed": 12})]  # fmt: skip
    assert all(other != new for other in others)  # each setting changes this sample: the test can tell


class Recorder:
    def __init__(self):
        self.calls = []

    def add_text(self, tag, text, global_step):
        self.calls.append((tag, text, global_step))


def test_the_logged_sample_is_a_markdown_code_block_at_the_validation_step(monkeypatch):
    sample = TextSample()
    monkeypatch.setattr(sample, "sample", lambda trainer, module: "To be\nor not")
    experiment = Recorder()
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=[SimpleNamespace(experiment=experiment)],
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=7)))  # fmt: skip
    sample.on_validation_end(trainer, None)
    assert experiment.calls == [("sample", "    To be\n    or not", 7)]


def test_the_closing_sample_is_flushed_at_once(monkeypatch):
    """Printed with flush: a piped log shows the sample before whatever the process writes next."""
    sample = TextSample(length=5)
    monkeypatch.setattr(sample, "sample", lambda trainer, module: "ok")
    flushed = []

    class Stdout(io.StringIO):
        def flush(self):
            flushed.append(self.getvalue())

    monkeypatch.setattr(sys, "stdout", Stdout())
    sample.on_fit_end(SimpleNamespace(is_global_zero=True, global_step=3), None)
    assert flushed == ["\n--- sample after 3 steps ---\nok\n---\n"]


def test_sparsity_fractions_are_averaged_over_the_ranks_and_nothing_is_logged_without_batches():
    monitor = SparsityMonitor()
    logged = []
    module = SimpleNamespace(log=lambda name, value, **kwargs: logged.append((name, float(value), kwargs)))
    monitor.on_validation_epoch_end(None, module)  # no batch counted (sanity check only): nothing to log
    assert logged == []
    monitor.counts, monitor.entries = torch.tensor([[1, 2, 3]]), 4
    monitor.on_validation_epoch_end(None, module)
    assert logged == [(f"sparsity/layer0/{name}", value, {"sync_dist": True})
                      for name, value in (("a", 0.25), ("b", 0.5), ("ab", 0.75))]  # fmt: skip
