"""During fit: the neuron graph and firing rates in TensorBoard every k-th validation (what `inspect` reports)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError, finite_float, non_negative_int
from ..monitor import logged_step
from .activations import ALWAYS_ON, activation_pass
from .graph import graph_report
from .options import GraphOptions, require_extra
from .report import figure_image, plot_degrees, plot_firing_rates


class InsightMonitor(Callback):
    def __init__(self, every_n_validations: int = 0, mean_degree: float = 5.0, seed: int = 0):
        """The neuron graph and firing rates in TensorBoard every k-th validation (what `inspect` reports).

        Logs `insight/modularity` (Louvain, mean over heads), `insight/out_degree_alpha`, `insight/dead_ab` and
        `insight/always_on_ab` (shares of neurons), and the degree and firing-rate plots as images. Firing rates
        come from the first validation batch.

        Args:
            every_n_validations: Every this many validations (0 = off). Costs the graph of every head
                (an N x N product per head, in blocks) and one extra forward pass.
            mean_degree: Edges per neuron kept in the graph.
            seed: Seed of Louvain.
        """
        non_negative_int("inspect.every_n_validations", every_n_validations, ConfigError, zero="0 = off")
        finite_float("inspect.mean_degree", mean_degree, 0.0, low_open=True)
        if every_n_validations:
            require_extra("inspect.every_n_validations")
        self.every_n_validations, self.mean_degree, self.seed = every_n_validations, mean_degree, seed
        self.validations = 0
        self.batch = None

    def due(self, trainer) -> bool:
        return self.every_n_validations > 0 and not trainer.sanity_checking and trainer.is_global_zero

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.due(trainer) and batch_idx == 0:
            self.batch = batch

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        self.validations += 1
        if self.validations % self.every_n_validations or self.batch is None:
            return
        model = pl_module.model
        graph = graph_report(model, GraphOptions(mean_degree=self.mean_degree, seed=self.seed, seeds=1), null=False)
        idx, targets = self.batch
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            seen = activation_pass(model, idx, targets)
        rates = (seen.fires.double() / (idx.numel() * model.config.n_layer)).numpy()
        firing = {"_rates": rates}
        fit = graph["out_degree"]["fit"]
        scalars = {
            "insight/modularity": graph["modularity"],
            "insight/dead_ab": float((rates[2] == 0).mean()),
            "insight/always_on_ab": float((rates[2] >= ALWAYS_ON).mean()),
        }
        if fit:
            scalars["insight/out_degree_alpha"] = fit["alpha"]
        step = logged_step(trainer)  # the step of this validation's scalars
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_scalar"):
                for name, value in scalars.items():
                    experiment.add_scalar(name, value, global_step=step)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    "insight/degrees", figure_image(plot_degrees(graph, None)), step, dataformats="HWC"
                )
                experiment.add_image(
                    "insight/firing_rates", figure_image(plot_firing_rates(firing, None)), step, dataformats="HWC"
                )
        self.batch = None
