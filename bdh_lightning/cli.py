"""The command line: LightningCLI wired for BDH, plus the `generate` and `estimate` commands.

`python -m bdh_lightning fit --config configs/tiny.yaml` trains; `validate` and `test` evaluate;
`generate` samples from a checkpoint (generate.py); `estimate` predicts memory (estimate.py).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI

from .data import ByteDataModule
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, TrainingInterrupted, UsageError
from .checkpoints import AtomicCheckpointIO, check_model_shape, find_last, read_checkpoint
from .faults import StopOnNonFinite, StopOnSignal
from .precision import default_precision
from .monitor import SparsityMonitor, TextSample
from .module import BDHLitModule

DESCRIPTION = (
    "Train BDH (Baby Dragon Hatchling) with PyTorch Lightning. Subcommands: fit, validate, test (LightningCLI), "
    "generate (sample from a checkpoint; see `generate --help`), estimate (predict memory; see `estimate --help`)."
)


def bytes_per_batch(batch) -> int:
    return batch[0].numel()


def windows_per_batch(batch) -> int:
    return batch[0].shape[0]


class BDHCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(
            BDHLitModule,
            ByteDataModule,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "max_steps": 3000,
                "val_check_interval": 100,
                "check_val_every_n_epoch": None,
                "log_every_n_steps": 100,
                "callbacks": [
                    LearningRateMonitor(logging_interval="step"),
                    # Rates over the last 20 batches: short runs see them too (Lightning's default window is 100).
                    ThroughputMonitor(batch_size_fn=windows_per_batch, length_fn=bytes_per_batch, window_size=20),
                    StopOnSignal(),
                    StopOnNonFinite(),
                ],
            },
            # Parse errors are raised (main prints them as one line) instead of printing the whole usage.
            parser_kwargs={"prog": "python -m bdh_lightning", "description": DESCRIPTION, "exit_on_error": False},
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands.pop("predict")  # BDH has nothing to predict from a dataloader; use `generate`
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--tf32", type=bool, default=True, help="On CUDA, allow TF32 in float32 matmuls and cuDNN (faster, ~1e-3 rel.)"
        )
        parser.link_arguments("data.block_size", "model.block_size")
        parser.add_lightning_class_args(TextSample, "sample")
        parser.add_lightning_class_args(SparsityMonitor, "sparsity")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision = default_precision()
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = config.tf32
            torch.backends.cudnn.allow_tf32 = config.tf32
        if config.get("ckpt_path"):  # model.* now holds the checkpoint's settings: do its weights fit them?
            check_model_shape(self.checkpoint, config.ckpt_path, config.model)
            note_replaced_model_settings(self.model_settings_given, config.model.as_dict())
        check_cpu_devices(config.trainer)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Right after parsing, LightningCLI loads --ckpt_path to copy its model settings into the config;
        # resolve `last` first (so it gets them too) and refuse a bad file here, in one line.
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(find_last())
        elif config.get("ckpt_path") and not Path(config.ckpt_path).is_file():
            raise UsageError(f"--ckpt_path {config.ckpt_path}: no such checkpoint file")
        if config.get("ckpt_path"):
            self.checkpoint = read_checkpoint(config.ckpt_path)  # memory-mapped: cheap to keep until the shape check
            self.model_settings_given = config.model.as_dict()

    def instantiate_trainer(self, **kwargs):
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as error:  # Lightning's word on impossible trainer.* settings
            raise UsageError(one_line(error)) from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class SettingsOnly(BDHCLI):
    """Parses and resolves a configuration like `fit` would, building nothing (for `estimate`)."""

    def before_instantiate_classes(self) -> None:
        pass  # keep trainer.precision unset when the config leaves it to the machine

    def instantiate_classes(self) -> None:
        pass

    def _add_configure_optimizers_method_to_model(self, subcommand) -> None:
        pass


def parse_settings(args: list[str]):
    """The settings (model.*, data.*, trainer.*) that `fit ARGS` would use, without instantiating anything."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI's note that args differ from sys.argv
        return SettingsOnly(args=[*args, "--seed_everything", "false"], run=False).config


def note_replaced_model_settings(given: dict, from_checkpoint: dict) -> None:
    """LightningCLI takes model.* from a --ckpt_path checkpoint: say which given values that replaced."""
    replaced = [
        f"{key}={from_checkpoint[key]!r} (not {value!r})"
        for key, value in given.items()
        if key != "block_size" and from_checkpoint.get(key) != value  # block_size follows data.block_size
    ]
    if replaced:
        print(f"note: model settings come from the checkpoint: {', '.join(replaced)}", file=sys.stderr)


def check_cpu_devices(trainer_config) -> None:
    """Lightning runs any number of CPU "devices" (one process each); more than the cores here is a mistake."""
    on_cpu = trainer_config.accelerator == "cpu" or (trainer_config.accelerator == "auto" and not torch.cuda.is_available())
    devices = trainer_config.devices
    cores = len(os.sched_getaffinity(0))
    if on_cpu and str(devices).isdigit() and int(devices) > cores:
        raise UsageError(f"trainer.devices {devices} asks for {devices} CPU processes but this machine has {cores} cores; use at most {cores}")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def report(line: str) -> None:
    """One line to stderr in a single write, so the lines of several ranks never interleave."""
    sys.stderr.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # LightningCLI warns when given args that duplicate sys.argv
    argv = sys.argv[1:] if from_shell else list(argv)
    try:
        if argv and argv[0] == "generate":
            from .generate import main as generate_main

            return generate_main(argv[1:])
        if argv and argv[0] == "estimate":
            from .estimate import main as estimate_main

            return estimate_main(argv[1:])
        BDHCLI(args=None if from_shell else argv)
    except ArgumentError as err:
        report(f"error: {one_line(err)} (see --help)")
        return 2
    except (UsageError, ConfigError, DataError, CheckpointError, MisconfigurationException) as err:
        report(f"error: {one_line(err)}")
        return 2
    except NonFiniteError as err:
        report(f"error: {err}")
        return 1
    except torch.OutOfMemoryError:
        report("error: out of memory; lower data.batch_size or data.block_size, use model.kernel chunked, "
               "or check a setting first with `estimate`")  # fmt: skip
        return 1
    except TrainingInterrupted as stop:
        report(str(stop))
        return 128 + stop.signum  # the shell's convention for "ended by this signal"
    return 0
