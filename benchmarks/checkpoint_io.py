"""Cost of the crash-safety pieces on a checkpoint of the default BDH (25.3 M parameters + AdamW state, ~300 MB).

    python benchmarks/checkpoint_io.py [--dir DIR]

Each writer runs in a fresh process so its peak memory (ru_maxrss) is its own. Prints one line per measurement.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def default_checkpoint() -> dict:
    """What Lightning saves for the default BDH: weights plus AdamW's two moments per parameter."""
    from bdh_lightning.model import BDH, BDHConfig

    model = BDH(BDHConfig())
    params = dict(model.named_parameters())
    state = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(params.values())
    }
    return {
        "global_step": 10,
        "state_dict": {f"model.{k}": v.detach() for k, v in params.items()},
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(state)}]}],
    }


def write(kind: str, path: str) -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    from bdh_lightning.checkpoints import AtomicCheckpointIO

    checkpoint = default_checkpoint()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    io = AtomicCheckpointIO() if kind == "atomic" else TorchCheckpointIO()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        times.append(time.perf_counter() - start)
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    size = os.path.getsize(path) / 2**20
    print(f"{kind:>9} write of {size:.0f} MB: best {min(times):.2f} s of 3, extra peak memory {extra:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--write", choices=["atomic", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        return write(args.write, args.path)

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "last.ckpt")
        for kind in ("lightning", "atomic"):
            subprocess.run([sys.executable, __file__, "--write", kind, "--path", path], check=True)

        from bdh_lightning.checkpoints import read_checkpoint

        for name, load in (("read_checkpoint (weights_only, mmap)", read_checkpoint),
                           ("torch.load (weights_only, full read)", lambda p: torch.load(p, weights_only=True))):  # fmt: skip
            times = []
            for _ in range(3):
                start = time.perf_counter()
                load(path)
                times.append(time.perf_counter() - start)
            print(f"{name}: best {min(times):.3f} s of 3")

        from bdh_lightning.faults import StopOnNonFinite

        checkpoint = {"state_dict": {k: v.clone() for k, v in read_checkpoint(path)["state_dict"].items()}}
        trainer = argparse.Namespace(global_step=10)
        start = time.perf_counter()
        for _ in range(3):
            StopOnNonFinite().on_save_checkpoint(trainer, None, checkpoint)
        print(
            f"finite-weights check before a save (25.3 M parameters): {(time.perf_counter() - start) / 3 * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
