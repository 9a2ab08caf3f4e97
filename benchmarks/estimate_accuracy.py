"""How close `estimate` is to real training steps, per precision, kernel and shape (issue 14).

Each row: one real step (forward, cross-entropy, backward, AdamW) of a small BDH, measured by
estimate.measure_step (autograd's saved bytes; the peak from the profiler on the CPU or
max_memory_allocated on CUDA), next to estimate_memory's prediction. Autocast runs as Lightning runs it
(cache_enabled=False). On CUDA it also prints what the process holds beyond its tensors.

    python benchmarks/estimate_accuracy.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from measure import measure_step  # noqa: E402

from bdh_lightning.estimate import estimate_memory  # noqa: E402
from bdh_lightning.model import BDH, BDHConfig  # noqa: E402

SHAPES = [(2, 32, 32, 2, 8, 2, 0), (4, 48, 32, 4, 16, 3, 0), (4, 64, 32, 2, 16, 2, 64), (1, 64, 32, 2, 16, 2, 0)]
CUDA_SHAPES = [(8, 256, 256, 4, 32, 2, 0), (2, 1024, 256, 4, 32, 2, 0), (1, 512, 256, 4, 64, 4, 0)]
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("| precision | kernel | B x T, H, m, L | saved (pred./meas.) | peak (pred./meas.) |")
    print("| --- | --- | --- | --- | --- |")
    for precision, dtype in AUTOCAST.items():
        for kernel in ("reference", "chunked"):
            for B, T, D, H, mult, L, chunk in CUDA_SHAPES if device.type == "cuda" else SHAPES:
                kwargs = dict(n_layer=L, n_embd=D, n_head=H, mlp_internal_dim_multiplier=mult, dropout=0.1, kernel=kernel,
                              chunk_size=chunk)  # fmt: skip
                torch.manual_seed(0)
                model = BDH(BDHConfig(**kwargs)).to(device)
                optimizer = torch.optim.AdamW(model.parameters())
                idx = torch.randint(0, 256, (B, T + 1), device=device)
                measure_step(model, optimizer, idx, dtype)
                saved, peak = measure_step(model, optimizer, idx, dtype)
                predicted = estimate_memory(kwargs, B, T, precision, device.type).kernels[kernel]
                line = (f"| {precision} | {kernel} | {B} x {T}, H{H}, m{mult}, L{L} | {predicted.saved_bytes / saved:.3f} | "
                        f"{predicted.peak_bytes / peak:.3f} |")  # fmt: skip
                if device.type == "cuda":
                    free, total = torch.cuda.mem_get_info()
                    reserved = torch.cuda.max_memory_reserved()
                    line += (f" reserved/allocated {reserved / peak:.3f}, beyond reserved {(total - free - reserved) / 2**20:.0f} MiB,"
                             f" device predicted/used {predicted.device_bytes / (total - free):.3f}")  # fmt: skip
                print(line, flush=True)
                del model, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
