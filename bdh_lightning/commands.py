"""The subcommands beside fit/validate/test, each a typed function: its signature and docstring are its --help.

`main.py` builds each parser from the signature with jsonargparse and calls the function; errors are
`errors.BDHError`s, printed there in one line.
"""

from __future__ import annotations

import codecs
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from .checkpoints import find_last, load_model_from_checkpoint, run_precision
from .cli import parse_settings
from .errors import UsageError, positive_int, sampling_settings
from .estimate import estimate_memory, normalize_precision, parse_bytes, render
from .generate import Generator
from .console import device_memory
from .precision import compute_dtype, default_precision


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
    else:
        data = ("\n" if prompt is None else prompt).encode("utf-8", errors="surrogateescape")
    if not data:
        raise UsageError("the prompt is empty; give at least one byte with --prompt or --prompt_file")
    return data


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
) -> int:
    """Sample text from a BDH checkpoint with BDH's recurrent form: the prompt is read in chunks, then each new
    byte updates a fixed-size state per layer, so every byte costs the same whatever the context length. The
    text streams as it is produced; bytes that are not valid UTF-8 show as \\xNN.

    Args:
        ckpt_path: Checkpoint (.ckpt) written by fit, or `last` for the newest run's last.ckpt.
        prompt: Text to continue (UTF-8). Default: a newline. Not with --prompt_file.
        prompt_file: Read the prompt's raw bytes from this file instead.
        max_new_tokens: Bytes to generate after the prompt (> 0).
        num_samples: Continuations generated together as one batch (> 0); one streams as it is produced,
            several are printed one after another once done.
        temperature: Divide logits by this before sampling; 0 = greedy (always the most likely byte).
        top_k: Sample only among the k most likely bytes, 1..256 (default: all).
        top_p: Nucleus sampling: only the most likely bytes whose mass reaches top_p, in (0, 1] (1 = off).
        seed: Seed for sampling; the same seed, checkpoint and arguments give the same text.
        device: cpu, cuda, cuda:N, or auto (cuda when available).
        precision: Compute precision on GPU: auto (the run's trainer.precision from its config.yaml, else 32),
            32, bf16 or 16. Always float32 on CPU; the recurrent state is float32 in every case.
        chunk_size: Prompt bytes read per chunk (> 0): memory grows with its square, not the prompt's.
        logs_dir: Where `--ckpt_path last` looks for version_*/checkpoints/last.ckpt.
    """
    data = prompt_bytes(prompt, prompt_file)
    for name in ("max_new_tokens", "num_samples", "chunk_size"):
        positive_int(f"--{name}", locals()[name], UsageError)
    sampling_settings("--", temperature, top_k, top_p, UsageError)
    where = resolve_device(device)
    path = find_last(logs_dir) if ckpt_path == "last" else Path(ckpt_path)
    model = load_model_from_checkpoint(path, where)
    run = "32"
    if where.type == "cuda":
        run = (run_precision(path) or "32") if precision == "auto" else precision
    dtype = compute_dtype(run)

    generator = torch.Generator(device=where)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    idx = torch.tensor(list(data), dtype=torch.long, device=where).expand(num_samples, -1)
    streamed = num_samples == 1
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="backslashreplace") for _ in range(num_samples)]
    texts = [decoder.decode(data) for decoder in decoders]
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a terminal that is not UTF-8 shows what it cannot print as escapes
        out.reconfigure(errors="backslashreplace")
    if streamed:
        out.write(texts[0])
        out.flush()

    start = time.perf_counter()
    with torch.autocast(where.type, dtype=dtype, enabled=dtype != torch.float32):
        new_bytes = Generator(model, num_samples).generate(idx, max_new_tokens, temperature, top_k, top_p, generator, chunk_size)
        for byte in new_bytes:
            for i, value in enumerate(byte.tolist()):
                piece = decoders[i].decode(bytes([value]))
                texts[i] += piece
                if streamed and piece:
                    out.write(piece)
                    out.flush()
    seconds = time.perf_counter() - start
    tails = [decoder.decode(b"", final=True) for decoder in decoders]  # an unfinished UTF-8 sequence, shown
    texts = [text + tail for text, tail in zip(texts, tails)]
    if streamed:
        out.write(tails[0] + "\n")
    else:
        for i, text in enumerate(texts):
            out.write(f"--- sample {i + 1}/{num_samples} ---\n{text}\n")
    out.flush()
    total = max_new_tokens * num_samples
    print(f"[{total} bytes in {seconds:.2f} s, {total / seconds:.1f} bytes/s, {where}, {dtype}]", file=sys.stderr)
    return 0


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
    batch, block = int(settings.data.batch_size), int(settings.data.block_size)
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
