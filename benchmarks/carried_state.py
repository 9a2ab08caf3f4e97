"""Carried state against random windows (issue 20): validation bits/byte at equal steps and equal bytes seen.

    python benchmarks/carried_state.py --steps 150 --seeds 1 2 3 --batch 4 --block 128

Trains the 8gb config's model (L4 D192 H4 m64) on the bundled tiny Shakespeare three ways per seed:
random windows (the reference's sampling), streams without carried state, and streams with carried state;
the same steps, batch and block, so the same bytes seen. Reports for each run the window-local val/bpb
(random validation windows) and, on the same contiguous validation streams, the carried and window-local
figures; and the step time of each mode. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bdh_lightning.cli import BDHCLI  # noqa: E402
from bdh_lightning.console import quiet  # noqa: E402

MODEL = (
    "--model.n_layer 4 --model.n_embd 192 --model.n_head 4 --model.mlp_internal_dim_multiplier 64 "
    "--model.dropout 0.1 --model.learning_rate 1e-3"
).split()
MODES = {
    "random windows": ["--data.sampling", "windows"],
    "streams, no state": ["--data.sampling", "streams"],
    "streams, carried state": ["--data.sampling", "streams", "--model.carry_state", "true"],
}


def run(mode: str, seed: int, args, root: Path) -> dict:
    start = time.perf_counter()
    cli = BDHCLI(
        args=[
            "fit",
            "--data.path",
            str(REPO / "data" / "tinyshakespeare.txt"),
            *MODEL,
            *MODES[mode],
            "--data.batch_size",
            str(args.batch),
            "--data.block_size",
            str(args.block),
            "--data.val_windows",
            "32",
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.val_check_interval",
            str(args.steps),
            "--trainer.log_every_n_steps",
            "50",
            "--trainer.enable_progress_bar",
            "false",
            "--sample.length",
            "0",
            "--sparsity.max_batches",
            "1",
            "--seed_everything",
            str(seed),
            "--data.seed",
            str(seed),
            "--model.carry_state",
            "true" if "carried" in mode else "false",
            "--trainer.default_root_dir",
            str(root / f"{mode}-{seed}"),
        ]
    )
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    module = cli.model
    if not module.hparams.carry_state:  # the same stream figures for the runs that did not carry
        carried, windowed = module.to("cpu").eval().stream_validation()
        metrics["val/bpb_carried"], metrics["val/bpb_windowed"] = (
            carried / 0.6931471805599453,
            windowed / 0.6931471805599453,
        )
    return {"seconds": seconds, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    quiet()
    warnings.simplefilter("ignore")
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for mode in MODES:
                results[mode].append(run(mode, seed, args, Path(folder)))
                print(mode, seed, results[mode][-1], flush=True)
    print(
        f"\n{args.steps} steps x {args.batch} windows x {args.block} bytes, seeds {args.seeds}, "
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n"
    )
    print(
        "| mode | val/bpb (random windows) | val/bpb on streams, window-local | val/bpb on streams, carried | s/run |"
    )
    print("| --- | --- | --- | --- | --- |")
    for mode, runs in results.items():
        cells = []
        for key in ("val/bpb", "val/bpb_windowed", "val/bpb_carried", "seconds"):
            values = [r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
