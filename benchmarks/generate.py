"""Recurrent generation against full-prefix re-computation, on the same model and prompt, on CPU.

For each size (configs/tiny.yaml, configs/reference.yaml; random weights, float32):
1. bytes/s for `--new_bytes` greedy bytes after a `--prompt_bytes` prompt (tiny Shakespeare), both ways,
   prompt reading included. The full-prefix run is timed byte by byte; where it would take too long
   (reference sizes: about an hour on 2 cores) it is timed at `--baseline_points` evenly spaced context
   lengths and the total is the trapezoid sum over all lengths (its cost depends only on the length).
   When the full-prefix run is complete, the two must produce the same bytes.
2. seconds per new byte at context lengths `--contexts` (100, 1000, 4000), both ways: the recurrent
   cost should stay flat, the full-prefix one grows with the context.

    python benchmarks/generate.py                       # both sizes
    python benchmarks/generate.py --sizes tiny --baseline_points 0   # tiny only, full-prefix run complete
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from measure import full_prefix_generate  # noqa: E402

from bdh_lightning.generate import Generator  # noqa: E402
from bdh_lightning.model import BDH, BDHConfig

REPO = Path(__file__).resolve().parents[1]


def model_from_config(name: str) -> BDH:
    settings = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    fields = ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier")
    torch.manual_seed(0)
    return BDH(BDHConfig(**{k: settings[k] for k in fields}, dropout=0.0)).eval()


def text_bytes(n: int) -> torch.Tensor:
    data = (REPO / "data" / "tinyshakespeare.txt").read_bytes()
    return torch.tensor([list(data[:n])], dtype=torch.long)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@torch.inference_mode()
def recurrent_run(model: BDH, prompt: torch.Tensor, new_bytes: int) -> tuple[float, torch.Tensor]:
    def run():
        return torch.stack(list(Generator(model).generate(prompt, new_bytes, temperature=0.0)), dim=1)

    return timed(run)


@torch.inference_mode()
def full_prefix_seconds_at(model: BDH, context: int, repeats: int = 2) -> float:
    """Seconds for one new byte by re-running the model on a prefix of `context` bytes (best of `repeats`:
    the machine is shared, and other processes only ever add time)."""
    prefix = text_bytes(context)
    return min(timed(lambda: full_prefix_generate(model, prefix, 1))[0] for _ in range(repeats))


@torch.inference_mode()
def recurrent_seconds_at(model: BDH, context: int, steps: int) -> float:
    """Seconds per new byte after a context of `context` bytes has been read."""
    generator = Generator(model)
    generator.prefill(text_bytes(context))
    byte = torch.tensor([32])
    generator.step(byte)  # warm-up
    return timed(lambda: [generator.step(byte) for _ in range(steps)])[0] / steps


def benchmark(name: str, args) -> tuple[list[str], list[str]]:
    model = model_from_config(name)
    c = model.config
    print(f"\n## {name}: L{c.n_layer} D{c.n_embd} H{c.n_head} m{c.mlp_internal_dim_multiplier} (N={c.neurons_per_head}, "
          f"{c.num_parameters:,} parameters)", flush=True)  # fmt: skip
    prompt = text_bytes(args.prompt_bytes)
    full_prefix_generate(model, prompt[:, :8], 1)  # warm-up
    rec_s, rec_bytes = recurrent_run(model, prompt, args.new_bytes)
    print(f"recurrent: {args.new_bytes} bytes in {rec_s:.2f} s", flush=True)

    if args.baseline_points == 0:
        base_s, base_out = timed(lambda: full_prefix_generate(model, prompt, args.new_bytes))
        same = torch.equal(base_out[:, args.prompt_bytes :], rec_bytes)
        how = "measured, whole run"
        print(f"full prefix: {args.new_bytes} bytes in {base_s:.2f} s; same bytes as recurrent: {same}", flush=True)
        assert same, "recurrent and full-prefix greedy generation disagree"
    else:
        first, last = args.prompt_bytes, args.prompt_bytes + args.new_bytes - 1
        points = sorted(
            {round(first + i * (last - first) / (args.baseline_points - 1)) for i in range(args.baseline_points)}
        )
        seconds = [full_prefix_seconds_at(model, t) for t in points]
        for t, s in zip(points, seconds):
            print(f"full prefix: one byte at context {t}: {s:.2f} s", flush=True)
        # Trapezoid over every context length first..last (one byte each).
        base_s = sum((points[i + 1] - points[i]) * (seconds[i] + seconds[i + 1]) / 2 for i in range(len(points) - 1))
        base_s += (seconds[0] + seconds[-1]) / 2
        how = f"estimated from {len(points)} timed bytes"
        print(f"full prefix: {args.new_bytes} bytes in about {base_s:.0f} s ({how})", flush=True)

    rows = [
        f"| {name} | {args.new_bytes / rec_s:.1f} | {args.new_bytes / base_s:.2f} ({how}) | {base_s / rec_s:.0f}× |",
    ]
    context_rows = []
    for context in args.contexts:
        rec = recurrent_seconds_at(model, context, args.steps)
        base = full_prefix_seconds_at(model, context)
        print(f"context {context}: recurrent {1 / rec:.1f} bytes/s, full prefix {1 / base:.3f} bytes/s", flush=True)
        context_rows.append(f"| {name} | {context} | {1 / rec:.1f} | {1 / base:.3f} | {base / rec:.0f}× |")
    return rows, context_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "reference"], help="config names under configs/")
    parser.add_argument("--prompt_bytes", type=int, default=100)
    parser.add_argument("--new_bytes", type=int, default=1000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--steps", type=int, default=20, help="recurrent steps timed at each context length")
    parser.add_argument(
        "--baseline_points", type=int, default=None,
        help="time the full-prefix run at this many context lengths only (0 = the whole run; default: 0 for tiny, 6 otherwise)",
    )  # fmt: skip
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, float32 CPU"
    )
    print(f"load average at start (other processes share the CPU): {os.getloadavg()}")
    totals, contexts = [], []
    requested = args.baseline_points
    for name in args.sizes:
        args.baseline_points = requested if requested is not None else (0 if name == "tiny" else 6)
        rows, context_rows = benchmark(name, args)
        totals += rows
        contexts += context_rows
    print("\n| size | recurrent bytes/s | full-prefix bytes/s | speed-up |\n| --- | --- | --- | --- |")
    print("\n".join(totals))
    print(
        "\n| size | context (bytes) | recurrent bytes/s | full-prefix bytes/s | speed-up |\n| --- | --- | --- | --- | --- |"
    )
    print("\n".join(contexts))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
