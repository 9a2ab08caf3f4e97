"""`generate` and `estimate`, typed functions: the signature and docstring are the --help (`main.run_command`
builds the parser with jsonargparse); errors are `errors.BDHError`s, printed by main in one line."""

from __future__ import annotations

import codecs
import math
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from .checkpoints import find_last, run_precision
from .cli import parse_settings
from .console import abandon_stdout, format_bytes, say, shown
from .devices import device_memory
from .errors import ResourceError, UsageError, positive_int, sampling_settings, seed_setting, text_bytes
from .estimate import estimate_memory, normalize_precision, render
from .files import output_paths, replace_atomically, temporary_beside, write_failure
from .generate import sample_bytes
from .model import BDHConfig
from .precision import compute_dtype, default_precision
from .weights import load_model_from_checkpoint


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def prompt_bytes(prompt: str | None, prompt_file: str | None) -> bytes:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if prompt_file is not None:
        try:
            data = Path(prompt_file).read_bytes()
        except OSError as error:
            raise UsageError(f"--prompt_file {prompt_file}: cannot read it ({error.strerror or error})") from None
    else:  # bytes the shell passed undecoded (surrogate-escaped) are kept as they were
        data = text_bytes("--prompt", prompt, UsageError) if prompt else b"\n" if prompt is None else b""
    if not data:
        raise UsageError("the prompt is empty; give at least one byte with --prompt or --prompt_file")
    return data


def check_sample_memory(model, num_samples: int, prompt_length: int, chunk_size: int, where: torch.device) -> None:
    """--num_samples runs one batch: refuse, before allocating, a batch whose recurrent state (float32, per
    layer B x H x N x D) and prompt chunk (the N-wide activations and C x C scores) do not fit in memory."""
    c = model.config
    chunk = min(chunk_size, prompt_length)
    per_sample = 4 * (c.n_layer * c.n_head * c.neurons_per_head * c.n_embd
                      + 6 * c.n_head * chunk * c.neurons_per_head + 2 * c.n_head * chunk * chunk)  # fmt: skip
    have, what = device_memory(where)
    if have and num_samples * per_sample > have:
        fits = max(1, have // per_sample // 2)
        raise ResourceError(
            f"--num_samples {num_samples} needs about {format_bytes(num_samples * per_sample)} "
            f"({format_bytes(per_sample)} per sample: the recurrent state and a prompt chunk) but {what} "
            f"{format_bytes(have)}; use at most "
            f"--num_samples {fits}, or a smaller --chunk_size"
        )


def generate_command(
    ckpt_path: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 500,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    precision: Literal["auto", "32", "bf16", "16"] = "auto",
    chunk_size: int = 256,
    logs_dir: str = "lightning_logs",
    output: str | None = None,
    overwrite: bool = False,
    raw: bool = False,
    n_layer: int | None = None,
) -> int:
    """Sample text from a BDH checkpoint with BDH's recurrent form: after the prompt, each new byte updates a
    fixed-size state per layer, so every byte costs the same whatever the context length. The text streams as
    it is produced; invalid UTF-8 and control bytes but newline and tab show as \\xNN (--output or --raw: exact).

    Args:
        ckpt_path: Checkpoint (.ckpt) written by fit, `last` for the newest run's last.ckpt, or weights written
            by export (safetensors, an hf folder) or a reference state_dict (.pt).
        prompt: Text to continue (UTF-8). Default: a newline. Not with --prompt_file.
        prompt_file: Read the prompt's raw bytes from this file instead.
        max_new_tokens: Bytes to generate after the prompt (> 0).
        num_samples: Continuations generated together as one batch (> 0); one streams as it is produced,
            several are printed one after another once done.
        temperature: Divide logits by this before sampling; 0 = greedy (always the most likely byte).
        top_k: Sample only among the k most likely bytes, 1..256 (default: all).
        top_p: Nucleus sampling: only the most likely bytes whose mass reaches top_p, in (0, 1] (1 = off).
        seed: Seed for sampling, 0 to 2**64 - 1; the same seed, checkpoint and arguments give the same text.
        device: cpu, cuda, cuda:N, or auto (cuda when available).
        precision: Compute precision on GPU: auto (the run's trainer.precision from its config.yaml, else 32),
            32, bf16 or 16. Always float32 on CPU; the recurrent state is float32 in every case.
        chunk_size: Prompt bytes read per chunk (> 0): memory grows with its square, not the prompt's.
        logs_dir: Where `--ckpt_path last` looks for version_*/checkpoints/last.ckpt.
        output: Write the exact bytes (prompt and continuation) to this file instead of printing them; with
            several samples, FILE-1.ext, FILE-2.ext, ... Written to a temporary file renamed when complete.
        overwrite: Replace an existing --output file. Without it an existing file is refused.
        raw: Write the exact bytes to standard output (one sample), control bytes included.
        n_layer: Layers, for weights that do not say (a reference state_dict without its .json); the widths
            are read off the weights' shapes. Overrides the file's own setting when given.
    """
    data = prompt_bytes(prompt, prompt_file)
    check_generate_settings(max_new_tokens, num_samples, chunk_size, temperature, top_k, top_p, seed, n_layer)
    paths, where = sample_paths(output, num_samples, overwrite, raw), resolve_device(device)
    source = checkpoint_to_read(ckpt_path, logs_dir, paths)
    model = load_model_from_checkpoint(source, where, settings=None if n_layer is None else {"n_layer": n_layer})
    check_sample_memory(model, num_samples, len(data), chunk_size, where)
    dtype = sampling_dtype(where, precision, source)
    sink = FileSink(paths, data) if paths else RawSink(data) if raw else TextSink(num_samples, data)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=chunk_size)
    seconds = stream_samples(model, sink, data, num_samples, max_new_tokens, seed, dtype, settings)
    total, wrote = max_new_tokens * num_samples, f", written to {', '.join(map(str, paths))}" if paths else ""
    say(f"[{total} bytes in {seconds:.2f} s, {total / seconds:.1f} bytes/s, {where}, {dtype}{wrote}]")
    return 0


def sampling_dtype(where: torch.device, precision: str, source: Path) -> torch.dtype:
    """float32 on the CPU; on a GPU --precision, or with auto the run's trainer.precision (its config.yaml)."""
    if where.type != "cuda":
        return torch.float32
    return compute_dtype((run_precision(source) or "32") if precision == "auto" else precision)


def check_generate_settings(max_new_tokens, num_samples, chunk_size, temperature, top_k, top_p, seed, n_layer) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples), ("chunk_size", chunk_size)):
        positive_int(f"--{name}", value, UsageError)
    sampling_settings("--", temperature, top_k, top_p, UsageError)
    seed_setting("--seed", seed, UsageError)
    if n_layer is not None:
        positive_int("--n_layer", n_layer, UsageError)


def sample_paths(output: str | None, num_samples: int, overwrite: bool, raw: bool) -> list[Path]:
    """Where --output writes: FILE itself for one sample, FILE-1.ext ... FILE-n.ext for several ([] without it)."""
    if raw and output is not None:
        raise UsageError("give --raw (exact bytes to standard output) or --output FILE, not both")
    if raw and num_samples > 1:
        raise UsageError("--raw writes one sample's exact bytes; for several use --output FILE (FILE-1, FILE-2, ...)")
    if output is None:
        if sys.stdout is None:
            raise UsageError("standard output is closed; give --output FILE to write the text to a file")
        return []
    path = Path(output)
    if num_samples == 1:
        return output_paths([path], overwrite)
    return output_paths([path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(num_samples)], overwrite)


def checkpoint_to_read(ckpt_path: str, logs_dir: str, paths: list[Path]) -> Path:
    """The file --ckpt_path names (`last`: found and said), never one that --output would replace."""
    source = find_last(logs_dir) if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path == "last":
        say(f"--ckpt_path last: {source}")
    for path in paths:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise UsageError(f"--output {path} is the checkpoint being read (--ckpt_path); give another --output")
    return source


def stream_samples(model, sink, data: bytes, num_samples: int, max_new_tokens: int, seed, dtype, settings) -> float:
    """Generate into `sink` (closed when done, aborted on any failure); the seconds it took."""
    where = model.encoder.device
    start = time.perf_counter()
    try:
        with torch.autocast(where.type, dtype=dtype, enabled=dtype != torch.float32):
            for byte in sample_bytes(model, data, max_new_tokens, num_samples, seed, **settings):
                sink.add(byte.tolist())
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return time.perf_counter() - start


class TextSink:
    """Standard output as text: UTF-8 decoded (invalid bytes as \\xNN), control bytes escaped; one sample streams,
    several are printed one after another at the end."""

    def __init__(self, num_samples: int, prompt: bytes):
        self.out = sys.stdout
        if hasattr(self.out, "reconfigure"):  # a terminal that is not UTF-8 shows what it cannot print as escapes
            self.out.reconfigure(errors="backslashreplace")
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="backslashreplace") for _ in range(num_samples)]
        self.texts = [shown(decoder.decode(prompt)) for decoder in self.decoders]
        self.streamed = num_samples == 1
        if self.streamed:
            self.write(self.texts[0])

    def write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            raise  # the reader is gone (`| head`): main ends quietly
        except OSError as error:
            abandon_stdout()
            raise write_failure("the generated text to standard output", error, "nothing more was written") from None

    def add(self, values: list[int]) -> None:
        for i, value in enumerate(values):
            piece = shown(self.decoders[i].decode(bytes([value])))
            if self.streamed:
                if piece:
                    self.write(piece)
            else:
                self.texts[i] += piece

    def close(self) -> None:
        tails = [shown(decoder.decode(b"", final=True)) for decoder in self.decoders]  # an unfinished UTF-8 sequence
        if self.streamed:
            self.write(tails[0] + "\n")
        else:
            n = len(self.texts)
            pairs = enumerate(zip(self.texts, tails, strict=True))
            blocks = [f"--- sample {i + 1}/{n} ---\n{text}{tail}\n" for i, (text, tail) in pairs]
            self.write("".join(blocks))

    def abort(self) -> None:
        pass


class RawSink(TextSink):
    """Standard output as bytes: exactly the prompt and the generated bytes, nothing added."""

    def __init__(self, prompt: bytes):
        self.out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
        sys.stdout.flush()
        self.write(prompt)

    def add(self, values: list[int]) -> None:
        self.write(bytes(values))

    def close(self) -> None:
        pass


class FileSink:
    """--output: the exact bytes of each sample to its file, through a temporary file renamed when complete."""

    def __init__(self, paths: list[Path], prompt: bytes):
        self.paths = paths
        # A device or FIFO (/dev/stdout, a named pipe) is written itself: a rename would replace it with a file.
        self.parts = [temporary_beside(path) if is_plain_target(path) else path for path in paths]
        self.files = []
        try:
            for part in self.parts:
                self.files.append(open(part, "wb"))  # noqa: SIM115 -- closed in close() or abort()
                self.files[-1].write(prompt)
        except OSError as error:
            raise self.failed(error) from None

    def failed(self, error: OSError) -> Exception:
        self.abort()
        return write_failure(f"--output {self.paths[0]}", error, "nothing more was written")

    def add(self, values: list[int]) -> None:
        try:
            for file, value in zip(self.files, values, strict=True):
                file.write(bytes([value]))
        except OSError as error:
            raise self.failed(error) from None

    def close(self) -> None:
        try:
            for file, part, path in zip(self.files, self.parts, self.paths, strict=True):
                file.flush()
                if part != path:  # a regular file: on disk before it takes the name (pipes cannot fsync)
                    os.fsync(file.fileno())
                file.close()
                if part != path:
                    replace_atomically(part, path)
        except OSError as error:
            raise self.failed(error) from None

    def abort(self) -> None:
        for file in self.files:
            try:
                file.close()
            except OSError:
                pass
        for part, path in zip(self.parts, self.paths, strict=True):
            if part != path:
                part.unlink(missing_ok=True)


def is_plain_target(path: Path) -> bool:
    """Whether `path` is a regular file or does not exist yet (so it may be written beside and renamed)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True


def estimate_command(
    config: str,
    budget: str | None = None,
    device: Literal["auto", "cuda", "cpu"] = "auto",
    precision: str | None = None,
) -> int:
    """Predict the memory of a BDH training step from a fit config, without training: parameters, bytes of
    weights, gradients and AdamW state, and for each kernel the activation bytes and predicted peak.

    Args:
        config: A fit config (YAML), e.g. configs/14gb.yaml.
        budget: Memory to fit in, e.g. 14GB (10^9 bytes), 14GiB or 8e9; adds whether each kernel fits and
            the largest batch that would. Default: this machine's (the GPU's memory, or the available RAM).
        device: Where the run will train: auto (this machine: cuda when available, else cpu), cuda or cpu.
        precision: Override trainer.precision (default: the config's, else what fit picks for the device:
            bf16-mixed on a GPU that has bfloat16, 32-true on the CPU).
    """
    if not Path(config).is_file():
        raise UsageError(f"--config {config}: no such file")
    settings = parse_settings(["--config", config])
    model_kwargs = dict(vars(settings.model))
    batch = positive_int("data.batch_size", settings.data.batch_size)  # the same rules as fit's, before any arithmetic
    block = positive_int("data.block_size", settings.data.block_size)
    accumulate = settings.trainer.get("accumulate_grad_batches")
    if accumulate is not None:
        positive_int("trainer.accumulate_grad_batches", accumulate)
    BDHConfig.from_dict(model_kwargs)  # model.* checked as fit checks them
    here = device == "auto" or (device == "cuda") == torch.cuda.is_available()  # predicting for this machine
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    chosen = precision or settings.trainer.precision
    if chosen is None:
        chosen = default_precision() if here else ("bf16-mixed" if target == "cuda" else "32-true")
    name = normalize_precision(chosen)
    limit = parse_bytes(budget) if budget else None
    if limit is None and here:
        limit, _ = device_memory(torch.device(target))
    print(f"predicting for {'this machine: ' if here else ''}{target}, precision {name}")
    print(render(estimate_memory(model_kwargs, batch, block, name, target), model_kwargs, limit))
    return 0


# --budget's units: decimal (GB = 10^9) and binary (GiB = 2^30).
BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """--budget: '14GB' (10^9), '14GiB' (2^30), '512MB', '8e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in BYTE_UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"--budget {text!r} is not a size; write it like 14GB, 14GiB or 8e9 (bytes)")
    size = float(match.group(1)) * BYTE_UNITS[match.group(2).upper()]
    if not math.isfinite(size):  # 1e400
        raise UsageError(f"--budget {text!r} is not a finite size; write it like 14GB, 14GiB or 8e9 (bytes)")
    return int(size)
