"""The data path at scale: start-up and memory by file count, windows/s against a training step, prepare's bytes/s.

    python benchmarks/data_path.py startup --files 100 100000     # start-up time and peak RSS, fresh process each
    python benchmarks/data_path.py windows                        # windows/s of the data path vs a training step
    python benchmarks/data_path.py prepare --mb 200               # prepare's bytes/s (files, and one .jsonl)

Corpora are generated under --scratch (default /tmp/bdh_data_bench) and kept for re-runs. `startup` runs
each measurement in a fresh Python process: the time to build ByteDataModule(directory) (listing, one stat
and one open per file) and draw the first batch, and the process's peak RSS (ru_maxrss) against the same
process just before (imports done). `--old REV` measures data.py as it was at git revision REV too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"tiny": (16, 128), "14gb": (16, 384)}  # (data.batch_size, data.block_size) of configs/tiny.yaml, 14gb.yaml


def make_files(folder: Path, count: int, size: int = 1000) -> Path:
    """`count` files of `size` random lowercase bytes in subfolders of 1000 (made once)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.txt").write_bytes(rng.integers(97, 123, size=size, dtype=np.uint8).tobytes())
    done.write_text("")
    return folder


def make_big_file(path: Path, mb: int) -> Path:
    if not path.exists() or path.stat().st_size != mb << 20:
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(rng.integers(97, 123, size=1 << 20, dtype=np.uint8).tobytes())
    return path


STARTUP_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[3] != "-":
    import importlib.util
    spec = importlib.util.spec_from_file_location("bdh_lightning.data_old", sys.argv[3])
    import bdh_lightning.errors, bdh_lightning.streaming  # noqa: F401  (what the old module imports)
    data = importlib.util.module_from_spec(spec); spec.loader.exec_module(data)
else:
    from bdh_lightning import data
import torch, lightning  # noqa: F401
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
error = None
try:
    dm = data.ByteDataModule(sys.argv[2], block_size=128, batch_size=16)
    built = time.perf_counter() - start
    next(iter(dm.train_dataloader()))
except Exception as e:  # the old code's failure at many files is a result here
    built, error = None, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
total = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"built_s": built, "first_batch_s": total, "rss_before_mb": before / 1024, "rss_peak_mb": after / 1024,
                  "error": error}))
"""


def startup(args) -> None:
    old_file = "-"
    versions = [("this", "-")]
    if args.old:
        old_file = str(Path(args.scratch) / f"data_{args.old}.py")
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{args.old}:bdh_lightning/data.py"], capture_output=True, check=True
        )
        Path(old_file).write_bytes(source.stdout.replace(b"from .errors", b"from bdh_lightning.errors"))
        versions.append((args.old, old_file))
    for count in args.files:
        folder = make_files(Path(args.scratch) / f"files_{count}", count)
        for name, module_file in versions:
            rounds = []
            for _ in range(args.rounds):
                out = subprocess.run(
                    [sys.executable, "-c", STARTUP_CHILD, str(REPO), str(folder), module_file],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = min(rounds, key=lambda r: r["first_batch_s"])
            if best["error"]:
                print(f"{count:>7} files  {name:>8}: {best['error']}")
                continue
            print(
                f"{count:>7} files  {name:>8}: build {best['built_s']:.3f} s, to first batch "
                f"{best['first_batch_s']:.3f} s "
                f"(best of {args.rounds}); peak RSS {best['rss_peak_mb']:.0f} MB, "
                f"{best['rss_peak_mb'] - best['rss_before_mb']:+.1f} MB "
                f"over the process after imports ({best['rss_before_mb']:.0f} MB)"
            )


def time_batches(loader, batches: int, warmup: int = 5) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def step_seconds(config: str, batch: int, steps: int) -> float:
    """Median seconds of a full training step (forward, backward, AdamW) of `config` at `batch` on the CPU."""
    import statistics

    import torch
    import torch.nn.functional as F
    import yaml

    from bdh_lightning.model import BDH, BDHConfig

    raw = yaml.safe_load((REPO / config).read_text())
    names = BDHConfig.__dataclass_fields__
    model = BDH(BDHConfig(**{k: v for k, v in raw["model"].items() if k in names}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    block = raw["data"]["block_size"]
    idx = torch.randint(0, 256, (batch, block + 1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def windows(args) -> None:
    import torch

    from bdh_lightning.data import ByteDataModule
    from bdh_lightning.data.prepare import PrepareData, prepare_command

    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    big = make_big_file(scratch / "corpus_256mb.txt", 256)
    many = make_files(scratch / "files_100000", 100_000)
    documents = make_files(scratch / "files_256x1mb", 256, size=1 << 20)
    steps = {"tiny": ("configs/tiny.yaml", 16), "14gb": ("configs/14gb.yaml", 1)}
    for shape, (batch, block) in SHAPES.items():
        # Prepared from 256 documents of 1 MB (a single file would be one document, all in one split).
        prepared = scratch / f"prepared_256x1mb_{block}"
        if not (prepared / "bdh_prepared.json").exists():
            prepare_command(
                PrepareData(path=str(documents), block_size=block, val_fraction=0.1),
                str(prepared),
                num_workers=2,
                progress=False,
                overwrite=True,
            )
        sources = {
            "one 256 MB file": str(big),
            "100,000 files of 1 kB": str(many),
            "prepared, 256 files of 1 MB": str(prepared),
        }
        config, step_batch = steps[shape]
        seconds = step_seconds(config, step_batch, args.steps)
        consumed = step_batch / seconds
        print(
            f"{shape} (batch {batch} x block {block}): a training step of {config} at batch {step_batch} takes "
            f"{seconds * 1000:.0f} ms on {args.threads} threads: it consumes {consumed:,.1f} windows/s"
        )
        for name, path in sources.items():
            for workers in args.workers:
                dm = ByteDataModule(path, block_size=block, batch_size=batch, num_workers=workers)
                elapsed = time_batches(dm.train_dataloader(), args.batches)
                rate = args.batches * batch / elapsed
                print(
                    f"  {name:<26} num_workers {workers}: {rate:>10,.0f} windows/s = {rate / consumed:,.0f}x a "
                    "step's consumption"
                )


def prepare(args) -> None:
    from bdh_lightning.data.prepare import PrepareData, prepare_command

    scratch = Path(args.scratch)
    files = make_files(scratch / f"files_{args.mb}mb", args.mb * 20, size=50_000)  # 50 kB documents
    jsonl = scratch / f"corpus_{args.mb}mb.jsonl"
    if not jsonl.exists():
        rng = np.random.default_rng(2)
        with open(jsonl, "w") as f:
            while f.tell() < args.mb << 20:
                text = rng.integers(97, 123, size=2000, dtype=np.uint8).tobytes().decode()
                f.write(json.dumps({"text": text}) + "\n")
    for name, source in (("files", files), ("jsonl", jsonl)):
        output = scratch / f"prepared_{name}"
        start = time.perf_counter()
        prepare_command(
            PrepareData(path=str(source), block_size=512, val_fraction=0.05, test_fraction=0.05),
            str(output),
            num_workers=args.num_workers,
            overwrite=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        size = (
            sum(p.stat().st_size for p in Path(source).rglob("*") if p.is_file())
            if Path(source).is_dir()
            else source.stat().st_size
        )
        print(
            f"prepare {name}: {size / 1e6:,.0f} MB in {seconds:.1f} s = {size / 1e6 / seconds:,.1f} MB/s "
            f"({args.num_workers} workers; source bytes read once per split for .jsonl)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default="/tmp/bdh_data_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("startup")
    p.add_argument("--files", type=int, nargs="+", default=[100, 100_000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--old", help="also measure bdh_lightning/data.py at this git revision")
    p = sub.add_parser("windows")
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p = sub.add_parser("prepare")
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.scratch, exist_ok=True)
    {"startup": startup, "windows": windows, "prepare": prepare}[args.command](args)


if __name__ == "__main__":
    main()
