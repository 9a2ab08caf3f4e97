"""One table of Lightning precisions (bytes, compute dtype, autocast), the default precision, and TF32.

The default is decided without creating a CUDA context in the launching process (devices.py reads NVML), so that
fork-based launchers (`ddp_fork`) can still start their ranks; TF32 is set by a callback in every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback

from .devices import gpu_capabilities
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


def default_precision(accelerator=None) -> str:
    """The BDH guide's choice: bf16-mixed where every GPU supports bfloat16 (compute capability 8.0 up,
    Ampere and later), else 16-mixed on CUDA, else 32-true (the CPU, MPS, or `accelerator` cpu).

    Creates no CUDA context: `torch.cuda.device_count` and `gpu_capabilities` read NVML."""
    name = accelerator if isinstance(accelerator, str) else "auto"  # an Accelerator object: let the machine say
    if name not in ("auto", "cuda", "gpu") or torch.cuda.device_count() == 0:
        return "32-true"
    capabilities = gpu_capabilities()
    return "bf16-mixed" if capabilities and min(capabilities)[0] >= 8 else "16-mixed"


def set_tf32(allow: bool) -> None:
    """TF32 in float32 matmuls (cuBLAS) and convolutions (cuDNN): about 1e-3 relative error, several times faster."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


class TF32(Callback):
    """Sets TF32 on or off in each rank as it starts (`setup` runs in every rank: `ddp_spawn` workers are fresh
    interpreters that a setting made in the launching process never reaches). CUDA only."""

    def __init__(self, allow: bool = True):
        self.allow = allow

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.strategy.root_device.type == "cuda":
            set_tf32(self.allow)
