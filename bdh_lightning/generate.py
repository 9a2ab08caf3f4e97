"""Generation in BDH's recurrent form, and sampling (the `generate` command is in commands.py).

Attention without softmax is linear: per layer and head a state M (N x D) sums qᵀ x over the bytes read so far
(`layer.stream_attention` through `BDH.forward_stream`), so each new byte costs the same whatever the context.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .model import BDH


class Generator:
    """Generates from a `BDH` with a fixed-size state per layer: `states[l]` is (B, H, N, D), float32.

    `position` is the absolute position of the next byte. Call under torch.no_grad/inference_mode (the
    `generate` method does); wrap in torch.autocast to compute the N-wide products in lower precision (the
    state and the attention read stay float32).
    """

    def __init__(self, model: BDH, batch_size: int = 1, states: list[torch.Tensor] | None = None, position: int = 0):
        self.model = model
        c = model.config
        if states is None:  # an empty context; or continue a stream from a training run's carried state
            shape = (batch_size, c.n_head, c.neurons_per_head, c.n_embd)
            states = [torch.zeros(shape, device=model.encoder.device, dtype=torch.float32) for _ in range(c.n_layer)]
        self.states = states
        self.position = position

    def forward_chunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Read bytes idx (B, C) at the next C positions, update the states; next-byte logits (B, C, V)."""
        logits, self.states = self.model.forward_stream(idx, self.position, self.states, exact=True)
        self.position += idx.shape[1]
        return logits

    def prefill(self, idx: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """Read a prompt (B, T) chunk by chunk; logits (B, V) for the byte after it."""
        for start in range(0, idx.shape[1], chunk_size):
            logits = self.forward_chunk(idx[:, start : start + chunk_size])
        return logits[:, -1]

    def step(self, byte: torch.Tensor) -> torch.Tensor:
        """Read one byte per row (B,); logits (B, V) for the byte after it."""
        return self.forward_chunk(byte.view(-1, 1))[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        chunk_size: int = 256,
    ) -> Iterator[torch.Tensor]:
        """Read prompt (B, T), then yield max_new_tokens new bytes, each a (B,) tensor, as they are sampled."""
        logits = self.prefill(prompt, chunk_size)
        for i in range(max_new_tokens):
            byte = sample_next(logits, temperature, top_k, top_p, generator)
            yield byte
            if i + 1 < max_new_tokens:
                logits = self.step(byte)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One byte per row of logits (B, V): argmax at temperature 0, else sampled after top-k and top-p."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the most likely bytes until their mass reaches top_p (the most likely one always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_bytes(
    model: BDH, prompt: bytes, max_new_tokens: int, num_samples: int = 1, seed: int | None = None, **settings
) -> Iterator[torch.Tensor]:
    """`num_samples` continuations of `prompt`, yielded a (num_samples,) tensor of bytes at a time; `settings` are
    `Generator.generate`'s (temperature, top_k, top_p, chunk_size). The same seed gives the same bytes."""
    device = model.encoder.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    idx = torch.tensor(list(prompt), dtype=torch.long, device=device).expand(num_samples, -1)
    return Generator(model, num_samples).generate(idx, max_new_tokens, generator=generator, **settings)


def generate_text(
    model: BDH, prompt: bytes, max_new_tokens: int, num_samples: int = 1, seed: int | None = None, **settings
) -> list[bytes]:
    """The new bytes of `num_samples` continuations of `prompt` (the training callbacks' sample); `settings` as
    in `sample_bytes`."""
    new = list(sample_bytes(model, prompt, max_new_tokens, num_samples, seed, **settings))
    return [bytes(row) for row in torch.stack(new, dim=1).tolist()]
