"""Lightning checkpoints (BDH weights under `model.` in `state_dict`, the module's settings in `hyper_parameters`):
read without running code, `last` found, checked against the settings before Lightning loads them, written atomically.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from .errors import CheckpointError
from .files import is_write_error, sync_folder, write_cause, write_failure
from .model import BDH, BDHConfig


def find_last(root: str | Path = "lightning_logs") -> Path:
    """The newest `last.ckpt` of the runs under `root` (what `--ckpt_path last` means): `root` is the folder the
    command's runs go to (a logger's save_dir/name, or trainer.default_root_dir/lightning_logs), each run a
    version_*/ in it; `root/checkpoints/last.ckpt` is the run of a command without a logger."""
    root = Path(root)
    candidates = [*root.glob("version_*/checkpoints/last.ckpt"), *root.glob("checkpoints/last.ckpt")]
    found = []
    for path in candidates:
        try:
            found.append((path.stat().st_mtime_ns, path))
        except OSError:  # removed since the glob
            continue
    if not found:
        raise CheckpointError(
            f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt found; train first or give a checkpoint path"
        )
    return max(found)[1]


def load_plain(path: str | Path, checkpoint: bool = False) -> object:
    """torch.load with weights_only=True: tensors and plain values only, so a file carrying a pickled object or
    function is refused instead of run; memory-mapped where torch.save's zip format allows. Every failure is one
    CheckpointError line, worded for a Lightning `checkpoint` (read_checkpoint) or for weights in any format."""
    subject = f"checkpoint {path}" if checkpoint else str(path)
    writer = "a checkpoint written by `fit`" if checkpoint else "a file written by `fit` or `export`"
    foreign = "not a PyTorch checkpoint" if checkpoint else "neither a PyTorch nor a safetensors file"
    hint = " (e.g. an earlier .ckpt in the same checkpoints/ folder)" if checkpoint else ""
    try:
        with open(path, "rb") as file:
            zipped = file.read(4) == b"PK\x03\x04"  # torch.save's format; only it can be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        payload = re.search(r"GLOBAL (\S+)", str(error))
        if payload:
            raise CheckpointError(
                f"{subject} contains a pickled reference to {payload[1]}, which loading would run; refused (only "
                f"tensors and plain values are loaded): use {writer}"
            ) from None
        noun = "checkpoint" if checkpoint else "file"
        raise CheckpointError(f"{subject} is corrupt or not a PyTorch {noun}; use another one{hint}") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {subject}: {error.strerror or error}") from None
    except Exception:  # noqa: BLE001 (torch raises RuntimeError, EOFError, ValueError... for truncated or foreign files)
        raise CheckpointError(f"{subject} is truncated, corrupt or {foreign}; use another one{hint}") from None


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a Lightning checkpoint, read by `load_plain` (nothing pickled is run; tensors memory-mapped)."""
    checkpoint = load_plain(path, checkpoint=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning checkpoint (no state_dict); use one written by `fit`"
        )
    return checkpoint


def weight_shapes(config: BDHConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {name: tuple(t.shape) for name, t in BDH(config).state_dict().items()}


def check_model_shape(checkpoint: dict, path: str | Path, model_args: dict) -> None:
    """Raise CheckpointError unless the checkpoint's weights have the shapes of the model `model_args` describe."""
    expected = {f"model.{name}": shape for name, shape in weight_shapes(BDHConfig.from_dict(model_args)).items()}
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items() if torch.is_tensor(t)}
    if not expected.keys() <= saved.keys():
        raise CheckpointError(
            f"checkpoint {path} holds no BDH weights ({sorted(saved)[:3]}...); use one written by `fit`"
        )
    extra = sorted(checkpoint["state_dict"].keys() - expected.keys())
    if extra:  # Lightning loads strictly: it would stop with a traceback
        raise CheckpointError(
            f"checkpoint {path} holds weights BDH does not have ({', '.join(map(str, extra[:3]))}); it is of another "
            "model or was edited: use one written by `fit`"
        )
    for name, shape in expected.items():
        if saved[name] != shape:
            trained = checkpoint.get("hyper_parameters", {})
            settings = ", ".join(
                f"{k}={trained[k]}" for k in ("n_embd", "n_head", "mlp_internal_dim_multiplier") if k in trained
            )
            config_yaml = Path(path).parent.parent / "config.yaml"
            hint = f" (e.g. --config {config_yaml})" if config_yaml.is_file() else ""
            raise CheckpointError(
                f"checkpoint {path} holds a model of another shape: {name} is {saved[name]} there but {shape} with "
                f"these settings; use the model settings it was trained with{f' ({settings})' if settings else ''}"
                f"{hint}"
            )


def check_loadable(checkpoint: dict, path: str | Path, resume: bool) -> None:
    """Refuse, in one line, a checkpoint Lightning would stop on with a traceback: no Lightning version, settings
    that are not a mapping, non-finite weights, and for a resume (`resume`) no optimizer state. The weights'
    names and shapes are `check_model_shape`'s."""
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} has no pytorch-lightning_version: it was not written by `fit`; use one that was "
            f"(to start a new run from its weights: --model.init_from {path})"
        )
    if not isinstance(checkpoint.get("hyper_parameters", {}), dict):
        raise CheckpointError(
            f"checkpoint {path} has hyper_parameters that are not a mapping; use one written by `fit`"
        )
    if resume:
        states = checkpoint.get("optimizer_states")
        if not isinstance(states, list) or not states or not all(isinstance(state, dict) for state in states):
            raise CheckpointError(
                f"checkpoint {path} holds no optimizer state, so training cannot continue from it; start a new run "
                f"from its weights with --model.init_from {path} (fresh optimizer, step 0)"
            )
        for key, kind in (("global_step", int), ("epoch", int), ("loops", dict), ("lr_schedulers", list)):
            if key in checkpoint and not isinstance(checkpoint[key], kind):
                raise CheckpointError(
                    f"checkpoint {path} has a {key} that is not a {kind.__name__}; use one written by `fit`"
                )
    for name, tensor in checkpoint["state_dict"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor.detach().float())  # NaN propagates into both
            if not (torch.isfinite(low) and torch.isfinite(high)):
                raise CheckpointError(
                    f"checkpoint {path} holds non-finite weights (NaN or infinity in {name}); use an earlier checkpoint"
                )


def last_good_checkpoint(trainer) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint this run wrote that is still on disk, or None: written by this process,
    never one of another run that the same folder or a resumed checkpoint's state would name."""
    io = getattr(trainer.strategy, "checkpoint_io", None)
    return io.last_good() if isinstance(io, AtomicCheckpointIO) else None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (every setting the same) with three changes:

    - one `last.ckpt` per run: Lightning writes `last-v1.ckpt` beside a `last.ckpt` it did not write itself (a
      save at the end of training or at a signal); the run folder is this run's alone, so it is replaced;
    - `every_n_train_steps: k` saves `last.ckpt` every k steps from the start: Lightning waits for the
      monitored metric (`val/loss`, the first validation), so a crash before it lost everything;
    - training that ends at a step no checkpoint holds (max_steps between two saves) saves `last.ckpt` there.
    """

    @property
    def state_key(self) -> str:  # the key Lightning's ModelCheckpoint uses: checkpoints resume either way
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        counter, self._enable_version_counter = self._enable_version_counter, False
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = counter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is not None and self.monitor not in candidates:
                self._save_last_checkpoint(trainer, candidates)  # the best by the monitor waits for a validation
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to `<name>.part` beside it, syncs it to disk, then renames it over `<name>`: a kill or power
    cut during the write leaves the previous file whole (Lightning's writer goes through the system temp folder, a
    copy whenever that is another file system, and never syncs)."""

    def __init__(self):
        super().__init__()
        self.written: list[tuple[str, int]] = []  # (path, step) of each checkpoint this run wrote, oldest first

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
            sync_folder(path.parent)
        except BaseException as error:
            cause = write_cause(error, path.parent) if is_write_error(error) else None
            with contextlib.suppress(OSError):  # (no folder to hold it: nothing to remove)
                partial.unlink(missing_ok=True)  # a disk-full write must not keep the disk full
            if cause is not None:
                raise write_failure(f"checkpoint {path}", cause, self.last_good_words()) from None
            raise
        step = checkpoint.get("global_step")
        self.written = [entry for entry in self.written if entry[0] != str(path)] + [(str(path), step)]

    def last_good(self) -> tuple[str, int] | None:
        return next(((path, step) for path, step in reversed(self.written) if os.path.isfile(path)), None)

    def last_good_words(self) -> str:
        good = self.last_good()
        if good is None:
            return "this run saved no checkpoint before it; free some space and start again"
        return (
            f"the last good checkpoint of this run is {good[0]} (step {good[1]}); free some space and resume from it "
            "with --ckpt_path"
        )


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
