"""Checkpoints, in one place: reading them without running code, finding `last`, checking that their weights
fit the settings, writing them atomically, and loading the model they hold.

A checkpoint is Lightning's: `state_dict` holds the BDH weights under `model.`, `hyper_parameters` the
settings `BDHLitModule` was built with.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from .errors import CheckpointError
from .model import BDH, BDHConfig
from .weights import load_weights


def find_last(root: str | Path = "lightning_logs") -> Path:
    """`last.ckpt` of the most recent run under `root` (what `--ckpt_path last` means)."""
    candidates = sorted(Path(root).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt found; train first or give a checkpoint path"
        )
    return candidates[-1]


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a Lightning checkpoint, unpickled with weights_only=True: tensors and plain values only,
    so a file carrying a pickled function or object is refused instead of run. Tensors stay memory-mapped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        payload = re.search(r"GLOBAL (\S+)", str(error))
        if payload:
            raise CheckpointError(
                f"checkpoint {path} contains a pickled reference to {payload[1]}, which loading would run; refused "
                "(only tensors and plain values are loaded): use a checkpoint written by `fit`"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint; use another one") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception:  # torch raises RuntimeError, EOFError, ValueError... for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not a PyTorch checkpoint; use another one "
            "(e.g. an earlier .ckpt in the same checkpoints/ folder)"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict); use one written by `fit`")
    return checkpoint


def check_model_shape(checkpoint: dict, path: str | Path, model_args: dict) -> None:
    """Raise CheckpointError unless the checkpoint's weights have the shapes of the model `model_args` describe."""
    config = BDHConfig.from_dict(model_args)
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {f"model.{name}": tuple(t.shape) for name, t in BDH(config).state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items() if torch.is_tensor(t)}
    if not expected.keys() <= saved.keys():
        raise CheckpointError(f"checkpoint {path} holds no BDH weights ({sorted(saved)[:3]}...); use one written by `fit`")
    for name, shape in expected.items():
        if saved[name] != shape:
            trained = checkpoint.get("hyper_parameters", {})
            settings = ", ".join(f"{k}={trained[k]}" for k in ("n_embd", "n_head", "mlp_internal_dim_multiplier") if k in trained)
            config_yaml = Path(path).parent.parent / "config.yaml"
            hint = f" (e.g. --config {config_yaml})" if config_yaml.is_file() else ""
            raise CheckpointError(
                f"checkpoint {path} holds a model of another shape: {name} is {saved[name]} there but {shape} with "
                f"these settings; use the model settings it was trained with{f' ({settings})' if settings else ''}{hint}"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to `<name>.part` in its own folder, syncs it to disk, then renames it over `<name>`.

    A kill or power cut during the write leaves the previous file whole. (Lightning's writer buffers the whole
    checkpoint in memory, writes it to the system temp folder and moves it into place: a copy, not a rename,
    whenever that folder is on another file system, and never synced to disk.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", settings: dict | None = None) -> BDH:
    """The `BDH` held by a checkpoint of this project or an exported weights file, float32, in eval mode, on `device`.

    `path` is a .ckpt written by `fit`, a reference state_dict (.pt; its settings in the .json beside it), a
    safetensors file, or a Hugging Face folder (weights.py). The model settings come from the file; `settings`
    (n_layer, n_embd, n_head, mlp_internal_dim_multiplier, dropout) supply what it lacks and override what it
    says. Only plain data is unpickled: a file that would run code is refused; the weights are checked.
    """
    config, tensors, _ = load_weights(path, settings)  # kernel: the machine's choice (auto), not the file's
    model = BDH(config)
    model.load_state_dict(tensors)  # names and shapes already checked
    return model.float().eval().to(device)


def run_precision(ckpt_path: Path) -> str | None:
    """`trainer.precision` of the run that wrote ckpt_path, from the config.yaml LightningCLI saved beside it."""
    config = ckpt_path.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    import yaml  # a dependency of jsonargparse

    try:
        precision = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("precision")
    except (yaml.YAMLError, AttributeError, OSError):
        return None
    return None if precision is None else str(precision)
