"""One table of Lightning precisions: what each means for the weights, the activations and autocast.

Used by the CLI (the default), `generate` (its autocast), `estimate` (bytes) and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str  # Lightning's string
    param_bytes: int  # bytes per weight (and per gradient, and per AdamW moment)
    activation_bytes: int  # bytes per activation element in the layers' products
    compute_dtype: torch.dtype  # the dtype the matmuls run in
    autocast: bool  # mixed: float32 weights, products in compute_dtype under torch.autocast


PRECISIONS = {
    p.name: p
    for p in (
        Precision("64-true", 8, 8, torch.float64, False),
        Precision("32-true", 4, 4, torch.float32, False),
        Precision("bf16-mixed", 4, 2, torch.bfloat16, True),
        Precision("16-mixed", 4, 2, torch.float16, True),
        Precision("bf16-true", 2, 2, torch.bfloat16, False),
        Precision("16-true", 2, 2, torch.float16, False),
    )
}
# Lightning's short names.
ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "transformer-engine": "bf16-mixed"}


def precision(name) -> Precision:
    """The table's row for a Lightning precision string (or its short form); ConfigError if unknown."""
    key = ALIASES.get(str(name), str(name))
    if key not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def compute_dtype(name: str | None) -> torch.dtype:
    """The dtype a precision computes in (float32 when unknown or not given)."""
    try:
        return precision(name or "32").compute_dtype
    except ConfigError:
        return torch.float32


def default_precision() -> str:
    """The BDH guide's choice: bf16-mixed where the GPU supports it, else 16-mixed on CUDA, else 32-true."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"
