"""Runs you can trust (issue 9): which checkpoint `--ckpt_path last` means, one last.ckpt per run, saves every k
steps from the start, one folder per simultaneous run, exact bytes from `generate`, and every bad setting, bad
checkpoint, full disk or exhausted memory as one line, with nothing written before the settings are known good.

Each case goes through the real command line: `main()` in this process where nothing depends on the process
itself, `python -m bdh_lightning` in a subprocess where standard output, limits or signals matter.
"""

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    SUBPROCESS_ENV,
    finish,
    run_cli,
    skip_under_mutmut,
    start_cli,
    stderr_of,
    wait_for_line,
    write_letters,
)
from conftest import TINY_ARGS as TINY

from bdh_lightning import checkpoints as checkpoints_module
from bdh_lightning.main import main

QUICK = [*TINY, "--sample.length", "0"]  # no closing sample: nothing here reads it


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def saved_step(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not there yet, or mid-rename on a slow disk
        return None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of 3 steps (./lightning_logs/version_0), and checkpoints made from its last.ckpt that Lightning
    would stop on with a traceback."""
    folder = tmp_path_factory.mktemp("trust")
    write_letters(folder / "corpus.txt")
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: no function-scoped monkeypatch
        patch.chdir(folder)
        assert main(["fit", "--data.path", "corpus.txt", *QUICK, "--trainer.max_steps", "3"]) == 0
    last = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    weights = dict(checkpoint["state_dict"])
    weights["model.encoder"] = weights["model.encoder"].clone()
    weights["model.encoder"][0, 0, 0] = float("nan")
    torch.save({**checkpoint, "state_dict": weights}, folder / "nan.ckpt")
    torch.save(
        {**checkpoint, "state_dict": {**checkpoint["state_dict"], "model.extra": torch.zeros(3)}},
        folder / "extra-key.ckpt",
    )
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, folder / "no-optimizer.ckpt")
    torch.save({**checkpoint, "hyper_parameters": [1, 2]}, folder / "settings-list.ckpt")
    torch.save({k: v for k, v in checkpoint.items() if k != "pytorch-lightning_version"}, folder / "no-version.ckpt")
    return folder


# ---------------------------------------------------------------- `--ckpt_path last`


@pytest.mark.parametrize("command", ["fit", "validate", "test", "generate"])
def test_last_is_the_newest_checkpoint_of_the_run_root_this_command_uses(
    trained, tmp_path, monkeypatch, capsys, command
):
    """An older run in ./lightning_logs must not be picked when the command's runs go elsewhere."""
    monkeypatch.chdir(trained)
    other = tmp_path / "other"
    wanted = other / "lightning_logs/version_0/checkpoints/last.ckpt"
    wanted.parent.mkdir(parents=True)
    shutil.copy(trained / "lightning_logs/version_0/checkpoints/last.ckpt", wanted)
    os.utime(trained / "lightning_logs/version_0/checkpoints/last.ckpt")  # ./lightning_logs holds the newer file
    if command == "generate":
        args = ["generate", "--ckpt_path", "last", "--logs_dir", str(other / "lightning_logs"), "--max_new_tokens", "3"]
    else:
        args = [
            command,
            "--ckpt_path",
            "last",
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.default_root_dir",
            str(other),
        ]
        if command == "fit":
            args += ["--trainer.max_steps", "4"]
        if command == "test":
            args += ["--data.test_path", str(write_letters(tmp_path / "held-out.txt", seed=1))]
    assert main(args) == 0
    chosen = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--ckpt_path last: ")]
    assert chosen and chosen[0].startswith(f"--ckpt_path last: {wanted}"), chosen
    if command == "fit":  # continued that run, in the same root
        assert saved_step(other / "lightning_logs/version_1/checkpoints/last.ckpt") == 4


def test_last_with_no_run_in_this_root_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    code = main(
        [
            "fit",
            "--ckpt_path",
            "last",
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path / "new"),
        ]
    )
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and err == [
        f"error: --ckpt_path last: no {tmp_path / 'new/lightning_logs'}/version_*/checkpoints/last.ckpt found; "
        "train first or give a checkpoint path"
    ]
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- one last.ckpt, saves from the start


def test_a_run_ends_with_exactly_one_last_checkpoint(trained, tmp_path, monkeypatch):
    """No validation before the end (3 steps, validation every 5): Lightning wrote last.ckpt and last-v1.ckpt."""
    monkeypatch.chdir(trained)
    assert (
        main(
            [
                "fit",
                "--data.path",
                "corpus.txt",
                *QUICK,
                "--trainer.max_steps",
                "3",
                "--trainer.default_root_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    folder = tmp_path / "lightning_logs/version_0/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert saved_step(folder / "last.ckpt") == 3


def test_a_data_parallel_run_ends_with_exactly_one_last_checkpoint(tmp_path):
    write_letters(tmp_path / "corpus.txt")
    done = run_cli(
        tmp_path,
        "fit",
        "--data.path",
        "corpus.txt",
        *QUICK,
        "--trainer.max_steps",
        "3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "lightning_logs/version_0/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert saved_step(folder / "last.ckpt") == 3


def test_every_n_train_steps_saves_before_the_first_validation(trained, tmp_path):
    """Lightning deferred the save until val/loss existed: a crash before the first validation lost everything."""
    proc = start_cli(
        trained,
        "fit",
        "--data.path",
        "corpus.txt",
        *QUICK,
        "--trainer.max_steps",
        "100000",
        "--trainer.val_check_interval",
        "100000",
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while (step := saved_step(last)) is None:
            assert proc.poll() is None, stderr_of(proc)[-2000:]
            assert time.monotonic() < deadline, f"no last.ckpt before the first validation: {stderr_of(proc)[-2000:]}"
            time.sleep(0.05)
        assert step % 2 == 0 and step > 0
    finally:
        proc.kill()
        proc.wait()


def test_simultaneous_runs_get_one_folder_each(trained, tmp_path):
    runs = [
        start_cli(
            trained,
            "fit",
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--seed_everything",
            str(seed),
        )
        for seed in range(3)
    ]
    for proc in runs:
        err = finish(proc)
        assert proc.returncode == 0, err[-2000:]
    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1", "version_2"]
    seeds = set()
    for folder in logs.iterdir():
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, sorted(p.name for p in folder.iterdir())
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["last.ckpt"]
        seeds.add(
            next(
                line for line in (folder / "config.yaml").read_text().splitlines() if line.startswith("seed_everything")
            )
        )
    assert len(seeds) == 3  # each folder's config.yaml is its own run's


# ---------------------------------------------------------------- settings and checkpoints refused in one line


@pytest.mark.parametrize(
    "setting, expected",
    [
        (["--model.learning_rate", "-1"], "model.learning_rate must be in (0, inf), got -1.0"),
        (["--model.learning_rate", "0"], "model.learning_rate must be in (0, inf), got 0.0"),
        (["--config", "nan.yaml"], "model.learning_rate must be a finite number, got nan"),
        (["--model.weight_decay", "-1"], "model.weight_decay must be in [0, inf), got -1.0"),
        (["--model.betas", "[1.5, 2]"], "model.betas[0] must be in [0, 1), got 1.5"),
        (["--model.betas", "[0.9, 1]"], "model.betas[1] must be in [0, 1), got 1.0"),
        (["--model.warmup_steps", "-3"], "model.warmup_steps must be a non-negative integer (0 = no warmup), got -3"),
        (
            ["--model.decay_steps", "-1"],
            "model.decay_steps must be a non-negative integer (0 = constant learning rate), got -1",
        ),
        (["--model.min_learning_rate=-1e-5"], "model.min_learning_rate must be in [0, 0.003], got -1e-05"),
        (["--model.min_learning_rate", "0.01"], "model.min_learning_rate must be in [0, 0.003], got 0.01"),
    ],
    ids=[
        "lr-negative",
        "lr-zero",
        "lr-nan-yaml",
        "weight-decay-negative",
        "beta-above-1",
        "beta-1",
        "warmup-negative",
        "decay-negative",
        "min-lr-negative",
        "min-lr-above-lr",
    ],
)
def test_bad_optimizer_settings_are_one_line_before_any_run_folder(
    trained, tmp_path, monkeypatch, capsys, setting, expected
):
    monkeypatch.chdir(trained)
    (trained / "nan.yaml").write_text("model:\n  learning_rate: .nan\n")
    code = main(
        [
            "fit",
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            *setting,
        ]
    )
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == []  # no run folder


# Issue 29 (every input safe): settings Lightning, numpy or the sampler would end in a traceback on, from any source.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
UNSAFE_CONFIGS = {
    "latin1.yaml": b"model:\n  n_layer: 2  # caf\xe9\n",
    "empty-model.yaml": b"data:\n  batch_size: 8\nmodel:\n",
    "only-model.yaml": b"model:\n",
    "laughs.yaml": (LAUGHS + "model:\n  n_layer: *i\n").encode(),
    "deep.yaml": ("model: " + "[" * 200 + "]" * 200 + "\n").encode(),
    "sample-nan.yaml": b"sample:\n  temperature: .nan\n",
    "sample-seed.yaml": b"sample:\n  seed: 99999999999999999999999\n",
    "sample-prompt.yaml": b'sample:\n  prompt: ""\n',
}


@pytest.mark.parametrize(
    "setting, expected",
    [
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be in (0, inf), got 0"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be a positive integer"),
        (["--trainer.devices", "-1", "--trainer.accelerator", "cpu"], "trainer.devices must be a positive number"),
        (["--seed_everything", "99999999999"], "seed_everything must be an integer from 0 to 4294967295"),
        (["--config", "latin1.yaml"], "--config latin1.yaml: byte 26 (0xe9) is not UTF-8; save it as UTF-8"),
        (["--config", "empty-model.yaml"], "--config empty-model.yaml: section model: is empty"),
        (["--config", "only-model.yaml"], "--config only-model.yaml: section model: is empty"),
        (["--config", "laughs.yaml"], "YAML expanding to over 200,000 values (through aliases) refused"),
        (["--config", "deep.yaml"], "YAML nested over 64 levels deep refused"),
        (["--config", "sample-nan.yaml"], "sample.temperature must be a finite number, got nan"),
        (["--config", "sample-seed.yaml"], "sample.seed must be an integer from 0 to 2**64 - 1"),
        (["--config", "sample-prompt.yaml"], "sample.prompt must hold at least one byte"),
        (["--sample.prompt", "\udcff\ud800"], "sample.prompt must be UTF-8 text"),
        (["--sample.top_k", "0"], "sample.top_k must be in 1..256"),
    ],
    ids=[
        "val-check-interval-0",
        "accumulate-0",
        "devices-minus-1-cpu",
        "seed-past-32-bits",
        "config-latin1",
        "config-empty-model",
        "config-only-model",
        "config-billion-laughs",
        "config-deep",
        "sample-temperature-nan-yaml",
        "sample-seed-past-64-bits-yaml",
        "sample-prompt-empty-yaml",
        "sample-prompt-lone-surrogate",
        "sample-top-k-0",
    ],
)
def test_every_input_safe_settings_are_one_line_before_any_run_folder(
    trained, tmp_path, monkeypatch, capsys, setting, expected
):
    monkeypatch.chdir(trained)
    for name, content in UNSAFE_CONFIGS.items():
        (trained / name).write_bytes(content)
    start = time.perf_counter()
    code = main(["fit", "--data.path", "corpus.txt", *QUICK, "--trainer.default_root_dir", str(tmp_path), *setting])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - start < 5  # no run folder; laughs refused at once


def test_every_input_safe_estimate_refuses_laughs_and_an_infinite_budget_in_one_line(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    (trained / "laughs.yaml").write_bytes(UNSAFE_CONFIGS["laughs.yaml"])
    start = time.perf_counter()
    assert main(["estimate", "--config", "laughs.yaml"]) == 2
    assert time.perf_counter() - start < 1.0  # refused from the parser's events, before anything is expanded
    assert error_lines(capsys.readouterr().err)[0].endswith("refused (see estimate --help)")
    (trained / "small.yaml").write_text("model:\n  n_layer: 2\n")
    assert main(["estimate", "--config", "small.yaml", "--budget", "1e400"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --budget '1e400' is not a finite size; write it like 14GB, 14GiB or 8e9 (bytes)"
    ]


@pytest.mark.parametrize(
    "command, ckpt, expected",
    [
        ("fit", "extra-key.ckpt", "checkpoint extra-key.ckpt holds weights BDH does not have (model.extra)"),
        (
            "fit",
            "no-optimizer.ckpt",
            "checkpoint no-optimizer.ckpt holds no optimizer state, so training cannot continue from it",
        ),
        ("fit", "settings-list.ckpt", "checkpoint settings-list.ckpt has hyper_parameters that are not a mapping"),
        ("fit", "no-version.ckpt", "checkpoint no-version.ckpt has no pytorch-lightning_version"),
        ("fit", "nan.ckpt", "checkpoint nan.ckpt holds non-finite weights (NaN or infinity in model.encoder)"),
        ("validate", "nan.ckpt", "checkpoint nan.ckpt holds non-finite weights (NaN or infinity in model.encoder)"),
        ("validate", "extra-key.ckpt", "checkpoint extra-key.ckpt holds weights BDH does not have (model.extra)"),
        ("generate", "nan.ckpt", "nan.ckpt: encoder has 1 non-finite values (NaN or infinity)"),
    ],
    ids=[
        "fit-extra-key",
        "fit-no-optimizer",
        "fit-settings-not-a-mapping",
        "fit-no-lightning-version",
        "fit-nan",
        "validate-nan",
        "validate-extra-key",
        "generate-nan",
    ],
)
def test_malformed_or_non_finite_checkpoints_are_one_line(
    trained, tmp_path, monkeypatch, capsys, command, ckpt, expected
):
    monkeypatch.chdir(trained)
    before = files_under(trained)
    if command == "generate":
        args = ["generate", "--ckpt_path", ckpt, "--max_new_tokens", "3"]
    else:
        args = [
            command,
            "--ckpt_path",
            ckpt,
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "5",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    code = main(args)
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert files_under(trained) == before and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- full disk, no memory


def test_disk_full_while_writing_a_checkpoint_is_one_line_naming_the_last_good_one(
    trained, tmp_path, monkeypatch, capsys
):
    """The step-4 checkpoint's write fails with ENOSPC: one line naming this run's step-2 last.ckpt, no .part left."""
    monkeypatch.chdir(trained)
    real_save = torch.save
    saves = []

    def fill_the_disk(checkpoint, file, *args, **kwargs):
        saves.append(checkpoint["global_step"])
        if checkpoint["global_step"] >= 4:
            file.write(b"x" * 1000)  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(checkpoint, file, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module.torch, "save", fill_the_disk)
    code = main(
        [
            "fit",
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "10",
            "--checkpoint.every_n_train_steps",
            "2",
            "--trainer.val_check_interval",
            "100",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    monkeypatch.setattr(checkpoints_module.torch, "save", real_save)
    err = error_lines(capsys.readouterr().err)
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert code == 1 and err == [
        f"error: cannot write checkpoint {last} (No space left on device); the last good checkpoint of this run is "
        f"{last} (step 2); free some space and resume from it with --ckpt_path"
    ], err
    assert saved_step(last) == 2
    assert not list(tmp_path.rglob("*.part"))


def test_out_of_cpu_memory_is_one_line(trained, tmp_path):
    """A run that fits the machine's RAM (so it is not refused beforehand) in a process limited to 3 GB of
    address space: torch's allocator fails in the first step."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    args = [
        "fit",
        "--data.path",
        "corpus.txt",
        *QUICK,
        "--model.n_embd",
        "64",
        "--model.mlp_internal_dim_multiplier",
        "512",
        "--data.batch_size",
        "8",
        "--data.block_size",
        "512",
        "--model.kernel",
        "reference",
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    skip_under_mutmut()
    done = subprocess.run(
        [sys.executable, "-m", "bdh_lightning", *args],
        cwd=trained,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_memory,
    )
    err = error_lines(done.stderr)
    assert done.returncode == 1 and len(err) == 1 and err[0].startswith("error: out of memory;"), done.stderr[-3000:]


# ---------------------------------------------------------------- generate: exact bytes, safe terminal, closed outputs


# Terminal escapes (clear, set the title), UTF-8, an invalid byte, a literal backslash-x-f-f, CR, a C1 control (CSI).
PROMPT = b"\x1b[2J\x1b]0;owned\x07 caf\xc3\xa9 \xff\\xff\r\xc2\x9b"


@pytest.fixture(scope="module")
def generating(trained):
    """A prompt file of bytes a terminal would act on, and the generate arguments (greedy: deterministic)."""
    (trained / "prompt.bin").write_bytes(PROMPT)
    ckpt = str(trained / "lightning_logs/version_0/checkpoints/last.ckpt")
    return [
        "generate",
        "--ckpt_path",
        ckpt,
        "--prompt_file",
        "prompt.bin",
        "--max_new_tokens",
        "300",
        "--temperature",
        "0",
    ]


def generate_shell(trained: Path, generating: list[str], redirect: str) -> subprocess.CompletedProcess:
    skip_under_mutmut()
    command = " ".join([sys.executable, "-m", "bdh_lightning", *generating])
    return subprocess.run(
        ["bash", "-c", f"{command} {redirect}"], cwd=trained, env=SUBPROCESS_ENV, capture_output=True, timeout=300
    )


def test_output_and_raw_write_the_exact_bytes_and_the_terminal_gets_no_control_bytes(
    trained, generating, monkeypatch, capsysbinary
):
    monkeypatch.chdir(trained)
    assert main([*generating, "--output", "out.bin"]) == 0
    exact = (trained / "out.bin").read_bytes()
    assert exact.startswith(PROMPT) and len(exact) == len(PROMPT) + 300
    assert not (trained / "out.bin.part").exists()
    capsysbinary.readouterr()

    assert main([*generating, "--raw"]) == 0
    assert capsysbinary.readouterr().out == exact  # nothing added, nothing changed

    assert main(generating) == 0
    shown = capsysbinary.readouterr().out
    assert not set(shown) & (set(range(0x20)) - {0x09, 0x0A} | {0x7F}), shown[:80]  # no C0 control byte but \t \n
    assert b"\xc2\x9b" not in shown and shown.startswith(
        b"\\x1b[2J\\x1b]0;owned\\x07 caf\xc3\xa9 \\xff\\xff\\x0d\\xc2\\x9b"
    )


def test_generate_to_a_closed_pipe_ends_quietly(trained, generating):
    done = generate_shell(trained, generating, "--max_new_tokens 3000 | head -c 10; exit ${PIPESTATUS[0]}")
    assert done.stdout == b"\\x1b[2J\\x1"
    assert done.returncode == 141 and done.stderr == b"", done.stderr[-2000:]  # 128 + SIGPIPE, as `yes | head` ends


@pytest.mark.parametrize(
    "redirect, code, expected",
    [
        (">&-", 2, "error: standard output is closed; give --output FILE to write the text to a file"),
        ("> /dev/full", 1, "error: cannot write the generated text to standard output (No space left on device)"),
    ],
    ids=["stdout-closed", "stdout-disk-full"],
)
def test_generate_output_problems_are_one_line(trained, generating, redirect, code, expected):
    """Standard output closed or full: only a real process, started from a shell, has them."""
    done = generate_shell(trained, generating, redirect)
    err = error_lines(done.stderr.decode())
    assert done.returncode == code and len(err) == 1 and err[0].startswith(expected), done.stderr[-2000:]
    assert not list(trained.glob("*.part")) and Path("/dev/full").is_char_device()


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["--output", "/dev/full"], 1, "error: cannot write --output /dev/full (No space left on device)"),
        (
            ["--seed", "99999999999999999999999"],
            2,
            "error: --seed must be an integer from 0 to 2**64 - 1, got 99999999999999999999999",
        ),
        (["--temperature", "1e-45"], 2, "error: --temperature 1e-45 is too small to divide logits by"),
        (["--num_samples", "100000000"], 1, "error: --num_samples 100000000 needs about"),
        (["--raw", "--num_samples", "2"], 2, "error: --raw writes one sample's exact bytes"),
    ],
    ids=["output-disk-full", "seed-too-large", "temperature-tiny", "num-samples-too-many", "raw-several-samples"],
)
def test_generate_setting_problems_are_one_line(trained, generating, monkeypatch, capsys, args, code, expected):
    if "/dev/full" in args:
        skip_under_mutmut()  # a mutant that renames its output into place would replace the machine's /dev/full
    monkeypatch.chdir(trained)
    assert main([*generating, *args]) == code
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not list(trained.glob("*.part")) and Path("/dev/full").is_char_device()


def test_every_input_safe_generate_never_replaces_a_file_unasked_nor_its_own_checkpoint(
    trained, generating, monkeypatch, capsys
):
    monkeypatch.chdir(trained)
    ckpt = Path(generating[2])
    before = ckpt.read_bytes()
    (trained / "kept.txt").write_bytes(b"mine")
    short = [*generating[:-4], "--max_new_tokens", "5", "--temperature", "0"]
    for output, extra, expected in [
        ("kept.txt", [], "--output: kept.txt exists; give --overwrite true to replace it, or another --output"),
        (str(ckpt), [], f"--output: {ckpt} exists; give --overwrite true"),
        (str(ckpt), ["--overwrite"], f"--output {ckpt} is the checkpoint being read (--ckpt_path); give another"),
    ]:
        assert main([*short, "--output", output, *extra]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert ckpt.read_bytes() == before and (trained / "kept.txt").read_bytes() == b"mine"
    assert main([*short, "--output", "kept.txt", "--overwrite"]) == 0
    assert (trained / "kept.txt").read_bytes().startswith(PROMPT) and not list(trained.glob(".kept.txt.part*"))


def test_every_input_safe_file_names_in_error_lines_are_escaped(trained, generating, monkeypatch, capsysbinary):
    monkeypatch.chdir(trained)
    assert main([*generating[:3], "--prompt_file", "\x1b]0;owned\x07.txt"]) == 2
    err = capsysbinary.readouterr().err
    assert b"\x1b" not in err and b"\x07" not in err and b"\\x1b]0;owned\\x07.txt" in err, err


# ---------------------------------------------------------------- estimate


@pytest.mark.parametrize(
    "yaml, expected",
    [
        ("data:\n  block_size: 0\n", "error: data.block_size must be a positive integer, got 0"),
        ("data:\n  batch_size: -2\n", "error: data.batch_size must be a positive integer, got -2"),
        ("model:\n  n_head: 0\n", "error: model.n_head must be a positive integer, got 0"),
    ],
    ids=["block-size-0", "batch-size-negative", "heads-0"],
)
def test_estimate_checks_the_settings_it_computes_with(tmp_path, monkeypatch, capsys, yaml, expected):
    (tmp_path / "bad.yaml").write_text(yaml)
    monkeypatch.chdir(tmp_path)

    def looped(signum, frame):
        raise AssertionError("estimate still running after 60 s")  # it looped forever on block_size 0

    previous = signal.signal(signal.SIGALRM, looped)
    signal.alarm(60)
    try:
        code = main(["estimate", "--config", "bad.yaml"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and err == [expected], err


# ---------------------------------------------------------------- the last good checkpoint, signals, a lost rank


def test_a_non_finite_loss_names_only_a_checkpoint_this_run_wrote(trained, tmp_path, monkeypatch, capsys):
    """Resumed into a shared checkpoint.dirpath, Lightning's ModelCheckpoint state names the other run's last.ckpt."""
    monkeypatch.chdir(trained)
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(trained / "lightning_logs/version_0/checkpoints/last.ckpt", shared / "last.ckpt")
    (tmp_path / "poison.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: recorders.PoisonWeights\n      init_args: {step: 3, where: loss}\n"
    )
    code = main(
        [
            "fit",
            "--config",
            str(tmp_path / "poison.yaml"),
            "--data.path",
            "corpus.txt",
            *QUICK,
            "--trainer.max_steps",
            "6",
            "--ckpt_path",
            str(shared / "last.ckpt"),
            "--checkpoint.dirpath",
            str(shared),
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: training loss is nan at step 3"), err
    assert f"no checkpoint was saved in this run (it resumed from {shared / 'last.ckpt'})" in err[0], err
    assert "last good checkpoint is" not in err[0]


SLOW = "trainer:\n  callbacks:\n    - class_path: recorders.SlowSteps\n      init_args: {seconds: 0.3}\n"


def start_slow_run(folder: Path, *extra: str):
    """A run whose steps take 0.3 s, saving every 2 steps; returns it once its first checkpoint exists."""
    (folder / "slow.yaml").write_text(SLOW)
    write_letters(folder / "corpus.txt")
    proc = start_cli(
        folder,
        "fit",
        "--config",
        "slow.yaml",
        "--data.path",
        "corpus.txt",
        *QUICK,
        "--trainer.max_steps",
        "100000",
        "--checkpoint.every_n_train_steps",
        "2",
        *extra,
    )
    last = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    deadline = time.monotonic() + 180
    while saved_step(last) is None:
        assert proc.poll() is None and time.monotonic() < deadline, stderr_of(proc)[-2000:]
        time.sleep(0.05)
    return proc, last


def test_sigterm_prints_one_line(tmp_path):
    proc, last = start_slow_run(tmp_path)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, timeout=120)
    assert proc.returncode == 143, err[-2000:]
    about_it = [line for line in err.splitlines() if "SIGTERM" in line]
    assert len(about_it) == 1 and about_it[0].startswith("stopped by SIGTERM after step "), err[-2000:]
    assert f"saved {last}" in about_it[0]


def test_a_second_ctrl_c_exits_130_without_saving(tmp_path):
    proc, last = start_slow_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "Ctrl-C: saving a checkpoint after this step")
    proc.send_signal(signal.SIGINT)
    err = finish(proc, timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped = [line for line in error_lines(err) + err.splitlines() if line.startswith("stopped by")]
    assert stopped and stopped[0].startswith(
        "stopped by a second Ctrl-C without saving; the last good checkpoint is "
    ), err[-2000:]
    assert not list(tmp_path.rglob("*.part"))


def test_killing_one_data_parallel_rank_is_one_line_on_the_other(tmp_path):
    proc, _ = start_slow_run(
        tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"
    )
    # Lightning started rank 1 as a child of rank 0; told apart from any other child by its LOCAL_RANK
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(p) == proc.pid]
    rank_one = [int(p.name) for p in children if b"\0LOCAL_RANK=1\0" in b"\0" + environ_of(p)]
    assert len(rank_one) == 1, [p.name for p in children]
    os.kill(rank_one[0], signal.SIGKILL)
    err = finish(proc, timeout=180)
    lines = error_lines(err)
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: another process of this run stopped (") and lines[0].endswith(
        "resume with --ckpt_path last"
    )


def environ_of(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "environ").read_bytes()
    except OSError:
        return b""


def parent_of(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
