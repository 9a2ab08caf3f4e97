"""Carried-state forms against random windows (issues 20, 27): bits/byte by position in the stream.

    OMP_NUM_THREADS=1 python benchmarks/carried_state.py --corpus shakespeare --steps 1000 --seeds 1 2
    OMP_NUM_THREADS=1 python benchmarks/carried_state.py --corpus stdlib --steps 1000 --seeds 1 2
    # the seed's 8gb size on a GPU:
    python benchmarks/carried_state.py --size 8gb --batch 8 --block 256 --steps 1000 --device cuda

Trains one model per (form, seed) with the same steps, batch and block (the same bytes seen) in a plain
AdamW loop over the package's model (`BDH.forward`, `BDH.forward_stream`; no Lightning, to stay cheap),
then reads the validation split as 8 contiguous streams two ways: each window alone (window-local) and
with the state the stream carried (for the random-window model: the reference's plain sum). Loss is
reported in bits/byte overall and by window index in the stream (0, 1-3, 4-15, 16-63, 64+).

Corpora: `shakespeare` (the bundled tiny Shakespeare), `stdlib` (this Python's own standard library:
top-level modules of 32 kB or more, concatenated in name order; long documents where the code and names
a window reads were often defined kilobytes earlier). The last 10% is validation.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bdh_lightning.model import BDH, BDHConfig  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16),
    "8gb": dict(n_layer=4, n_embd=192, n_head=4, mlp_internal_dim_multiplier=64),
}
# form name -> (carried state? (None: streams read window-local), model settings, reset every R windows (0 = never),
# "curriculum", "jump R": every R windows each row resets and jumps to a random place of the split, or
# "pool P jump R": P such streams (staggered, P a multiple of the batch), each step reads batch of them in turn)
MEAN_DECAY = {"carry_mean": True, "carry_half_lives": "short,long"}
FORMS = {
    "random windows": (False, {}, 0),
    "streams, no state": (None, {}, 0),
    "sum (today)": (True, {}, 0),
    "sum, reset every 2": (True, {}, 2),
    "decay, half-lives 64/1024": (True, {"carry_half_lives": "short,long"}, 0),
    "mean": (True, {"carry_mean": True}, 0),
    "mean, half-lives 64/1024": (True, {"carry_mean": True, "carry_half_lives": "short,long"}, 0),
    "mean, curriculum": (True, {"carry_mean": True}, "curriculum"),
    "decay 64/1024, jump every 8": (True, {"carry_half_lives": "short,long"}, "jump 8"),
    "sum, staggered jump every 2": (True, {}, "pool 8 jump 2"),
    "sum, pool 64, jump every 2": (True, {}, "pool 64 jump 2"),
    "decay 64/1024, staggered jump every 8": (True, {"carry_half_lives": "short,long"}, "pool 8 jump 8"),
    "decay 64/1024, pool 64, jump every 8": (True, {"carry_half_lives": "short,long"}, "pool 64 jump 8"),
    "decay 64/1024, pool 64, jump every 4": (True, {"carry_half_lives": "short,long"}, "pool 64 jump 4"),
    "mean+decay, pool 64, jump every 8": (True, MEAN_DECAY, "pool 64 jump 8"),
    "mean+decay, staggered jump every 8": (True, MEAN_DECAY, "pool 8 jump 8"),
    "mean+decay, pool 64, jump every 32": (True, MEAN_DECAY, "pool 64 jump 32"),
    "mean+decay, pool 64, jump every 2": (True, MEAN_DECAY, "pool 64 jump 2"),
    "mean+decay, pool 256, jump every 8": (True, MEAN_DECAY, "pool 256 jump 8"),
    "mean+decay, pool 1024, jump every 8": (True, MEAN_DECAY, "pool 1024 jump 8"),
    "pool 64, jump every 8, no state": (None, {}, "pool 64 jump 8"),
}
BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, 10**9))
LN2 = math.log(2)


def corpus_bytes(name: str) -> np.ndarray:
    if name == "shakespeare":
        return np.frombuffer((REPO / "data" / "tinyshakespeare.txt").read_bytes(), dtype=np.uint8)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.glob("*.py") if f.stat().st_size >= 32_000)
    return np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)


def half_lives(settings: dict, heads: int) -> dict:
    """'short,long' -> one half-life per head, geometric from 64 to 1,024 bytes."""
    if settings.get("carry_half_lives") == "short,long":
        lives = [64 * 16 ** (h / max(1, heads - 1)) for h in range(heads)]
        settings = {**settings, "carry_half_lives": tuple(lives)}
    return settings


def reset_every(rule, step: int, steps: int) -> int:
    """Windows per stream before its state resets (0 = never); the curriculum goes 1, 2, 8, never by quarters."""
    if rule == "curriculum":
        return (1, 2, 8, 0)[min(3, 4 * step // steps)]
    return int(rule.split()[1]) if isinstance(rule, str) else rule


def batch_at(data: torch.Tensor, offsets, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.stack([data[o : o + T + 1] for o in offsets]).to(device)
    return windows[:, :-1], windows[:, 1:]


class Pool:
    """P streams, each R windows from a random place of the split, then a fresh one (state zeroed). Stream p's
    first stream is R - p % R windows long, so the resets are staggered. Step after step the B rows read the
    streams in turn (a new random order every P / B steps): with P > B consecutive steps see unrelated text."""

    def __init__(self, rule: str, rng, n: int, B: int, T: int, model: BDH):
        _, P, _, R = rule.split()
        self.P, self.R, self.B, self.T, self.rng, self.n = int(P), int(R), B, T, rng, n
        self.left = [0] * self.P  # windows left in each stream
        self.first = [self.R - p % self.R for p in range(self.P)]
        self.start, self.since, self.order = [0] * self.P, [0] * self.P, []
        c = model.config
        shape = (self.P, c.n_head, c.neurons_per_head, c.n_embd)
        self.states = [torch.zeros(shape, device=model.lm_head.device) for _ in range(c.n_layer)]

    def step(self, data, device):
        if not self.order:
            self.order = [int(p) for p in (self.rng.permutation(self.P) if self.P > self.B else range(self.P))]
        rows, self.order = self.order[: self.B], self.order[self.B :]
        for p in rows:
            if self.left[p] == 0:
                self.start[p] = int(self.rng.integers(0, self.n - self.R * self.T - 1))
                self.since[p], self.left[p], self.first[p] = 0, self.first[p] or self.R, 0
                for s in self.states:
                    s[p] = 0
        x, y = batch_at(data, [self.start[p] + self.since[p] * self.T for p in rows], self.T, device)
        positions = torch.tensor([self.since[p] * self.T for p in rows], device=device)
        for p in rows:
            self.since[p], self.left[p] = self.since[p] + 1, self.left[p] - 1
        return rows, x, y, positions


def train(form: str, seed: int, data: torch.Tensor, args) -> tuple[BDH, float]:
    carried, settings, rule = FORMS[form]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = BDHConfig(
        **SIZES[args.size], dropout=0.1, kernel="reference", **half_lives(settings, SIZES[args.size]["n_head"])
    )
    model = BDH(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    B, T = args.batch, args.block
    stretch = (len(data) - 1) // B  # row b streams through [b * stretch, (b + 1) * stretch)
    per_row = (stretch - 1) // T
    states, window = None, 0
    starts = [b * stretch for b in range(B)]  # where each row's stream began
    pool = Pool(rule, rng, len(data), B, T, model) if str(rule).startswith("pool") else None
    begin = time.perf_counter()
    for step in range(args.steps):
        if pool is not None and carried is None:  # the pool's bytes in the pool's order, each window read alone
            _, x, y, _ = pool.step(data, args.device)
            logits = model(x)
        elif pool is not None:
            rows, x, y, positions = pool.step(data, args.device)
            logits, written = model.forward_stream(x, positions, [s[rows] for s in pool.states])
            for s, w in zip(pool.states, written):
                s[rows] = w.detach()
        elif carried is None:  # the streams' bytes in the streams' order, each window read alone
            k = window % per_row
            x, y = batch_at(data, [b * stretch + k * T for b in range(B)], T, args.device)
            logits = model(x)
            window += 1
        elif carried:
            every = reset_every(rule, step, args.steps)
            k = window % per_row  # the stream wraps to its stretch's start after per_row windows
            since = k % every if every else k  # windows since the last reset: the window's stream position
            if since == 0:
                states = None
                if isinstance(rule, str) and rule.startswith("jump"):
                    starts = [int(o) for o in rng.integers(0, len(data) - every * T - 1, B)]
                else:
                    starts = [b * stretch + k * T for b in range(B)]
            x, y = batch_at(data, [o + since * T for o in starts], T, args.device)
            logits, written = model.forward_stream(x, since * T, states)
            states = [s.detach() for s in written]
            window += 1
        else:
            x, y = batch_at(data, rng.integers(0, len(data) - T - 1, B), T, args.device)
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), time.perf_counter() - begin


@torch.no_grad()
def evaluate(model: BDH, data: torch.Tensor, args) -> dict:
    """bits/byte on validation streams (8 rows x args.val_windows windows), carried and window-local, by bucket."""
    T, rows = args.block, 8
    stretch = (len(data) - 1) // rows
    windows = min(args.val_windows, (stretch - 1) // T)
    carried, local, states = [], [], None
    for k in range(windows):
        x, y = batch_at(data, [r * stretch + k * T for r in range(rows)], T, args.device)
        logits, states = model.forward_stream(x, k * T, states)
        carried.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item() / LN2)
        local.append(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item() / LN2)
    result = {"carried": statistics.mean(carried), "local": statistics.mean(local)}
    for lo, hi in BUCKETS:
        if lo < windows:
            result[f"carried {lo}-{min(hi, windows) - 1}"] = statistics.mean(carried[lo:hi])
            result[f"local {lo}-{min(hi, windows) - 1}"] = statistics.mean(local[lo:hi])
    return result


def table(results: dict[str, list[dict]], keys: list[str]) -> str:
    lines = ["| form | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for form, runs in results.items():
        cells = [" / ".join(f"{r[k]:.3f}" for r in runs) for k in keys]
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("shakespeare", "stdlib"), default="shakespeare")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS), metavar="FORM")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val_windows", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    raw = torch.from_numpy(corpus_bytes(args.corpus).astype(np.int64))
    split = int(0.9 * len(raw))
    train_data, val_data = raw[:split], raw[split:]
    results: dict[str, list[dict]] = {form: [] for form in args.forms}
    for seed in args.seeds:
        for form in args.forms:
            model, seconds = train(form, seed, train_data, args)
            results[form].append({**evaluate(model, val_data, args), "seconds": seconds})
            print(form, seed, {k: round(v, 3) for k, v in results[form][-1].items()}, flush=True)
    print(
        f"\n{args.corpus} ({len(raw):,} bytes), {args.size}, {args.steps} steps x {args.batch} x {args.block} bytes, "
        f"lr {args.lr}, seeds {args.seeds} (cells: one value per seed), torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    buckets = [k for k in next(iter(results.values()))[0] if k.startswith(("carried ", "local "))]
    print(table(results, ["local", "carried", "seconds"]) + "\n")
    print(table(results, buckets))


if __name__ == "__main__":
    main()
