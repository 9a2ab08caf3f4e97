"""LightningCLI wired for BDH: `fit`, `validate` and `test`, with every setting from typed signatures.

The other subcommands (`COMMANDS`) are typed functions run by `main.py`; this parser only lists them.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import ActionYesNo, get_loader, set_loader
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from . import __version__
from .checkpoints import (
    AtomicCheckpointIO,
    RunCheckpoint,
    check_loadable,
    check_model_shape,
    find_last,
    read_checkpoint,
)
from .console import RunReport, RunSummary, format_bytes, memory_line, say
from .data import ByteDataModule
from .devices import cuda_present, device_memory
from .errors import (
    BDHError,
    CheckpointError,
    ConfigError,
    NothingToDo,
    UsageError,
    finite_float,
    is_int,
    one_line,
    positive_int,
    seed_setting,
)
from .estimate import choose_kernel, estimate_memory, largest_batch
from .faults import StopEveryRank, StopOnNonFinite, StopOnSignal
from .model import STORED_SETTINGS, BDHConfig
from .module import BDHLitModule
from .monitor import SparsityMonitor, TextSample
from .precision import TF32, default_precision
from .throughput import ThroughputMonitor
from .weights import read_weights

DESCRIPTION = (
    "Train BDH (Baby Dragon Hatchling), Pathway's byte-level language model, with PyTorch Lightning. "
    "Run a subcommand with --help to see its settings, e.g. `python -m bdh_lightning fit --help`."
)
TRAINER_COMMANDS = {
    "fit": "Train BDH (resume with --ckpt_path last).",
    "validate": "Score a checkpoint on the validation windows.",
    "test": "Score a checkpoint on the held-out test split.",
}
# The subcommands beside LightningCLI's: name -> (the typed function behind it, its one-line help). Their
# parsers are built from the function's signature when the command runs (main.py); here only the help
# line is needed, so listing them costs no import.
COMMANDS = {
    "generate": (
        "bdh_lightning.commands:generate_command",
        "Sample text from a checkpoint (recurrent, O(1) per byte).",
    ),
    "estimate": ("bdh_lightning.commands:estimate_command", "Predict the memory of a training step from a config."),
    "inspect": (
        "bdh_lightning.insight.command:inspect_command",
        "Report what a checkpoint learned: neuron graph, sparsity, selective neurons.",
    ),
    "export": (
        "bdh_lightning.export:export_command",
        "Write a checkpoint's weights for the reference, safetensors or Hugging Face.",
    ),
    "prepare": (
        "bdh_lightning.data.prepare:prepare_command",
        "Pack a corpus into LitData's streaming format, split by document.",
    ),
}
# On resume these come from the checkpoint: the function the model computes and its optimizer and schedule.
# Everything else (kernel, chunk_size, compile, precision, devices) is this machine's choice.
RESUMED_FROM_CHECKPOINT = (
    *STORED_SETTINGS,
    "learning_rate",
    "weight_decay",
    "betas",
    "warmup_steps",
    "decay_steps",
    "min_learning_rate",
)


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
                "enable_model_summary": False,  # the header gives the parameters; Lightning's table adds a FLOPs column of zeros
                "callbacks": [
                    LearningRateMonitor(logging_interval="step"),
                    # Bytes/s and MFU against the GPU's dense peak, every log_every_n_steps; validation
                    # charged a forward pass; the GPU synced only where it reports (throughput.py).
                    ThroughputMonitor(),
                    TF32(),  # --tf32, set in every rank (ddp_spawn workers do not inherit it)
                    StopOnSignal(),
                    StopOnNonFinite(),
                    StopEveryRank(),  # an error on one rank (out of memory) stops all within seconds
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
        for choice in listing._choices_actions:  # Lightning's lines are the Trainer's docstrings, one cut mid-sentence
            choice.help = TRAINER_COMMANDS.get(choice.dest, choice.help)
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
            raise CheckpointError(
                f"checkpoint {config.ckpt_path} has hyper_parameters that are not a mapping; use one written by `fit`"
            )
        for key in RESUMED_FROM_CHECKPOINT:
            if key in hparams:
                config.model[key] = list(hparams[key]) if key == "betas" else hparams[key]

    def active_config(self):
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def add_arguments_to_parser(self, parser) -> None:
        from .insight.callback import InsightMonitor  # an optional feature: imported when the parser is built

        parser.add_argument(
            "--force",
            action=ActionYesNo,
            default=False,
            help="Start even where the predicted memory exceeds the device's (it is a prediction).",
        )
        parser.add_argument(
            "--quiet",
            action=ActionYesNo,
            default=True,
            help="Hide the framework's own notices and warnings; --no_quiet shows them.",
        )
        parser.add_argument(
            "--tf32",
            type=bool,
            default=True,
            help="On CUDA, allow TF32 in float32 matmuls and cuDNN (faster, ~1e-3 rel.)",
        )
        parser.add_lightning_class_args(TextSample, "sample")
        parser.add_lightning_class_args(SparsityMonitor, "sparsity")
        parser.add_lightning_class_args(InsightMonitor, "inspect")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")  # ModelCheckpoint, one last.ckpt per run
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
        if self.subcommand in ("validate", "test"):
            self.save_config_callback = None  # they report, and write nothing: no run folder, no config.yaml
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)  # no CUDA context here
        for callback in self.trainer_defaults["callbacks"]:
            if isinstance(callback, TF32):
                callback.allow = config.tf32
        if config.get("ckpt_path"):  # model.* now holds the checkpoint's settings: do its weights fit them?
            check_model_shape(self.checkpoint, config.ckpt_path, config.model)
            note_replaced_model_settings(self.model_settings_given, config.model.as_dict())
        check_trainer_settings(config.trainer)
        check_workers(config.data)
        if config.model.get("carry_state") and config.data.get("sampling") != "streams":
            raise ConfigError(
                "model.carry_state true needs data.sampling streams (consecutive windows to carry the state across)"
            )
        if self.subcommand == "fit":
            if config.get("ckpt_path"):
                nothing_left_to_do(self.checkpoint, config)
            self.header_lines = plan_memory(config)

    def parse_arguments(self, parser, args) -> None:
        check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        # Right after parsing, LightningCLI loads --ckpt_path to copy its model settings into the config;
        # resolve `last` first (so it gets them too) and refuse a bad file here, in one line.
        config = self.active_config()
        last = config.get("ckpt_path") == "last"
        if last:
            config.ckpt_path = str(resolve_last(config))
        elif config.get("ckpt_path") and exported_weights(config.ckpt_path):
            if self.config.get("subcommand") == "fit":
                raise UsageError(
                    f"--ckpt_path {config.ckpt_path} holds exported weights, not a training checkpoint to "
                    f"resume; start a run from them with --model.init_from {config.ckpt_path}"
                )
            config.model.init_from, config.ckpt_path = config.ckpt_path, None  # validate/test score these weights
        elif config.get("ckpt_path") and not Path(config.ckpt_path).is_file():
            raise UsageError(f"--ckpt_path {config.ckpt_path}: no such checkpoint file")
        if config.get("ckpt_path"):
            self.checkpoint = read_checkpoint(config.ckpt_path)  # memory-mapped: cheap to keep until the shape check
            check_loadable(self.checkpoint, config.ckpt_path, resume=self.config.get("subcommand") == "fit")
            self.model_settings_given = config.model.as_dict()
            config.model.init_from = None  # the checkpoint's weights replace them: do not read that file again
            if last and rank_zero_only.rank == 0:
                say(f"--ckpt_path last: {config.ckpt_path} (step {self.checkpoint.get('global_step')})")

    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if seed is not True and seed is not False:  # numpy, seeded with it too, takes 32 bits
            seed_setting("seed_everything", seed, UsageError, high=2**32 - 1)
        super()._set_seed()

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        # Our header and closing block always; with them our progress, unless the bar is turned off.
        report = RunSummary if trainer_config.get("enable_progress_bar") is False else RunReport
        given = trainer_config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]  # --trainer.callbacks may name a single one
        kwargs["callbacks"] = [*given, report(getattr(self, "header_lines", []))]
        if self.subcommand in ("validate", "test"):
            kwargs["logger"] = False
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError, MisconfigurationException) as error:  # Lightning's word on impossible trainer.*
            raise UsageError(one_line(error)) from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.subcommand == "fit" and rank_zero_only.rank == 0:
            self.claimed = [claim_run_folder(logger) for logger in trainer.loggers]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger._default_hp_metric = False  # no `hp_metric = -1` scalar in TensorBoard
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            for folder in getattr(self, "claimed", []):  # a run that failed before writing anything leaves nothing
                if folder is not None and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise


def run_root(config) -> Path:
    """The folder this command's runs go to, each a version_N/ in it: the first logger's save_dir/name, else
    trainer.default_root_dir/lightning_logs (Lightning's default logger), or default_root_dir without a logger."""
    base = Path(config.trainer.get("default_root_dir") or ".")
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is None or logger is True:
        return base / "lightning_logs"
    if logger is False:
        return base
    settings = logger.get("init_args") or {}
    save_dir = settings.get("save_dir") or settings.get("root_dir") or base
    return Path(save_dir) / str(settings.get("name", "lightning_logs") or "")


def resolve_last(config) -> Path:
    """`--ckpt_path last`: checkpoint.dirpath's last.ckpt when set, else the newest last.ckpt under run_root. The
    processes Lightning starts for DDP take the file their parent chose (a run may have saved a newer one since)."""
    if os.environ.get("BDH_CKPT_PATH_LAST_PARENT") == str(os.getppid()) and os.environ.get("BDH_CKPT_PATH_LAST"):
        return Path(os.environ["BDH_CKPT_PATH_LAST"])
    dirpath = config.get("checkpoint") and config.checkpoint.get("dirpath")
    if dirpath:
        path = Path(dirpath) / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(
                f"--ckpt_path last: no last.ckpt in checkpoint.dirpath {dirpath}; train first or give a checkpoint path"
            )
    else:
        path = find_last(run_root(config))
    os.environ["BDH_CKPT_PATH_LAST"], os.environ["BDH_CKPT_PATH_LAST_PARENT"] = str(path), str(os.getpid())
    return path


def claim_run_folder(logger) -> Path | None:
    """Create this run's version_N folder with mkdir, which fails for all but one of several runs starting at once
    (Lightning only picks the next free number, so simultaneous runs shared one folder); None if not ours to pick."""
    if getattr(logger, "_version", 0) is not None or not hasattr(logger, "root_dir") or "://" in str(logger.root_dir):
        return None
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        folder = root / f"version_{version}"
        try:
            folder.mkdir()
        except FileExistsError:
            version += 1
            continue
        logger._version = version
        return folder


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


def exported_weights(path: str) -> bool:
    """Whether --ckpt_path names weights written by `export` (or a reference state_dict), not a fit checkpoint."""
    where = Path(path)
    if not (where.is_dir() or where.suffix in (".safetensors", ".pt", ".pth", ".bin")):
        return False
    try:
        return read_weights(where).kind != "lightning"
    except BDHError:
        return False  # let the checkpoint reader say what is wrong with it


def comparable(value):
    return list(value) if isinstance(value, tuple) else value  # YAML gives lists where Python gave tuples


def note_replaced_model_settings(given: dict, from_checkpoint: dict) -> None:
    """LightningCLI takes model.* from a --ckpt_path checkpoint: say which given values that replaced."""
    replaced = [
        f"{key}={from_checkpoint[key]!r} (not {value!r})"
        for key, value in given.items()
        if key in RESUMED_FROM_CHECKPOINT and comparable(from_checkpoint.get(key)) != comparable(value)
    ]
    if replaced:
        say(f"note: model settings come from the checkpoint: {', '.join(replaced)}")


def nothing_left_to_do(checkpoint: dict, config) -> None:
    """A resume whose checkpoint is already at trainer.max_steps: say so, and write nothing."""
    step, max_steps = checkpoint.get("global_step"), config.trainer.max_steps
    if isinstance(step, int) and max_steps is not None and 0 <= max_steps <= step:
        raise NothingToDo(
            f"{config.ckpt_path} is at step {step} and trainer.max_steps is {max_steps}: nothing to train; "
            f"raise --trainer.max_steps (e.g. {step + max(step, 1)}) to train longer"
        )


def run_device(trainer_config) -> torch.device:
    accelerator = str(trainer_config.accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_present()):  # no cuInit: ddp_fork can fork
        return torch.device("cuda")
    return torch.device("cpu")


def world_size(trainer_config) -> int:
    """Devices x nodes, where the settings say it plainly (DDP's buckets and buffers depend on it)."""
    devices = trainer_config.devices
    count = int(devices) if str(devices).isdigit() else len(devices) if isinstance(devices, (list, tuple)) else 1
    return max(1, count) * max(1, int(trainer_config.num_nodes or 1))


def plan_memory(config) -> list[str]:
    """The predicted peak of this run against the device's memory: a header line, or ConfigError (before anything
    is written) when it cannot fit, with the batch size and accumulation that would. `--force` starts it anyway."""
    device = run_device(config.trainer)
    if device.type == "cuda" and not cuda_present():
        return []  # asked for a GPU this machine lacks: Lightning's trainer says so in one line
    model, data, ranks = config.model.as_dict(), config.data, world_size(config.trainer)
    precision = str(config.trainer.precision)
    try:
        report = estimate_memory(model, data.batch_size, data.block_size, precision, device.type, ranks)
        c = BDHConfig.from_dict(model)
    except (BDHError, TypeError, ValueError):
        return []  # the settings themselves are wrong: the module or data module says so in one line
    have, what = device_memory(device)
    # The module resolves `auto` the same way when training starts (BDHLitModule.choose_kernel).
    best, why = choose_kernel(
        c,
        data.batch_size,
        data.block_size,
        precision,
        device,
        have if device.type == "cuda" else None,
        carry_state=bool(model.get("carry_state")),
    )
    best = best if best in report.kernels else "chunked"  # fused keeps no more than chunked's bytes
    if report.state_bytes:  # each layer's state per batch row (model.carry_state), kept between steps
        why += f"; the carried state, {format_bytes(report.state_bytes)} (twice that during a step), is included below"
    peak = report.kernels[best].device_bytes  # on CUDA with the context, workspaces and allocator slack
    if have and peak > have and not config.get("force"):
        fits = largest_batch(model, data.block_size, precision, device.type, best, have, ranks)
        accumulate = config.trainer.accumulate_grad_batches or 1
        if fits:
            same = -(-data.batch_size * accumulate // fits)
            advice = (
                f"use --data.batch_size {fits} --trainer.accumulate_grad_batches {same} (about the same global "
                f"batch), or a smaller data.block_size"
            )
        else:
            advice = "no batch size fits: use a smaller data.block_size or model, or model.kernel chunked"
        raise ConfigError(
            f"this run needs about {format_bytes(peak)} (predicted, kernel {best}, batch {data.batch_size}) but {what} "
            f"{format_bytes(have)}; {advice}; --force starts it anyway"
        )
    return [f"kernel     {why.removeprefix('kernel ')}", memory_line(peak, device)]


def check_trainer_settings(trainer_config) -> None:
    """trainer.* values Lightning accepts but then divides by, or rejects with a traceback, refused in one line."""
    accumulate = positive_int("trainer.accumulate_grad_batches", trainer_config.accumulate_grad_batches, UsageError)
    if accumulate > 2**31 - 1:  # the loss is divided by it as a tensor
        raise UsageError(f"trainer.accumulate_grad_batches must be at most 2**31 - 1, got {accumulate}")
    if trainer_config.check_val_every_n_epoch is not None:
        positive_int("trainer.check_val_every_n_epoch", trainer_config.check_val_every_n_epoch, UsageError)
    for name, value in trainer_config.items():  # counts and fractions Lightning indexes with or compares
        if is_int(value) and abs(value) > sys.maxsize or isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"trainer.{name} must be a finite number below 2**63, got {value!r}")
    interval = trainer_config.val_check_interval
    if interval is not None:
        finite_float("trainer.val_check_interval", interval, 0, low_open=True, error=UsageError,
                     hint=" (an integer: batches; a fraction in (0, 1]: of an epoch)")  # fmt: skip
    devices = trainer_config.devices
    if isinstance(devices, int) and not isinstance(devices, bool) or re.fullmatch(r"-?\d+", str(devices)):
        count = int(devices)
        on_gpu = run_device(trainer_config).type == "cuda"
        if count == 0 or count < -1 or (count == -1 and not on_gpu):
            raise UsageError(
                f"trainer.devices must be a positive number of devices or auto{' (or -1: every GPU)' if on_gpu else ''}"
                f", got {devices!r}"
            )
        # Lightning runs any number of CPU "devices" (one process each); more than the cores here is a mistake.
        on_cpu = trainer_config.accelerator == "cpu" or (trainer_config.accelerator == "auto" and not cuda_present())
        cores = len(os.sched_getaffinity(0))
        if on_cpu and count > cores:
            raise UsageError(
                f"trainer.devices {devices} asks for {devices} CPU processes but this machine has {cores} cores; "
                f"use at most {cores}"
            )


# A config is read whole and its YAML expanded: refuse, before either, what would take all memory or time.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 200_000  # after aliases are expanded (a "billion laughs" is a few hundred bytes)


def check_config_files(argv: list[str]) -> None:
    """Every `--config FILE` given: at most MAX_CONFIG_BYTES and UTF-8, named in one line when not."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2]
        if not (arg == "--config" or arg.startswith("--config=")) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as error:
            raise UsageError(f"--config {path}: cannot read it ({error.strerror or error})") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise UsageError(f"--config {path} is over {MAX_CONFIG_BYTES >> 20} MiB; a config holds settings, not data")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(
                f"--config {path}: byte {error.start} (0x{data[error.start]:02x}) is not UTF-8; save it as UTF-8"
            ) from None
        check_sections(path, text)


SECTIONS = ("model", "data", "trainer", "sample", "sparsity", "inspect", "checkpoint", "optimizer", "lr_scheduler")


def check_sections(path: str, text: str) -> None:
    """A config is a mapping of sections (model:, data:, trainer:, ...); an empty one is a mistake to name."""
    try:
        check_yaml_bounds(text)
        settings = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # jsonargparse names the line
    if settings is not None and not isinstance(settings, dict):
        raise UsageError(f"--config {path} holds a {type(settings).__name__}, not settings (model:, data:, trainer:)")
    empty = [key for key, value in (settings or {}).items() if value is None and key in SECTIONS]
    if empty:
        raise UsageError(f"--config {path}: section {empty[0]}: is empty; give its settings under it or remove it")


def check_yaml_bounds(text: str) -> None:
    """Refuse YAML too large, too deeply nested or expanding through aliases to too many values (counted from the
    parser's events, before anything is built)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"YAML over {MAX_CONFIG_BYTES >> 20} MiB refused")
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    open_nodes = [[None, 0]]  # (anchor, values so far) of each collection being read
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"YAML nested over {MAX_YAML_DEPTH} levels deep refused")
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, count = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        open_nodes[-1][1] += count
        if sum(node[1] for node in open_nodes) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"YAML expanding to over {MAX_YAML_NODES:,} values (through aliases) refused")


def bounded_yaml_load(text: str):
    check_yaml_bounds(text)
    return JSONARGPARSE_YAML_LOAD(text)


JSONARGPARSE_YAML_LOAD = get_loader("yaml")
set_loader("yaml", bounded_yaml_load, exceptions=(yaml.YAMLError,))


def check_workers(data_config) -> None:
    """DataLoader worker processes beyond a few per core only thrash; a huge number forks until memory runs out."""
    workers, most = data_config.get("num_workers"), max(8, 4 * len(os.sched_getaffinity(0)))
    if isinstance(workers, int) and workers > most:
        raise UsageError(
            f"data.num_workers {workers} would start that many processes; use at most {most} on this machine"
        )
