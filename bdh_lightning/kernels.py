"""BDH layer implementations behind one switch, `BDHConfig.kernel`.

`reference` is `model.reference_layer` under plain autograd. The others must match it (tests).
"""

from __future__ import annotations

import torch

from .model import reference_layer


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation `auto` stands for on this device."""
    if kernel == "auto":
        return "reference"
    if kernel != "reference":
        raise NotImplementedError(f"model.kernel={kernel} is not implemented yet; use reference")
    return kernel


def bdh_layer(x: torch.Tensor, model, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One layer of `model` (a `BDH`) on x: (B, 1, T, D), with the configured implementation."""
    cfg = model.config
    resolve_kernel(cfg.kernel, x.device)
    return reference_layer(x, model.encoder, model.encoder_v, model.decoder, cos, sin, cfg.dropout, model.training)
