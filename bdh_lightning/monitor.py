"""Seeing inside a training run: a text sample and the sparsity of BDH's neurons, in TensorBoard.

Throughput and model FLOPs utilisation come from `throughput.ThroughputMonitor` (wired in cli.py), with FLOPs
counted from the spec's cost formulas (`BDHLitModule.training_flops`, `forward_flops` for validation).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from .console import shown
from .errors import ConfigError, non_negative_int, sampling_settings, seed_setting, text_bytes
from .generate import generate_text
from .layer import decode, layer_output, neuron_activations, rope_cos_sin
from .model import BDH


def logged_step(trainer) -> int:
    """The step Lightning gives the scalars logged now (its count of finished optimizer steps minus one during
    validation): figures logged by callbacks use it too, so one validation shows at one step in TensorBoard."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class TextSample(Callback):
    def __init__(
        self,
        prompt: str = "\n",
        length: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 1337,
    ):
        """A text sample from the model at each validation (TensorBoard text `sample`) and at the end of fit (printed).

        Uses the recurrent generator (generate.py), in the run's precision, on global rank 0 only; the same
        seed each time, so samples from successive validations are comparable.

        Args:
            prompt: Text the sample continues (UTF-8, at least one byte).
            length: Bytes to generate (0 = no sample).
            temperature: Sampling temperature; 0 = greedy.
            top_k: Sample among the k most likely bytes only, 1..256 (None = all).
            seed: Sampling seed.
        """
        # Checked here, before anything is written, whether the values came from the command line or a YAML file.
        text_bytes("sample.prompt", prompt)
        non_negative_int("sample.length", length, zero="0 = no sample")
        sampling_settings("sample.", temperature, top_k)
        seed_setting("sample.seed", seed)
        self.prompt, self.length, self.temperature, self.top_k, self.seed = prompt, length, temperature, top_k, seed

    def sample(self, trainer, pl_module) -> str:
        """Prompt and continuation, decoded as UTF-8 with invalid bytes shown as \\xNN."""
        prompt = self.prompt.encode("utf-8", errors="surrogateescape")  # bytes the shell passed undecoded kept
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            (new,) = generate_text(
                pl_module.model, prompt, self.length, temperature=self.temperature, top_k=self.top_k, seed=self.seed
            )
        return (prompt + new).decode("utf-8", errors="backslashreplace")

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.length == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        text = self.sample(trainer, pl_module)
        markdown = "\n".join("    " + line for line in text.split("\n"))  # a code block: shown verbatim
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("sample", markdown, global_step=logged_step(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.length == 0 or not trainer.is_global_zero:
            return
        text = shown(self.sample(trainer, pl_module))  # the model's control bytes never reach the terminal raw
        print(f"\n--- sample after {trainer.global_step} steps ---\n{text}\n---", flush=True)


@torch.no_grad()
def count_active(model: BDH, idx: torch.Tensor) -> torch.Tensor:
    """Non-zero counts of a = relu(x @ encoder), b = relu(y @ encoder_v) and a*b per layer: (n_layer, 3).

    The model's forward without dropout, one head at a time so only one head's N-wide tensors exist at
    once. Each count is out of B*H*T*N entries.
    """
    c = model.config
    T, N = idx.shape[1], c.neurons_per_head
    cos, sin = rope_cos_sin(torch.arange(T, device=idx.device), N)
    counts = torch.zeros(c.n_layer, 3, dtype=torch.long, device=idx.device)
    x = model.embed_bytes(idx)  # B, 1, T, D
    for layer in range(c.n_layer):
        u = 0
        for h in range(c.n_head):
            a, b = neuron_activations(x, model.encoder[h : h + 1], model.encoder_v[h : h + 1], cos, sin)
            ab = a * b
            counts[layer] += torch.stack([a.count_nonzero(), b.count_nonzero(), ab.count_nonzero()])
            u = u + decode(ab, model.decoder[h * N : (h + 1) * N])
        x = layer_output(x, u)
    return counts


class SparsityMonitor(Callback):
    def __init__(self, max_batches: int | None = None):
        """Logs the fraction of non-zero neurons at each validation: `sparsity/layer{i}/a`, `/b` and `/ab`.

        a = relu(x @ encoder), b = relu(y @ encoder_v) and their product a*b, per layer, over the validation
        windows. Costs one extra no-grad forward pass per validation batch, one head at a time.

        Args:
            max_batches: Count only the first this many validation batches (None = all).
        """
        if max_batches is not None and max_batches <= 0:
            raise ConfigError(f"sparsity.max_batches must be positive or null (all batches), got {max_batches}")
        self.max_batches = max_batches
        self.counts: torch.Tensor | None = None
        self.entries = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.counts, self.entries = None, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        idx = batch[0]
        with trainer.precision_plugin.forward_context():
            counts = count_active(pl_module.model, idx)
        self.counts = counts if self.counts is None else self.counts + counts
        c = pl_module.config
        self.entries += idx.numel() * c.n_head * c.neurons_per_head

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.counts is None:
            return
        fractions = (self.counts.double() / self.entries).float()
        for layer, (a, b, ab) in enumerate(fractions):
            for name, value in (("a", a), ("b", b), ("ab", ab)):
                pl_module.log(f"sparsity/layer{layer}/{name}", value, sync_dist=True)
