"""BDH, the model: its settings (`BDHConfig`), its weights and the parallel forward pass (spec, `bdh.md`).

The layer's math is in `layer.py`; `kernels.py` chooses how each layer is computed. `BDH` embeds the
bytes, applies the one shared layer `n_layer` times and reads out next-byte logits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError
from .kernels import KERNELS, apply_layer
from .layer import layer_norm, reference_layer, rope_cos_sin, stream_attention

# The settings that define the function the model computes (and the shapes of its weights). The others
# (kernel, chunk_size) only choose how it is computed: they belong to the machine, not the checkpoint.
ARCHITECTURE = ("n_layer", "n_embd", "dropout", "n_head", "mlp_internal_dim_multiplier", "vocab_size")
# How a carried state is read (docs/carried-state.md): part of the function, so stored with the weights, but
# written only where they differ from the reference's plain sum (files of default models stay as they were).
CARRY_FORM = {"carry_half_lives": (), "carry_mean": False}
MAX_LAYERS = 10_000
STORED_SETTINGS = (*ARCHITECTURE, *CARRY_FORM)  # what a checkpoint or an exported file says about the model


@dataclass
class BDHConfig:
    """BDH model settings (the BDH configuration guide's names and defaults). Each is documented once, in
    `BDHLitModule` (module.py): its docstring is what `fit --help` and docs/settings.md show.
    Here carry_half_lives is a tuple, () for the reference's plain sum (None there).
    """

    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256
    kernel: Literal["auto", "reference", "chunked", "fused"] = "auto"
    chunk_size: int = 0
    carry_half_lives: tuple[float, ...] = ()
    carry_mean: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_layer > MAX_LAYERS:  # layers share their weights: no memory check stops a huge count, time would
            raise ConfigError(f"model.n_layer must be at most {MAX_LAYERS:,}, got {self.n_layer:,}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.vocab_size != 256:
            raise ConfigError(
                f"model.vocab_size must be 256 for byte-level data (one token per byte value), got {self.vocab_size!r}"
            )
        if self.neurons_per_head <= 0 or self.neurons_per_head % 2:
            raise ConfigError(
                "model.mlp_internal_dim_multiplier * model.n_embd // model.n_head (neurons per head, N) must be "
                f"a positive even number for the rotary pairs, got {self.neurons_per_head}"
            )
        if self.kernel not in KERNELS:
            raise ConfigError(f"model.kernel must be one of {', '.join(KERNELS)}; got {self.kernel!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(
                f"model.chunk_size must be a non-negative integer (0 = automatic), got {self.chunk_size!r}"
            )
        self.check_carry_form()

    def check_carry_form(self) -> None:
        lives = () if self.carry_half_lives is None else self.carry_half_lives  # None: a checkpoint's default
        if not isinstance(lives, (list, tuple)) or len(lives) not in (0, 1, self.n_head):
            raise ConfigError(
                f"model.carry_half_lives must be a list of 0, 1 or n_head={self.n_head} half-lives in bytes, got {lives!r}"
            )
        for life in lives:
            if isinstance(life, bool) or not isinstance(life, (int, float)) or not 0 < life < math.inf:
                raise ConfigError(f"model.carry_half_lives must be positive numbers of bytes, got {lives!r}")
        self.carry_half_lives = tuple(float(life) for life in lives)
        if not isinstance(self.carry_mean, bool):
            raise ConfigError(f"model.carry_mean must be true or false, got {self.carry_mean!r}")

    @classmethod
    def from_dict(cls, settings: dict) -> "BDHConfig":
        """The config from a mapping (hparams, a YAML section); keys that are not settings are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(settings).items() if k in names})

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, **runtime) -> "BDHConfig":
        """The architecture stored in a loaded Lightning checkpoint (its hyper_parameters), with run-time
        choices (kernel, chunk_size) from `runtime` rather than from the file."""
        hparams = checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            raise ConfigError("the checkpoint's hyper_parameters are not a mapping of settings")
        stored = {k: hparams[k] for k in STORED_SETTINGS if k in hparams and hparams[k] is not None}
        return cls.from_dict({**stored, **runtime})

    def architecture(self) -> dict:
        """The settings that define the function: ARCHITECTURE, and the carried-state form where it is not the
        reference's."""
        settings = {k: getattr(self, k) for k in ARCHITECTURE}
        for name, default in CARRY_FORM.items():
            if getattr(self, name) != default:
                settings[name] = list(self.carry_half_lives) if name == "carry_half_lives" else self.carry_mean
        return settings

    @property
    def carries_plain_sum(self) -> bool:
        """Whether a carried state is read as the reference's undecayed sum."""
        return not self.carry_half_lives and not self.carry_mean

    @property
    def neurons_per_head(self) -> int:
        """N in the spec."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        return 3 * self.n_head * self.neurons_per_head * self.n_embd + 2 * self.vocab_size * self.n_embd


class BDH(nn.Module):
    """The BDH language model: bytes (B, T) in, next-byte logits (B, T, 256) out."""

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        H, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))
        self.decoder = nn.Parameter(torch.empty(H * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def embed_bytes(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, 1, T, D) layer-0 input."""
        return layer_norm(self.embed(idx)).unsqueeze(1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        c = self.config
        cos, sin = rope_cos_sin(torch.arange(idx.shape[1], device=idx.device), c.neurons_per_head)
        x = self.embed_bytes(idx)
        for _ in range(c.n_layer):
            x = apply_layer(
                x,
                self.encoder,
                self.encoder_v,
                self.decoder,
                cos,
                sin,
                kernel=c.kernel,
                dropout=c.dropout,
                training=self.training,
                chunk_size=c.chunk_size,
            )
        return self.logits(x)

    def forward_stream(
        self,
        idx: torch.Tensor,
        start: int | torch.Tensor,
        states: list[torch.Tensor] | None = None,
        exact: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A window that continues a stream: bytes (B, T) at positions start.. (an int, or one per row (B,)),
        each layer's attention reading `states[l]` (B, H, N, D), everything the stream held before (None: a
        fresh stream). Returns the logits and the states after the window. Windows read one after another
        this way compute the same function as one forward pass over their concatenation.

        The layers run the configured kernel (reference or chunked; fused runs chunked here); `exact`
        (generation) reads in float32 through `reference_layer`.
        """
        c = self.config
        T = idx.shape[1]
        if isinstance(start, torch.Tensor):
            positions = start.to(idx.device).view(-1, 1) + torch.arange(T, device=idx.device)
            cos, sin = (t.unsqueeze(1) for t in rope_cos_sin(positions, c.neurons_per_head))  # B, 1, T, N
        else:
            cos, sin = rope_cos_sin(torch.arange(start, start + T, device=idx.device), c.neurons_per_head)
        x = self.embed_bytes(idx)
        written: list[torch.Tensor] = []
        form = None if c.carries_plain_sum or states is None else carry_form(c, T, start, idx.device)
        if form is not None and exact:
            raise ConfigError(
                "generation reads a stream byte by byte, but model.carry_half_lives / model.carry_mean are defined "
                "per training window; generate from this model without a carried state"
            )
        for layer in range(c.n_layer):
            state = None if states is None else states[layer]
            if form is not None:  # what the window reads: the state faded (and normalised), not the plain sum
                kept = state
                state = state * form[0].to(state.dtype)
            if exact:  # generation: the read in float32 whatever the autocast
                read = stream_attention(state, written, exact=True)
                x = reference_layer(x, self.encoder, self.encoder_v, self.decoder, cos, sin, read=read)
            else:
                x, after = apply_layer(x, self.encoder, self.encoder_v, self.decoder, cos, sin, kernel=c.kernel,
                                       dropout=c.dropout, training=self.training, chunk_size=c.chunk_size,
                                       stream=True, state=state)  # fmt: skip
                if form is not None and c.carry_mean:  # the weighted mean of the windows, this one included
                    after = (after + kept * form[1].to(after.dtype)) / form[2].to(after.dtype)
                written.append(after)
        return self.logits(x), written

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, D) last-layer output -> (B, T, 256) next-byte logits."""
        return x.squeeze(1) @ self.lm_head


def carry_form(c: BDHConfig, T: int, start: int | torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """How a window of T bytes at stream position `start` reads and updates a carried state, by window.

    Window j's contribution W_j is the sum of qᵀ x over its bytes; g = 2^(-T/h) per head (1 without a
    half-life), so window k reads W_j with weight w_kj = g^(k-j): halved every h bytes between the two windows'
    starts. Sum form: the state is S_k = sum over j < k of g^(k-1-j) W_j; the kernel is handed g S_k and returns
    g S_k + W_k = S_(k+1). Mean form (carry_mean): the state is that sum divided by its weight
    Z_k = sum over j < k of g^(k-1-j) (k = start // T windows before); handed unchanged, the kernel returns
    state + W_k, and (state + W_k + state (g Z_k - 1)) / (g Z_k + 1) is the next mean.
    Returns (scale to hand the kernel,) or (1, factor of the old state, divisor), broadcasting over (B, H, N, D).
    """
    g = torch.ones(c.n_head, dtype=torch.float64)
    if c.carry_half_lives:
        g = g * torch.tensor([2.0 ** (-T / h) for h in c.carry_half_lives], dtype=torch.float64)
    g = g.view(1, -1, 1, 1).to(device)
    if not c.carry_mean:
        return (g,)
    k = torch.as_tensor(start, device=device).to(torch.float64).view(-1, 1, 1, 1) // T
    weight = torch.where(g < 1, (1 - g**k) / (1 - g).clamp_min(1e-300), k)  # Z_k: the earlier windows' weight
    return torch.ones_like(g), g * weight - 1, g * weight + 1
