"""Tokens per second and memory of a full BDH training step (forward, backward, AdamW) per layer kernel.

    python benchmarks/train_step.py --config configs/tiny.yaml [--device cpu|cuda] [--steps 10] [--rounds 3]

Kernels are timed in interleaved rounds (median step time), so a busy machine slows all of them alike.
Memory: bytes saved for backward (saved_tensors_hooks) and the peak of a real step (CPU: profiler
allocation events; CUDA: max_memory_allocated), next to `estimate`'s prediction. MFU on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdh_lightning.estimate import estimate_memory, format_bytes, measure_step  # noqa: E402
from bdh_lightning.model import BDH, BDHConfig  # noqa: E402
from bdh_lightning.module import BDHLitModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", default="reference,chunked")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per kernel and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, help="Override data.batch_size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = yaml.safe_load(Path(args.config).read_text())
    device = torch.device(args.device)
    batch = args.batch_size or raw["data"]["batch_size"]
    block = raw["data"]["block_size"]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    precision = "bf16-mixed" if autocast else "32-true"
    model_kwargs = raw["model"]
    names = BDHConfig.__dataclass_fields__
    kernels = args.kernels.split(",")
    idx = torch.randint(0, 256, (batch, block + 1), generator=torch.Generator().manual_seed(0)).to(device)

    setups = {}
    for kernel in kernels:
        torch.manual_seed(0)
        config = BDHConfig(**{**{k: v for k, v in model_kwargs.items() if k in names}, "kernel": kernel})
        model = BDH(config).to(device)
        setups[kernel] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(model, optimizer):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(idx[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {kernel: [] for kernel in kernels}
    for kernel in kernels:  # warm up (and create AdamW's state)
        for _ in range(2):
            step(*setups[kernel])
    for _ in range(args.rounds):
        for kernel in kernels:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*setups[kernel])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[kernel].append((time.perf_counter() - start) / args.steps)

    flops = None
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        flops = get_available_flops(device, torch.bfloat16)
    step_flops = BDHLitModule(**model_kwargs).training_flops(batch, block)

    print(f"config {args.config}: batch {batch} x block {block}, {precision}, device {device}"
          f" ({torch.get_num_threads()} threads), torch {torch.__version__}")
    header = f"{'kernel':<10} {'ms/step':>9} {'tokens/s':>10} {'saved for bwd':>14} {'peak':>11} {'predicted peak':>15}"
    print(header + ("   MFU" if flops else ""))
    for kernel in kernels:
        model, optimizer = setups[kernel]
        saved, peak = measure_step(model, optimizer, idx, autocast)
        predicted = estimate_memory(model_kwargs, batch, block, precision, device.type).kernels[kernel].peak_bytes
        seconds = statistics.median(times[kernel])
        row = (f"{kernel:<10} {seconds * 1e3:9.1f} {batch * block / seconds:10.0f} {format_bytes(saved):>14}"
               f" {format_bytes(peak):>11} {format_bytes(predicted):>15}")
        if flops:
            row += f"   {step_flops / seconds / flops:.1%}"
        print(row)
    print("per-round ms/step: " + "; ".join(f"{k} " + ", ".join(f"{t * 1e3:.0f}" for t in times[k]) for k in kernels))


if __name__ == "__main__":
    main()
