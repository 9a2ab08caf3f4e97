"""The `export` command: a checkpoint's weights in the reference's, safetensors or Hugging Face format (weights.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .checkpoints import find_last
from .console import shown
from .weights import export_paths, load_weights, parameter_count, write_weights


def export_command(
    ckpt_path: str,
    format: Literal["reference", "safetensors", "hf"],
    output: str,
    overwrite: bool = False,
    logs_dir: str = "lightning_logs",
) -> int:
    """Write a checkpoint's model weights for other tools: the reference implementation (pathwaycom/bdh),
    safetensors (hubs, other frameworks) or the Hugging Face port (jploski/bdh-transformers). The weights are
    copied bit for bit (same dtype); nothing pickled is read or written except the reference's state_dict.

    Args:
        ckpt_path: Checkpoint (.ckpt) written by fit, `last` for the newest run's last.ckpt, or any file or
            folder export wrote.
        format: reference: a state_dict (torch.save) that the reference's BDH(BDHConfig(**settings)) loads with
            load_state_dict(strict=True), and its settings in <output without suffix>.json. safetensors: the
            weights under BDH's names, with the model settings, step and version in the metadata. hf: a folder
            with config.json and model.safetensors for bdh-transformers' BDHForCausalLM.
        output: File (reference, safetensors) or folder (hf) to write.
        overwrite: Replace an existing output. Without it an existing output is refused.
        logs_dir: Where `--ckpt_path last` looks for version_*/checkpoints/last.ckpt.
    """
    export_paths(format, output, overwrite)  # refuse a bad --output before reading anything
    source = find_last(logs_dir) if ckpt_path == "last" else Path(ckpt_path)
    config, tensors, weights = load_weights(source)
    written = write_weights(tensors, config, format, output, step=weights.step, overwrite=overwrite)
    step = "" if weights.step is None else f", step {weights.step}"
    dtype = str(tensors["encoder"].dtype).removeprefix("torch.")
    print(  # the names as typed, escaped where a terminal would act on them or cannot encode them
        shown(
            f"wrote {' and '.join(map(str, written))} ({format}: {parameter_count(tensors):,} parameters, "
            f"{dtype}{step}) from {source}"
        )
    )
    return 0
