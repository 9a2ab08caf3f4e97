"""insight/callback.py driven directly: its settings' lines, which validation and batch it reads, and what it logs
where (test_insight.py's tensorboard test runs it inside a real fit)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from bdh_lightning.errors import ConfigError
from bdh_lightning.insight import callback
from bdh_lightning.insight.callback import InsightMonitor
from bdh_lightning.insight.options import GraphOptions, MissingExtra
from bdh_lightning.insight.report import figure_image, plot_degrees, plot_firing_rates
from bdh_lightning.model import BDH, BDHConfig


@pytest.mark.parametrize(
    "settings, message",
    [({"every_n_validations": -1}, "inspect.every_n_validations must be a non-negative integer (0 = off), got -1"),
     ({"every_n_validations": 1.5}, "inspect.every_n_validations must be a non-negative integer (0 = off)"),
     ({"mean_degree": 0.0}, "inspect.mean_degree must be"), ({"mean_degree": float("nan")}, "inspect.mean_degree"),
     ({"every_n_validations": "2"}, "inspect.every_n_validations must be")],
)  # fmt: skip
def test_bad_settings_are_one_line_naming_the_key(settings, message):
    with pytest.raises(ConfigError) as error:
        InsightMonitor(**settings)
    assert str(error.value).startswith(message)


def test_the_extra_is_needed_only_when_the_monitor_is_on(monkeypatch):
    def missing(feature="inspect"):
        raise MissingExtra(f"{feature} needs scipy")

    monkeypatch.setattr(callback, "require_extra", missing)
    off = InsightMonitor()
    assert (off.every_n_validations, off.mean_degree, off.seed) == (0, 5.0, 0)
    assert InsightMonitor(mean_degree=0.5).mean_degree == 0.5  # any positive degree
    with pytest.raises(MissingExtra, match="^inspect.every_n_validations needs scipy$"):
        InsightMonitor(every_n_validations=1)


class Experiment:
    def __init__(self, images=True):
        self.scalars, self.images = [], []
        if images:
            self.add_image = lambda tag, image, step, dataformats: self.images.append((tag, image, step, dataformats))

    def add_scalar(self, name, value, global_step):
        self.scalars.append((name, value, global_step))


def fake_trainer(step=7, **settings):
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, precision_plugin=SimpleNamespace(forward_context=nullcontext),
        loggers=[SimpleNamespace(experiment=Experiment()), SimpleNamespace(experiment=Experiment(images=False)),
                 SimpleNamespace()],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step)),
    )  # fmt: skip
    for key, value in settings.items():
        setattr(trainer, key, value)
    return trainer


def batch(seed):
    data = torch.randint(0, 256, (4, 26), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]  # 100 positions


@pytest.fixture
def wired(monkeypatch):
    """The real graph and activation pass, recorded; the pass's a*b firing counts replaced by planted ones:
    per head, a quarter of the neurons never fire, a quarter fire at exactly 99% of positions x layers (always on)."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(**TINY_MODEL))
    calls = {"graph": [], "pass": []}
    real_graph, real_pass = callback.graph_report, callback.activation_pass

    def graph_report(model, options, null=True):
        calls["graph"].append((options, null))
        return real_graph(model, options, null=null)

    def activation_pass(model, idx, targets):
        calls["pass"].append((idx, targets))
        seen = real_pass(model, idx, targets)
        fires = seen.fires.clone()
        P = idx.numel() * model.config.n_layer
        N = fires.shape[-1]
        fires[2, :, : N // 4], fires[2, :, N // 4 : N // 2], fires[2, :, N // 2 :] = 0, 99 * P // 100, P // 2
        calls["fires"] = fires
        return dataclasses.replace(seen, fires=fires)

    monkeypatch.setattr(callback, "graph_report", graph_report)
    monkeypatch.setattr(callback, "activation_pass", activation_pass)
    return SimpleNamespace(model=model), calls


def test_every_second_validation_logs_the_graph_and_firing_rates_of_its_first_batch(wired):
    module, calls = wired
    monitor = InsightMonitor(every_n_validations=2, mean_degree=3.0, seed=4)
    trainer = fake_trainer(step=7)
    for validation in range(2):
        first, second = batch(2 * validation), batch(2 * validation + 1)
        monitor.on_validation_batch_end(trainer, module, None, first, 0)
        monitor.on_validation_batch_end(trainer, module, None, second, 1)
        monitor.on_validation_end(trainer, module)
        if validation == 0:
            assert calls == {"graph": [], "pass": []} and trainer.loggers[0].experiment.scalars == []
    assert calls["graph"] == [(GraphOptions(mean_degree=3.0, seed=4, seeds=1), False)]
    ((idx, targets),) = calls["pass"]
    assert torch.equal(idx, batch(2)[0]) and torch.equal(targets, batch(2)[1])  # the 2nd validation's first batch
    graph = callback.graph_report(module.model, GraphOptions(mean_degree=3.0, seed=4, seeds=1), null=False)
    expected = [("insight/modularity", graph["modularity"], 7), ("insight/dead_ab", 0.25, 7),
                ("insight/always_on_ab", 0.25, 7)]  # fmt: skip
    if graph["out_degree"]["fit"]:
        expected.append(("insight/out_degree_alpha", graph["out_degree"]["fit"]["alpha"], 7))
    for logger in trainer.loggers[:2]:
        assert logger.experiment.scalars == expected
    images = trainer.loggers[0].experiment.images
    assert [(tag, step, form) for tag, _, step, form in images] == [
        ("insight/degrees", 7, "HWC"), ("insight/firing_rates", 7, "HWC")]  # fmt: skip
    rates = (calls["fires"].double() / (idx.numel() * module.model.config.n_layer)).numpy()
    drawn = (figure_image(plot_degrees(graph, None)), figure_image(plot_firing_rates({"_rates": rates}, None)))
    for (tag, image, _, _), expected in zip(images, drawn):
        assert image.shape[-1] == 3 and np.array_equal(image, expected), tag  # the plots inspect draws, as RGB
    assert monitor.batch is None  # the batch is let go once logged


def test_the_out_degree_exponent_is_logged_only_when_a_tail_was_fitted(wired, monkeypatch):
    module, calls = wired
    for fit, logged in (({"alpha": 2.5}, [2.5]), (None, [])):
        real = callback.graph_report

        def graph_report(model, options, null=True, fit=fit):
            report = real(model, options, null=null)
            report["out_degree"]["fit"] = fit
            return report

        monkeypatch.setattr(callback, "graph_report", graph_report)
        monitor = InsightMonitor(every_n_validations=1)
        trainer = fake_trainer(loggers=[SimpleNamespace(experiment=Experiment(images=False))])  # no degree plot
        monitor.on_validation_batch_end(trainer, module, None, batch(0), 0)
        monitor.on_validation_end(trainer, module)
        scalars = trainer.loggers[0].experiment.scalars
        assert [value for name, value, _ in scalars if name == "insight/out_degree_alpha"] == logged
        monkeypatch.setattr(callback, "graph_report", real)


@pytest.mark.parametrize(
    "settings",
    [{"sanity_checking": True}, {"is_global_zero": False}],
)
def test_sanity_checks_and_other_ranks_log_nothing(wired, settings):
    module, calls = wired
    monitor = InsightMonitor(every_n_validations=1)
    trainer = fake_trainer(**settings)
    monitor.on_validation_batch_end(trainer, module, None, batch(0), 0)
    monitor.on_validation_end(trainer, module)
    assert monitor.batch is None and monitor.validations == 0 and calls == {"graph": [], "pass": []}


def test_a_validation_without_its_first_batch_logs_nothing(wired):
    module, calls = wired
    monitor = InsightMonitor(every_n_validations=1)
    trainer = fake_trainer()
    monitor.on_validation_batch_end(trainer, module, None, batch(0), 3)  # only a later batch seen
    monitor.on_validation_end(trainer, module)
    assert monitor.validations == 1 and calls == {"graph": [], "pass": []}
    assert trainer.loggers[0].experiment.scalars == []


def test_off_reads_nothing(wired):
    module, calls = wired
    monitor = InsightMonitor()
    trainer = fake_trainer()
    monitor.on_validation_batch_end(trainer, module, None, batch(0), 0)
    monitor.on_validation_end(trainer, module)
    assert monitor.batch is None and monitor.validations == 0 and calls == {"graph": [], "pass": []}


def test_the_planted_rates_are_what_the_shares_count():
    """The fixture's planted counts, as rates: 0, exactly 0.99 (always on: at the threshold) and 0.5."""
    P = 100 * TINY_MODEL["n_layer"]
    assert (99 * P // 100) / P >= callback.ALWAYS_ON and np.float64(0.5) < callback.ALWAYS_ON
