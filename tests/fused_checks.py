"""The fused kernel's checks, run by tests/test_fused.py under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, and it would change every later import of
triton in the process, so the suite runs these in a child process:
    TRITON_INTERPRET=1 python tests/fused_checks.py CHECK [CHECK ...]
prints one JSON object {check: {measure: value}}; test_fused.py asserts on the values. A pytest process
started with TRITON_INTERPRET=1 (fused.py's mutation runs) runs them in process instead, through `Measured`.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import triton
import triton.language as tl

from bdh_lightning.errors import ConfigError
from bdh_lightning.kernels import fused, masks
from bdh_lightning.layer import layer_norm, reference_layer, rope_cos_sin
from bdh_lightning.model import BDH, BDHConfig

# Checked after the imports, which are harmless without it: the process stops here instead.
assert fused.INTERPRETED, "run with TRITON_INTERPRET=1 (see the module docstring)"

SMALL_TILES = fused.Tiles(rows=16, pairs=16, depth=16, wide_rows=16)  # several tiles of T and N at test sizes


def random_layer(B, T, D, H, N, dtype=torch.float32, seed=0):
    """x (layer-normed, as a layer sees it), the three weights, cos/sin and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = layer_norm(torch.randn(B, 1, T, D, generator=gen)).to(dtype).requires_grad_()
    weights = [
        (torch.randn(H, D, N, generator=gen) * 0.3).to(dtype).requires_grad_(),
        (torch.randn(H, D, N, generator=gen) * 0.3).to(dtype).requires_grad_(),
        (torch.randn(H * N, D, generator=gen) * 0.1).to(dtype).requires_grad_(),
    ]
    cos, sin = rope_cos_sin(torch.arange(T), N)
    return x, weights, cos, sin, torch.randn(B, 1, T, D, generator=gen).to(dtype)


def rel(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def compare_layer(B, T, D, H, N, p=0.0, dtype=torch.float32, autocast=None, tiles=SMALL_TILES, seed=1234):
    """Relative errors of fused against reference_layer (with the same dropout mask): out and every grad."""
    x, weights, cos, sin, grad_out = random_layer(B, T, D, H, N, dtype)
    mask = masks.dropout_mask(seed, B, H, T, N, p).to(dtype) if p else None
    results = {}
    for name in ("reference", "fused"):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            if name == "reference":
                out = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask)
            else:
                start = time.process_time()
                out = fused.fused_layer(x, *weights, cos, sin, p, seed=seed, tiles=tiles)
        results[name] = (out, *torch.autograd.grad(out, [x, *weights], grad_out.to(out.dtype)))
        if name == "fused":
            seconds = time.process_time() - start
    names = ("out", "d_x", "d_encoder", "d_encoder_v", "d_decoder")
    errors = {n: rel(g, e) for n, g, e in zip(names, results["fused"], results["reference"])}
    # a kernel that dropped nothing (or everything) would still be close when p is small: say how many dropped
    errors["dropped"] = 0.0 if mask is None else 1.0 - mask.mean().item()
    errors["seconds"] = seconds  # the fused forward and backward, interpreted
    errors["dtypes"] = [str(results[n][0].dtype).removeprefix("torch.") for n in ("fused", "reference")]  # outputs
    return errors


@triton.jit
def _hash_kernel(OUT_HASH, OUT_KEEP, SEED_HASH, THRESHOLD, T, NP, BT: tl.constexpr, BP: tl.constexpr):
    """The kernels' hash and keep masks for head program_id(0), row program_id(1), all positions and neurons."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    positions = tl.arange(0, BT)
    pairs = tl.arange(0, BP)
    row_hash = fused._row_hash(SEED_HASH, head, row)
    h_pos = fused._mix32(row_hash ^ positions.to(tl.uint32))
    even = (2 * pairs).to(tl.uint32)
    base = ((head * tl.num_programs(1) + row) * T + positions[:, None]) * (2 * NP) + 2 * pairs[None, :]
    ok = (positions[:, None] < T) & (pairs[None, :] < NP)
    tl.store(OUT_HASH + base, fused._mix32(h_pos[:, None] ^ even[None, :]).to(tl.int64), mask=ok)
    tl.store(OUT_HASH + base + 1, fused._mix32(h_pos[:, None] ^ (even + 1)[None, :]).to(tl.int64), mask=ok)
    keep_even, keep_odd = fused._keep_pairs(row_hash, positions, pairs, THRESHOLD)
    tl.store(OUT_KEEP + base, keep_even.to(tl.int8), mask=ok)
    tl.store(OUT_KEEP + base + 1, keep_odd.to(tl.int8), mask=ok)


def check_hash():
    """The Triton hash and keep masks against masks.py, bit for bit, for seeds that use both 32-bit halves."""
    H, B, T, N = 2, 3, 13, 22
    results = {"hash_mismatches": 0, "keep_mismatches": 0, "entries": 0}
    for seed in (0, 7, 2**31 + 5, 2**32 + 12345, 2**62 - 1, 0x2545F4914F6CDD1D):
        for p in (0.1, 0.5, 0.9):
            out_hash = torch.zeros(H, B, T, N, dtype=torch.int64)
            out_keep = torch.zeros(H, B, T, N, dtype=torch.int8)
            _hash_kernel[(H, B)](
                out_hash, out_keep, masks.seed_hash(seed), masks.drop_threshold(p), T, N // 2, BT=16, BP=16
            )
            heads = torch.arange(H).view(H, 1, 1, 1)
            rows = torch.arange(B).view(1, B, 1, 1)
            positions = torch.arange(T).view(T, 1)
            neurons = torch.arange(N)
            expected = masks.entry_hash(seed, heads, rows, positions, neurons)
            keep = masks.keep_mask(seed, heads, rows, positions, neurons, p)
            results["hash_mismatches"] += int((out_hash != expected).sum())
            results["keep_mismatches"] += int((out_keep.bool() != keep).sum())
            results["entries"] += expected.numel()
    return results


def check_model():
    """A whole BDH: kernel=fused against reference (eval) and chunked (training, same dropout masks),
    on weights loaded from the other model's state_dict (checkpoints are interchangeable)."""
    settings = {"n_layer": 2, "n_embd": 32, "n_head": 2, "mlp_internal_dim_multiplier": 8, "dropout": 0.2}
    torch.manual_seed(0)
    reference = BDH(BDHConfig(**settings, kernel="reference"))
    models = {k: BDH(BDHConfig(**settings, kernel=k)) for k in ("fused", "chunked")}
    for model in models.values():
        model.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 256, (2, 19))
    results = {}

    def loss_and_grads(model):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        return [logits, *torch.autograd.grad(loss, list(model.parameters()))]

    reference.eval()
    models["fused"].eval()
    expected, got = loss_and_grads(reference), loss_and_grads(models["fused"])
    results["eval_logits"] = rel(got[0], expected[0])
    results["eval_grads"] = max(rel(g, e) for g, e in zip(got[1:], expected[1:]))
    for model in models.values():
        model.train()
    runs = {}
    for name, model in models.items():
        torch.manual_seed(99)  # the same dropout seeds drawn, so the same masks
        runs[name] = loss_and_grads(model)
    results["train_logits"] = rel(runs["fused"][0], runs["chunked"][0])
    results["train_grads"] = max(rel(g, e) for g, e in zip(runs["fused"][1:], runs["chunked"][1:]))
    results["train_vs_eval"] = rel(runs["fused"][0], expected[0])  # dropout did act
    return results


def check_float64_refused():
    x, weights, cos, sin, _ = random_layer(1, 4, 8, 1, 8, torch.float64)
    try:
        fused.fused_layer(x, *weights, cos, sin)
    except ConfigError as error:
        return {"refused": 1.0, "message": str(error)}
    return {"refused": 0.0, "message": ""}


KERNEL_NAMES = ("_scores_kernel", "_decode_kernel", "_rows_z_kernel", "_rows_q_kernel", "_cols_kernel")


class LaunchSpy:
    """Stands for one kernel: `spy[grid](*args, **kwargs)` records what the launch passed, then launches it."""

    def __init__(self, kernel, seen: dict):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen[self.kernel.fn.__name__] = {
                "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "contiguous": all(t.is_contiguous() for t in tensors),
                # compiled Triton refuses a keyword that is not a parameter; the interpreter drops it silently
                "unknown": sorted(k for k in kwargs if k not in self.kernel.arg_names),
            }
            return self.kernel[grid](*args, **kwargs)

        return launch


def check_launches():
    """What each kernel is handed in a bf16-mixed step (float32 weights under bf16 autocast), forward and
    backward: its tensors' dtypes in order, whether all are contiguous, keywords that are no parameter of it."""
    seen = {}
    kernels = {name: getattr(fused, name) for name in KERNEL_NAMES}
    for name, kernel in kernels.items():
        setattr(fused, name, LaunchSpy(kernel, seen))
    try:
        compare_layer(B=1, T=5, D=16, H=1, N=32, p=0.2, autocast=torch.bfloat16)
    finally:
        for name, kernel in kernels.items():
            setattr(fused, name, kernel)
    return seen


CHECKS = {
    # float32, no dropout: 3 row tiles (T = 35 over 16; 2 of 32 for decode and rows_z), 2 neuron tiles
    # (18 pairs over 16), 3 heads
    "fp32": lambda: compare_layer(B=1, T=35, D=16, H=3, N=36, tiles=fused.Tiles(16, 16, 16, wide_rows=32)),
    # float32 with dropout: 3 batch rows, 2 row tiles, 2 neuron tiles, 2 steps of the D contraction
    "fp32_dropout": lambda: compare_layer(B=3, T=19, D=24, H=2, N=40, p=0.3),
    # bfloat16 weights and inputs (bf16-true); larger row tiles keep the interpreter quick
    "bf16": lambda: compare_layer(
        B=2, T=21, D=24, H=2, N=40, p=0.2, dtype=torch.bfloat16, tiles=fused.Tiles(rows=32, pairs=32, depth=32)
    ),
    # float32 weights under bf16 autocast (bf16-mixed): the products in bf16, norms and sums in float32
    "autocast_bf16": lambda: compare_layer(
        B=2, T=21, D=24, H=2, N=40, p=0.2, autocast=torch.bfloat16, tiles=fused.Tiles(rows=32, pairs=32, depth=32)
    ),
    # float16 autocast (16-mixed): scores and S @ x in float32
    "autocast_fp16": lambda: compare_layer(
        B=2, T=21, D=24, H=2, N=40, p=0.2, autocast=torch.float16, tiles=fused.Tiles(rows=32, pairs=32, depth=32)
    ),
    "hash": check_hash,
    "model": check_model,
    "float64_refused": check_float64_refused,
    "launches": check_launches,
}


class Measured(dict):
    """The checks' results, each check run when a test first asks for it (in a process under the interpreter)."""

    def __missing__(self, name):
        self[name] = CHECKS[name]()
        return self[name]


if __name__ == "__main__":
    print(json.dumps({name: CHECKS[name]() for name in sys.argv[1:]}))
