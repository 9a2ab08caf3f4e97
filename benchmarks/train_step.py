"""Time and memory of a full BDH training step (forward, backward, AdamW) per layer kernel, eager and compiled.

    python benchmarks/train_step.py --config configs/tiny.yaml [--device cpu|cuda] [--kernels reference,chunked]
        [--modes eager,compiled] [--precision 32-true] [--batch_size B] [--steps 10] [--rounds 3] [--json out.json]

Each (kernel, mode) is built from the same seed; the first two steps are the warm-up (for `compiled`, the
first step's time minus a warm step's is the compile time). Timed steps run in interleaved rounds (median
step time), so a busy machine slows every setup alike. Memory: the peak of a real step (CPU: profiler
allocation events; CUDA: max_memory_allocated) next to `estimate`'s prediction, and for eager runs the bytes
saved for backward (saved_tensors_hooks). MFU on CUDA (bdh_lightning/throughput.py's dense peaks).
benchmarks/gpu_suite.py runs these functions for every config, kernel and precision on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from measure import measure_peak_bytes, measure_step, tensor_bytes  # noqa: E402

from bdh_lightning.console import format_bytes  # noqa: E402
from bdh_lightning.estimate import estimate_memory  # noqa: E402
from bdh_lightning.model import BDH, BDHConfig  # noqa: E402
from bdh_lightning.module import BDHLitModule  # noqa: E402
from bdh_lightning.precision import precision as precision_row  # noqa: E402


def read_config(path: str | Path) -> tuple[dict, int, int]:
    """(model settings, batch size, block size) of a YAML config."""
    raw = yaml.safe_load(Path(path).read_text())
    return dict(raw.get("model") or {}), int(raw["data"]["batch_size"]), int(raw["data"]["block_size"])


@dataclass
class Setup:
    kernel: str
    mode: str  # eager or compiled, and "-carried": windows continuing streams with the state (model.carry_state)
    model: BDH
    optimizer: torch.optim.Optimizer
    step: callable  # one training step on the benchmark's bytes
    states: list | None = None  # "-carried": each layer's state, as the module keeps it between steps


def build(
    model_kwargs: dict, kernel: str, mode: str, idx: torch.Tensor, precision: str, backend: str = "inductor"
) -> Setup:
    """A model, its AdamW and a step function as a Lightning run at `precision` would train it
    (`compiled`: the forward through torch.compile with `backend`, as model.compile: true does)."""
    row = precision_row(precision)
    device = idx.device
    torch.manual_seed(0)
    config = BDHConfig.from_dict({**model_kwargs, "kernel": kernel})
    model = BDH(config).to(device)
    if not row.autocast:
        model = model.to(row.compute_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    carried = mode.endswith("-carried")
    if mode.startswith("compiled"):
        model.forward = torch.compile(model.forward, backend=backend)
        model.forward_stream = torch.compile(model.forward_stream, backend=backend)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" and device.type == "cuda" else None
    B, T = idx.shape[0], idx.shape[1] - 1
    states: list = []
    position = [torch.full((B,), T, device=device)]  # every row one window into its stream, then onwards

    def step() -> None:
        # Lightning's mixed precision: autocast without a cast cache.
        with torch.autocast(device.type, dtype=row.compute_dtype, enabled=row.autocast, cache_enabled=False):
            if carried:
                logits, written = model.forward_stream(idx[:, :-1], position[0], states or None)
                states[:] = [state.detach() for state in written]
                position[0] = position[0] + T
            else:
                logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Setup(kernel, mode, model, optimizer, step, states if carried else None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Result:
    config: str
    kernel: str
    mode: str
    precision: str
    device: str
    batch: int
    block: int
    ms_per_step: float
    tokens_per_s: float
    first_step_s: float  # includes the compilation for `compiled`
    compile_s: float | None
    peak_bytes: int | None
    saved_bytes: int | None
    predicted_peak_bytes: int
    mfu: float | None
    rounds_ms: list


def measure_setups(setups: list[Setup], idx: torch.Tensor, steps: int, rounds: int, deadline: float | None = None):
    """Warm-up and interleaved timing rounds: {(kernel, mode): (first step s, [seconds per step per round])}.
    Stops adding rounds at `deadline` (time.monotonic()) once every setup has one."""
    device = idx.device
    first = {}
    for s in setups:
        first[(s.kernel, s.mode)] = timed(s.step, device)
        print(f"{s.kernel}/{s.mode}: first step {first[(s.kernel, s.mode)]:.1f} s", file=sys.stderr, flush=True)
        s.step()  # a second warm step: AdamW's state exists, autotuning and recompiles are done
    times = {(s.kernel, s.mode): [] for s in setups}
    for r in range(rounds):
        if r and deadline is not None and time.monotonic() > deadline:
            break
        for s in setups:
            times[(s.kernel, s.mode)].append(timed(lambda: [s.step() for _ in range(steps)], device) / steps)
            print(f"{s.kernel}/{s.mode}: round {r + 1} {times[(s.kernel, s.mode)][-1] * 1e3:.0f} ms/step", file=sys.stderr,
                  flush=True)  # fmt: skip
    return first, times


def memory_of(setup: Setup, idx: torch.Tensor, autocast_dtype) -> tuple[int | None, int]:
    """(bytes saved for backward or None, peak bytes) of one more step."""
    if setup.mode.startswith("eager"):
        return measure_step(setup.model, setup.optimizer, idx, autocast_dtype, states=setup.states)
    state = [t for s in setup.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    live = tensor_bytes(setup.model.parameters()) + tensor_bytes(state) + tensor_bytes([idx, *(setup.states or [])])
    return None, measure_peak_bytes(setup.step, idx.device, live)


def run(config_path, model_kwargs, batch, block, device, kernels, modes, precision, steps, rounds, deadline=None):
    """Every (kernel, mode) at one config: a list of Result."""
    from bdh_lightning.throughput import device_peak_flops

    idx = torch.randint(0, 256, (batch, block + 1), generator=torch.Generator().manual_seed(0)).to(device)
    setups = [build(model_kwargs, k, m, idx, precision) for k in kernels for m in modes]
    first, times = measure_setups(setups, idx, steps, rounds, deadline)
    row = precision_row(precision)
    peak_flops, _ = device_peak_flops(device, precision)
    step_flops = BDHLitModule(**model_kwargs).training_flops(batch, block)
    results = []
    for s in setups:
        seconds = statistics.median(times[(s.kernel, s.mode)])
        saved, peak = memory_of(s, idx, row.compute_dtype if row.autocast else None)
        settings = {**model_kwargs, "kernel": s.kernel, "carry_state": s.states is not None}
        predicted = estimate_memory(settings, batch, block, precision, device.type).kernels[s.kernel].peak_bytes
        first_s = first[(s.kernel, s.mode)]
        results.append(Result(
            str(config_path), s.kernel, s.mode, precision, str(device), batch, block, seconds * 1e3, batch * block / seconds,
            first_s, first_s - seconds if s.mode.startswith("compiled") else None, peak, saved, predicted,
            step_flops / seconds / peak_flops if peak_flops else None, [t * 1e3 for t in times[(s.kernel, s.mode)]],
        ))  # fmt: skip
    return results


def markdown(results: list[Result]) -> str:
    lines = [
        "| config | batch x block | precision | kernel | mode | ms/step | tokens/s | compile s | peak | predicted peak | MFU |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        peak = format_bytes(r.peak_bytes) if r.peak_bytes is not None else "-"
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        lines.append(f"| {Path(r.config).stem} | {r.batch} x {r.block} | {r.precision} | {r.kernel} | {r.mode} | "
                     f"{r.ms_per_step:.1f} | {r.tokens_per_s:,.0f} | {compile_s} | {peak} | "
                     f"{format_bytes(r.predicted_peak_bytes)} | {mfu} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", default="reference,chunked")
    parser.add_argument(
        "--modes",
        default="eager,compiled",
        help="eager, compiled, and eager-carried / compiled-carried (windows carrying the state, model.carry_state)",
    )
    parser.add_argument("--precision", help="Lightning precision (default: bf16-mixed on CUDA, 32-true on the CPU)")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per setup and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, help="Override data.batch_size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", help="Also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    model_kwargs, batch, block = read_config(args.config)
    batch = args.batch_size or batch
    results = run(args.config, model_kwargs, batch, block, device, args.kernels.split(","), args.modes.split(","),
                  precision, args.steps, args.rounds)  # fmt: skip
    print(f"{args.config}: batch {batch} x block {block}, {precision}, device {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")  # fmt: skip
    print(markdown(results))
    print("per-round ms/step: " + "; ".join(f"{r.kernel}/{r.mode} " + ", ".join(f"{t:.0f}" for t in r.rounds_ms)
                                            for r in results))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
