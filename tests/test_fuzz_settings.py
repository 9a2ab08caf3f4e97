"""Every setting of fit, validate, generate, estimate and export fed random and mutated values (issue 29): NaN,
infinities, negative, huge, wrong type, empty, non-UTF-8, from the command line and from a YAML config. Each run
ends with exit 0 or 2 (1 only for the refusal of a batch that cannot fit in memory), at most 2 lines on stderr,
no traceback, and a refused run leaves nothing behind.

In this process, with the training itself replaced by nothing (Trainer.fit/validate): everything up to it runs
(parsing, every check, building the model, data and trainer); one real subprocess checks the process end to end.
The values are drawn from a seeded generator: FUZZ_SEED=N tries another draw.
"""

from __future__ import annotations

import functools
import os
import random
import re
from pathlib import Path

import lightning.pytorch as lp
import pytest
import torch
from conftest import REPO, TINY_ARGS, TINY_MODEL, run_cli, write_letters

from bdh_lightning.cli import BDHCLI, SettingsOnly
from bdh_lightning.main import command_function, main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.weights import write_weights

SEED = int(os.environ.get("FUZZ_SEED", "29"))
MUTATIONS = [
    "nan", "inf", "-inf", ".nan", "-1", "0", "-0.5", "1.5", "1e400", "-1e400", "99999999999999999999999",
    "", "[]", "{}", "[1, [2]]", "null", "true", "abc", "\udcff\udcfe", "\x1b]0;x\x07", "1,2",
]  # fmt: skip
# Settings whose valid huge values would run for hours or read the whole disk: only invalid values for them.
SLOW = {"trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.min_epochs", "max_new_tokens",
        "data.path", "data.test_path", "trainer.default_root_dir", "logs_dir", "chunk_size", "trainer.num_nodes"}  # fmt: skip
HARMLESS = [m for m in MUTATIONS if m not in ("99999999999999999999999", "1e400", "inf", "1.5", "true", "abc", "1,2")]
SKIPPED = {"config", "print_config", "print_shtab", "help", "version", "quiet", "trainer.default_root_dir"}


def fit_settings() -> list[str]:
    """Every leaf setting `fit` takes, read off its parser (model.*, data.*, trainer.*, sample.*, ...)."""
    parser = SettingsOnly(args=["--seed_everything", "false"], run=False).parser
    dests = [a.dest for a in parser._actions if a.option_strings and not a.dest.endswith(".help")]
    groups = {d.rpartition(".")[0] for d in dests}
    return sorted(d for d in dests if d not in SKIPPED and d not in groups and d not in ("optimizer", "lr_scheduler"))


NUMBERS = ["nan", "inf", "-inf", "-1", "0", "-0.5", "1.5", "1e400", "99999999999999999999999", "1e-45"]


def draw(rng: random.Random, setting: str) -> str:
    """Mostly numbers (most settings are numeric, and a number gets past the parser to our own checks)."""
    if setting.rpartition(".")[2] in SLOW or setting in SLOW:
        return rng.choice(HARMLESS)
    return rng.choice(NUMBERS if rng.random() < 0.6 else MUTATIONS)


# Exit 1 by design: a batch too big for memory, a loss that diverged (a learning rate of 1e23 is allowed).
RUN_FAILURE = re.compile(r"needs about|training loss is|weights became NaN")
# What a run that trains prints besides problems: its header, progress and closing block (console.py).
REPORT = re.compile(r"(run|device|model|batch|corpus|kernel|memory|training|done|val/loss|best|last|next|step) | {5}")


def check(code: int, err: str, args: list, folder: Path | None = None) -> None:
    lines = [line for line in err.splitlines() if not REPORT.match(line)]
    allowed = code in (0, 2) or (code == 1 and RUN_FAILURE.search(err))
    assert allowed and len(lines) <= 2 and "Traceback" not in err, (args, code, err[-2000:])
    if code and folder is not None:
        assert not any(folder.rglob("*")), (args, sorted(folder.rglob("*")))


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """A working folder with a corpus, the tiny weights as safetensors, and training replaced by nothing."""
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt", size=20000)
    torch.manual_seed(0)
    config = BDHConfig(**TINY_MODEL)
    write_weights(BDH(config).state_dict(), config, "safetensors", tmp_path / "tiny.safetensors")
    for name in ("fit", "validate", "test"):  # the same signature: LightningCLI builds each parser from it
        monkeypatch.setattr(lp.Trainer, name, functools.wraps(getattr(lp.Trainer, name))(lambda self, *a, **k: None))
    monkeypatch.setattr(BDHCLI, "setup_parser", reused_parser)
    return tmp_path


TRAIN = lp.Trainer.fit
# Left out of the real runs: they set how long a run is (or start processes), not whether it can go wrong.
NOT_IN_REAL_RUNS = {"trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.min_epochs",
                    "trainer.max_time", "trainer.fast_dev_run", "data.num_workers", "trainer.devices",
                    "trainer.strategy", "trainer.num_nodes", "trainer.profiler", "trainer.accelerator"}  # fmt: skip
PARSERS = {}
BUILD_PARSER = BDHCLI.setup_parser


def reused_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
    """The same parser for every run of a test (building fit/validate/test's parsers is 2/3 of a refused run)."""
    key = (type(self), add_subcommands)
    if key not in PARSERS:
        BUILD_PARSER(self, add_subcommands, main_kwargs, subparser_kwargs)
        PARSERS[key] = (
            self.parser,
            getattr(self, "_subcommand_method_arguments", {}),
            getattr(self, "_subcommand_parsers", {}),
        )
    self.parser, self._subcommand_method_arguments, self._subcommand_parsers = PARSERS[key]


def run_quietly(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.decode("utf-8", "backslashreplace")  # binary: --raw writes bytes


def test_fit_and_validate_every_setting_mutated(no_training, capsysbinary, monkeypatch):
    rng = random.Random(SEED)
    settings = fit_settings()
    assert len(settings) > 80 and "sample.temperature" in settings and "trainer.val_check_interval" in settings
    rng.shuffle(settings)
    runs = no_training / "runs"
    accepted = []
    for i, setting in enumerate(settings):  # every setting once, one at a time (the first refusal hides the rest)
        mutated = [f"--{setting}", draw(rng, setting)]
        command = "validate" if i % 10 == 0 else "fit"
        args = [command, "--data.path", "corpus.txt", *TINY_ARGS, "--trainer.default_root_dir", str(runs), *mutated]
        if command == "validate":
            args = [*args, "--ckpt_path", "tiny.safetensors"]
        code, err = run_quietly(capsysbinary, args)
        check(code, err, args, runs if runs.exists() else None)
        if code == 0 and command == "fit" and setting not in NOT_IN_REAL_RUNS:
            accepted.append(mutated)
        empty(runs)
    # What every check let through, trained for real: two steps, three runs, a third of the values each.
    monkeypatch.setattr(lp.Trainer, "fit", TRAIN)
    for i in range(3):
        mutated = [arg for pair in accepted[i::3] for arg in pair]
        args = ["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--trainer.default_root_dir", str(runs), *mutated,
                "--trainer.max_steps", "2", "--sample.length", "3"]  # fmt: skip
        check(*run_quietly(capsysbinary, args), args)
        empty(runs)


def empty(folder: Path) -> None:
    """Remove what an accepted run left (its empty run folder), for the next run's check."""
    if folder.exists():
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()


def mutate_yaml(text: str, rng: random.Random) -> bytes:
    """A config with some values replaced by mutations (as YAML), or a byte that is not UTF-8."""
    lines = text.splitlines()
    values = [i for i, line in enumerate(lines) if re.match(r"\s+\w+: \S", line)]
    for i in rng.sample(values, 3):
        key = lines[i].split(":")[0]
        value = rng.choice([".nan", ".inf", "-.inf", "-1", "0", "1e400", "99999999999999999999999", '""', "[]",
                            "{}", "~", "*nowhere", "&a [*a]", "!!binary AAAA", '"\\udcff"'])  # fmt: skip
        lines[i] = f"{key}: {value}"
    data = ("\n".join(lines) + "\n").encode()
    return data + b"# caf\xe9\n" if rng.random() < 0.2 else data


def test_yaml_configs_mutated_for_fit_and_estimate(no_training, capsysbinary):
    rng = random.Random(SEED + 1)
    tiny = (REPO / "configs" / "tiny.yaml").read_text()
    tiny = tiny.replace("data/tinyshakespeare.txt", "corpus.txt").replace("max_steps: 1000", "max_steps: 2")
    runs = no_training / "runs"
    for i in range(8):
        (no_training / "mutated.yaml").write_bytes(mutate_yaml(tiny, rng))
        for args in (
            ["fit", "--config", "mutated.yaml", "--trainer.default_root_dir", str(runs)],
            ["estimate", "--config", "mutated.yaml"],
        ):
            if args[0] == "estimate" or i % 2 == 0:
                check(*run_quietly(capsysbinary, args), [args, (no_training / "mutated.yaml").read_bytes()], runs)
        empty(runs)


def command_settings(name: str) -> list[str]:
    import inspect

    return list(inspect.signature(command_function(name)).parameters)


@pytest.mark.parametrize("command", ["generate", "estimate", "export"])
def test_every_command_setting_mutated(no_training, capsysbinary, command):
    rng = random.Random(f"{SEED}-{command}")
    base = {
        "generate": ["--ckpt_path", "tiny.safetensors", "--max_new_tokens", "3", "--device", "cpu"],
        "estimate": ["--config", str(REPO / "configs" / "tiny.yaml"), "--device", "cpu"],
        "export": ["--ckpt_path", "tiny.safetensors", "--format", "reference", "--output", "w.pt"],
    }[command]
    before = set(os.listdir(no_training))
    for setting in command_settings(command):
        for _ in range(2):
            args = [command, *base, f"--{setting}", draw(rng, setting)]
            code, err = run_quietly(capsysbinary, args)
            check(code, err, args)
            if code:
                assert set(os.listdir(no_training)) == before, (args, set(os.listdir(no_training)) - before)
            for new in set(os.listdir(no_training)) - before:  # an accepted export or --output: removed for the next
                path = no_training / new
                path.rmdir() if path.is_dir() else path.unlink()


def test_a_real_process_with_mutated_sample_and_trainer_settings(tmp_path):
    """End to end in a fresh process: a real 2-step fit with mutated values; exit 0 or 2, at most 2 lines."""
    write_letters(tmp_path / "corpus.txt", size=20000)
    rng = random.Random(SEED + 2)
    picks = rng.sample(["sample.temperature", "sample.top_k", "sample.seed", "trainer.val_check_interval",
                        "trainer.gradient_clip_val", "trainer.limit_val_batches", "checkpoint.every_n_train_steps",
                        "sparsity.max_batches", "trainer.log_every_n_steps", "seed_everything"], 3)  # fmt: skip
    mutated = [arg for s in picks for arg in (f"--{s}", rng.choice(MUTATIONS[:14]))]
    args = ["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--trainer.max_steps", "2", "--sample.length", "5"]
    done = run_cli(tmp_path, *args, *mutated, timeout=120)
    check(done.returncode, done.stderr, mutated)
    if done.returncode:
        assert not (tmp_path / "lightning_logs").exists(), mutated
