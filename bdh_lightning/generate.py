"""Generation: BDH's recurrent form, sampling, checkpoint loading and the `generate` command.

BDH's attention has no softmax, so it is linear (spec, "The recurrent form"): per layer and head a state
M (N x D) sums q_s x_sᵀ over the positions read so far, and position t reads y_t = ln(q_t M) before
adding its own q_t x_tᵀ. Each new byte then costs the same whatever the context length. A prompt is read
chunk by chunk: within a chunk the strictly-lower q qᵀ x of the parallel form, plus q M for the earlier
chunks, so a long prompt needs memory linear in its length.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F

from .checkpoints import find_last, load_model_from_checkpoint, run_precision
from .layer import layer_norm, reference_layer, rope_cos_sin
from .errors import CheckpointError, ConfigError, UsageError
from .model import BDH
from .precision import compute_dtype


def recurrent_read(state: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The attention read of a chunk q (B, H, C, N), x (B, 1, C, D) against the running state M (B, H, N, D):
    y = ln(q M + strict_lower(q qᵀ) x), then M += qᵀ x in place. The same function as `layer.causal_attention`
    over everything read so far.

    In float32 whatever the autocast: sums of scores in the hundreds overflow float16, and the state
    accumulates every position.
    """
    B, H, C, N = q.shape
    D = x.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        q32, x32 = q.float(), x.float()
        y = q32 @ state  # what the earlier chunks contribute
        if C > 1:
            y = y + (q32 @ q32.transpose(-1, -2)).tril(diagonal=-1) @ x32  # within the chunk, strictly causal
        # M += qᵀ x (one (N x C) @ (C x D) per batch row and head).
        state.view(B * H, N, D).baddbmm_(q32.transpose(-1, -2).reshape(B * H, N, C), x32.expand(B, H, C, D).reshape(B * H, C, D))
        return layer_norm(y)


class Generator:
    """Generates from a `BDH` with a fixed-size state per layer: `states[l]` is (B, H, N, D), float32.

    `position` is the absolute position of the next byte. Call under torch.no_grad/inference_mode (the
    `generate` method does); wrap in torch.autocast to compute the N-wide products in lower precision (the
    state and the attention read stay float32).
    """

    def __init__(self, model: BDH, batch_size: int = 1):
        self.model = model
        c = model.config
        device = model.encoder.device
        shape = (batch_size, c.n_head, c.neurons_per_head, c.n_embd)
        self.states = [torch.zeros(shape, device=device, dtype=torch.float32) for _ in range(c.n_layer)]
        self.position = 0

    def forward_chunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Read bytes idx (B, C) at the next C positions, update the states; next-byte logits (B, C, V)."""
        m = self.model
        cos, sin = rope_cos_sin(torch.arange(self.position, self.position + idx.shape[1], device=idx.device), m.config.neurons_per_head)
        x = m.embed_bytes(idx)  # B, 1, C, D
        for state in self.states:
            x = reference_layer(x, m.encoder, m.encoder_v, m.decoder, cos, sin, read=partial(recurrent_read, state))
        self.position += idx.shape[1]
        return m.logits(x)

    def prefill(self, idx: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """Read a prompt (B, T) chunk by chunk; logits (B, V) for the byte after it."""
        for start in range(0, idx.shape[1], chunk_size):
            logits = self.forward_chunk(idx[:, start : start + chunk_size])
        return logits[:, -1]

    def step(self, byte: torch.Tensor) -> torch.Tensor:
        """Read one byte per row (B,); logits (B, V) for the byte after it."""
        return self.forward_chunk(byte.view(-1, 1))[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        chunk_size: int = 256,
    ) -> Iterator[torch.Tensor]:
        """Read prompt (B, T), then yield max_new_tokens new bytes, each a (B,) tensor, as they are sampled."""
        logits = self.prefill(prompt, chunk_size)
        for i in range(max_new_tokens):
            byte = sample_next(logits, temperature, top_k, top_p, generator)
            yield byte
            if i + 1 < max_new_tokens:
                logits = self.step(byte)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One byte per row of logits (B, V): argmax at temperature 0, else sampled after top-k and top-p."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the most likely bytes until their mass reaches top_p (the most likely one always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_text(
    model: BDH,
    prompt: bytes,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    chunk_size: int = 256,
) -> list[bytes]:
    """The new bytes of `num_samples` continuations of `prompt` (used by the training callbacks)."""
    device = model.encoder.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    idx = torch.tensor(list(prompt), dtype=torch.long, device=device).expand(num_samples, -1)
    new = list(Generator(model, num_samples).generate(idx, max_new_tokens, temperature, top_k, top_p, generator, chunk_size))
    return [bytes(row) for row in torch.stack(new, dim=1).tolist()]


def full_prefix_generate(model: BDH, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation the plain way, re-running `BDH.forward` on the whole prefix for every byte.

    The baseline of `benchmarks/generate.py`: O(T) work per byte, O(n²) for n bytes. Returns (B, T + n).
    """
    idx = prompt
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            next_byte = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_byte), dim=1)
    return idx


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see generate --help)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bdh_lightning generate",
        description="Sample text from a BDH checkpoint. The prompt is read in chunks, then every new byte updates a "
        "fixed-size state per layer (BDH's recurrent form), so each byte costs the same whatever the context length. "
        "The prompt and continuation are printed as they are produced; bytes that are not valid UTF-8 are shown as \\xNN.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Checkpoint (.ckpt) written by fit, or `last` for the newest run's last.ckpt.")
    parser.add_argument("--logs_dir", default="lightning_logs", help="Where `--ckpt_path last` looks for version_*/checkpoints/last.ckpt.")
    parser.add_argument("--prompt", default=None, help='Text to continue (UTF-8). Default: a newline. Not with --prompt_file.')
    parser.add_argument("--prompt_file", default=None, help="Read the prompt's raw bytes from this file instead.")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="Bytes to generate after the prompt (> 0).")
    parser.add_argument("--num_samples", type=int, default=1, help="Continuations generated together as one batch (> 0). One sample is streamed as it is produced; several are printed one after another once done.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Divide logits by this before sampling; 0 = greedy (always the most likely byte).")
    parser.add_argument("--top_k", type=int, default=None, help="Sample only among the k most likely bytes, 1..256 (default: all).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling: only the most likely bytes whose mass reaches top_p, in (0, 1] (1 = off).")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling; the same seed, checkpoint and arguments give the same text.")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available).")
    parser.add_argument(
        "--precision",
        default="auto",
        help="Compute precision on GPU: auto (the run's trainer.precision from its config.yaml, else 32), 32, bf16 or 16. "
        "Always float32 on CPU. The recurrent state is float32 in every case.",
    )
    parser.add_argument("--chunk_size", type=int, default=256, help="Prompt bytes read per chunk (> 0): memory grows with its square, not the prompt's.")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if args.prompt_file is not None:
        try:
            args.prompt_bytes = Path(args.prompt_file).read_bytes()
        except OSError as error:
            raise UsageError(f"--prompt_file {args.prompt_file}: cannot read it ({error.strerror or error})") from None
    else:
        args.prompt_bytes = ("\n" if args.prompt is None else args.prompt).encode("utf-8", errors="surrogateescape")
    if not args.prompt_bytes:
        raise UsageError("the prompt is empty; give at least one byte with --prompt or --prompt_file")
    for name in ("max_new_tokens", "num_samples", "chunk_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.top_k is not None and not 1 <= args.top_k <= 256:
        raise UsageError(f"--top_k must be in 1..256 (there are 256 bytes), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not args.temperature >= 0.0:  # also rejects nan
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.precision not in ("auto", "32", "bf16", "16"):
        raise UsageError(f"--precision must be auto, 32, bf16 or 16, got {args.precision}")
    args.device = resolve_device(args.device)
    return args


def resolve_device(name: str) -> torch.device:
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


def main(argv: list[str] | None = None) -> int:
    """`python -m bdh_lightning generate ...`: 0 on success, 2 with one line on stderr for a user mistake."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
        ckpt_path = find_last(args.logs_dir) if args.ckpt_path == "last" else Path(args.ckpt_path)
        model = load_model_from_checkpoint(ckpt_path, args.device)
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    precision = "32"
    if args.device.type == "cuda":
        precision = (run_precision(ckpt_path) or "32") if args.precision == "auto" else args.precision
    dtype = compute_dtype(precision)

    generator = torch.Generator(device=args.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    prompt = torch.tensor(list(args.prompt_bytes), dtype=torch.long, device=args.device).expand(args.num_samples, -1)
    streamed = args.num_samples == 1
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="backslashreplace") for _ in range(args.num_samples)]
    texts = [decoder.decode(args.prompt_bytes) for decoder in decoders]
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a terminal that is not UTF-8 shows what it cannot print as escapes
        out.reconfigure(errors="backslashreplace")
    if streamed:
        out.write(texts[0])
        out.flush()

    start = time.perf_counter()
    try:
        with torch.autocast(args.device.type, dtype=dtype, enabled=dtype != torch.float32):
            new_bytes = Generator(model, args.num_samples).generate(
                prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator, args.chunk_size
            )
            for byte in new_bytes:
                for i, value in enumerate(byte.tolist()):
                    piece = decoders[i].decode(bytes([value]))
                    texts[i] += piece
                    if streamed and piece:
                        out.write(piece)
                        out.flush()
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    tails = [decoder.decode(b"", final=True) for decoder in decoders]  # an unfinished UTF-8 sequence, shown
    texts = [text + tail for text, tail in zip(texts, tails)]
    if streamed:
        out.write(tails[0] + "\n")
    else:
        for i, text in enumerate(texts):
            out.write(f"--- sample {i + 1}/{args.num_samples} ---\n{text}\n")
    out.flush()
    total = args.max_new_tokens * args.num_samples
    print(f"[{total} bytes in {seconds:.2f} s, {total / seconds:.1f} bytes/s, {args.device}, {dtype}]", file=sys.stderr)
    return 0
