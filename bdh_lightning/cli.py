"""LightningCLI wired for BDH: `fit`, `validate` and `test`, with every setting from typed signatures.

The other subcommands (`COMMANDS`) are typed functions run by `main.py`; this parser only lists them.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data import ByteDataModule
from .errors import CheckpointError, UsageError, one_line
from .checkpoints import AtomicCheckpointIO, check_model_shape, find_last, read_checkpoint
from .faults import StopOnNonFinite, StopOnSignal
from .precision import TF32, default_precision
from .throughput import ThroughputMonitor
from .monitor import SparsityMonitor, TextSample
from . import __version__
from .model import ARCHITECTURE
from .module import BDHLitModule

DESCRIPTION = (
    "Train BDH (Baby Dragon Hatchling), Pathway's byte-level language model, with PyTorch Lightning. "
    "Run a subcommand with --help to see its settings, e.g. `python -m bdh_lightning fit --help`."
)
# The subcommands beside LightningCLI's: name -> (the typed function behind it, its one-line help). Their
# parsers are built from the function's signature when the command runs (main.py); here only the help
# line is needed, so listing them costs no import.
COMMANDS = {
    "generate": ("bdh_lightning.commands:generate_command", "Sample text from a checkpoint (recurrent, O(1) per byte)."),
    "estimate": ("bdh_lightning.commands:estimate_command", "Predict the memory of a training step from a config."),
}
# On resume these come from the checkpoint: the function the model computes and its optimizer and schedule.
# Everything else (kernel, chunk_size, compile, precision, devices) is this machine's choice.
RESUMED_FROM_CHECKPOINT = (*ARCHITECTURE, "learning_rate", "weight_decay", "betas", "warmup_steps", "decay_steps",
                           "min_learning_rate")  # fmt: skip


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
                    # Bytes/s and MFU against the GPU's dense peak, every log_every_n_steps; validation
                    # charged a forward pass; the GPU synced only where it reports (throughput.py).
                    ThroughputMonitor(),
                    TF32(),  # --tf32, set in every rank (ddp_spawn workers do not inherit it)
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

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        listing = parser._subcommands_action
        for name, (_, help_line) in COMMANDS.items():
            listing.add_subcommand(name, LightningArgumentParser(description=help_line), help=help_line)

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--version", action="version", version=f"bdh-lightning {__version__}")

    def _parse_ckpt_path(self) -> None:
        """Take the architecture and optimizer settings from a --ckpt_path checkpoint (LightningCLI would
        take every model.* value, the kernel too, and read the file a second time)."""
        config = self.active_config()
        if not config.get("ckpt_path"):
            return
        hparams = self.checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            raise CheckpointError(f"checkpoint {config.ckpt_path} has hyper_parameters that are not a mapping; use one written by `fit`")
        for key in RESUMED_FROM_CHECKPOINT:
            if key in hparams:
                config.model[key] = list(hparams[key]) if key == "betas" else hparams[key]

    def active_config(self):
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--tf32", type=bool, default=True, help="On CUDA, allow TF32 in float32 matmuls and cuDNN (faster, ~1e-3 rel.)"
        )
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
        config = self.active_config()
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)  # no CUDA context here
        for callback in self.trainer_defaults["callbacks"]:
            if isinstance(callback, TF32):
                callback.allow = config.tf32
        if config.get("ckpt_path"):  # model.* now holds the checkpoint's settings: do its weights fit them?
            check_model_shape(self.checkpoint, config.ckpt_path, config.model)
            note_replaced_model_settings(self.model_settings_given, config.model.as_dict())
        check_cpu_devices(config.trainer)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Right after parsing, LightningCLI loads --ckpt_path to copy its model settings into the config;
        # resolve `last` first (so it gets them too) and refuse a bad file here, in one line.
        config = self.active_config()
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
        if key in RESUMED_FROM_CHECKPOINT and from_checkpoint.get(key) != value
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
