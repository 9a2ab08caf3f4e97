"""Tooling for the experimental fused Triton kernel: its cost model, an offline sm_90 build and a GPU timing check.

    python benchmarks/fused_tools.py compile      # build the kernels for sm_90 offline, print registers and spills
    python benchmarks/fused_tools.py check        # on a GPU: fused against chunked, each tile choice

docs/fused-kernel.md explains the numbers. Not part of the package: nothing in training calls these.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdh_lightning.kernels import chunked_layer, masks  # noqa: E402
from bdh_lightning.kernels.fused import (  # noqa: E402
    INTERPRETED,
    Tiles,
    _cols_kernel,
    _decode_kernel,
    _rows_q_kernel,
    _rows_z_kernel,
    _scores_kernel,
    fused_layer,
)
from bdh_lightning.layer import reference_layer, rope_cos_sin  # noqa: E402


def layer_cost(B: int, T: int, D: int, H: int, N: int, tiles: Tiles = Tiles(), low_bytes: int = 2) -> dict:
    """One layer's training step (forward + backward) at these sizes: FLOPs as the spec counts them, FLOPs
    the fused kernels execute (tile padding and recomputation included), and the bytes this design must
    move through device memory at least (`low_bytes` per element of x, weights, S and G; float32 for y,
    u, the D-wide gradients and the weight gradients). docs/fused-kernel.md explains each term."""
    nt = triton.cdiv(T, tiles.rows)
    n_pad = triton.cdiv(N // 2, tiles.pairs) * 2 * tiles.pairs
    BT = tiles.rows
    tile = 2 * BT * D * n_pad  # one N-wide product of a row tile, all neuron tiles
    score = 2 * BT * BT * n_pad  # one (BT x BT) tile of q q^T or G q, all neuron tiles
    s_x = 2 * B * H * T * T * D  # S @ x (and each of the backward's two T x T x D products), in PyTorch
    pairs = nt * (nt + 1) // 2
    wide_tiles = triton.cdiv(T, tiles.wide_rows) * 2 * tiles.wide_rows * D * n_pad  # all rows, wide_rows tiles
    # q is made for both sides of each tile pair, once on the diagonal
    forward = B * H * (nt * nt * tile + pairs * score + 3 * wide_tiles) + s_x
    rows_z = B * H * 5 * wide_tiles  # a, b, dz again; dy and dx through z
    rows_q = B * H * nt * (2 * tile + (nt - 1) * tile + nt * score)  # a; dx; q per other column tile; G q
    cols = B * H * nt * (6 * tile + (nt - 1) * tile + nt * score)  # a, b, dz; 3 weight gradients; q; G q
    backward = rows_z + rows_q + cols + 2 * s_x
    spec = 3 * B * T * (6 * H * D * N + 2 * H * N * T + 2 * H * D * T)  # forward + twice for backward
    weights = 3 * H * D * N
    floor = (
        weights * (2 * low_bytes + 4)  # read in forward and backward; float32 gradients written
        + B * T * D * (2 * low_bytes + 2 * 4)  # x read in both passes; u written, its gradient read
        + 2 * B * H * T * T * low_bytes * 3  # S and G: written once, read twice each
        + B * H * T * D * 4 * (3 + 3 * 2)  # y: written, read twice; dy and the two dx parts: written, read
    )
    return {
        "spec_flops": spec,
        "fused_flops": forward + backward,
        "floor_bytes": floor,
        "n_wide_elements": B * H * T * N,
    }


def compile_offline(precision: str = "bf16", tiles: Tiles = Tiles(), D: int = 256, arch: int = 90) -> dict:
    """Compile the five kernels for an NVIDIA GPU of compute capability `arch` (90: H100) without one,
    through PTX to a cubin with the ptxas bundled with triton.

    Returns {kernel: {registers, stack_bytes}} per thread as cuobjdump reports them (None where it is
    missing; the stack holds register spills, so a stack means the tiles want tuning). The GPU code path
    (tensor-core dots, "ieee" fp32 dots) is what the interpreter never compiles: this catches its
    compile errors. Not under TRITON_INTERPRET (the kernels are interpreted there)."""
    import re  # noqa: PLC0415 (tooling, not the layer)
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    if INTERPRETED:
        raise RuntimeError("compile_offline needs the compiled kernels: run it without TRITON_INTERPRET=1")
    low = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[precision]
    att = "*bf16" if precision == "bf16" else "*fp32"
    common = {"BT": tiles.rows, "BP": tiles.pairs, "BD": tiles.depth, "PREC": precision, "EMULATE": False}
    wide = {**common, "DP": triton.next_power_of_2(D), "DROPOUT": True}
    narrow_rows = {**wide, "BT": tiles.wide_rows}  # decode and rows_z
    attention = {"ATT": "bf16" if precision == "bf16" else "fp32"}
    f32 = "*fp32"
    jobs = {
        "scores": (_scores_kernel, {"X": low, "E": low, "COS": f32, "SIN": f32, "S": att}, {**common, **attention}),
        "decode": (
            _decode_kernel,
            {"X": low, "Y": f32, "E": low, "EV": low, "DEC": low, "U": f32, "SCALE": "fp32"},
            narrow_rows,
        ),
        "rows_z": (
            _rows_z_kernel,
            {"X": low, "Y": f32, "DU": low, "E": low, "EV": low, "DEC": low, "DY": f32, "DXZ": f32},
            narrow_rows,
        ),
        "rows_q": (
            _rows_q_kernel,
            {"X": low, "E": low, "COS": f32, "SIN": f32, "G": att, "DX": f32},
            {**wide, **attention, "DROPOUT": None},
        ),
        "cols": (
            _cols_kernel,
            {
                "X": low,
                "Y": f32,
                "DU": low,
                "E": low,
                "EV": low,
                "DEC": low,
                "COS": f32,
                "SIN": f32,
                "G": att,
                "D_E": f32,
                "D_EV": f32,
                "D_DEC": f32,
            },
            {**wide, **attention},
        ),
    }
    scalars = {"B": "i32", "H": "i32", "T": "i32", "D": "i32", "N": "i32", "THRESHOLD": "i32", "SEED_HASH": "u32"}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report = {}
    for name, (kernel, pointers, constants) in jobs.items():
        constants = {k: v for k, v in constants.items() if k in kernel.arg_names and v is not None}
        types = {**scalars, **pointers}
        signature = {a: "constexpr" if a in constants else types[a] for a in kernel.arg_names}
        compiled = triton.compile(
            ASTSource(kernel, signature, constants),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": tiles.num_warps},
        )
        usage = {"registers": None, "stack_bytes": None}
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                text = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+).*?STACK:(\d+)", text, re.S)
            if found:
                usage = {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}
        report[name] = usage
    return report


# The spectrum compile_offline shows: 32-row tiles barely spill but recompute q most; 128-row tiles
# recompute least but spill (docs/fused-kernel.md, "Compiled for sm_90").
GPU_CHECK_TILES = (Tiles(), Tiles(rows=32, pairs=16), Tiles(rows=128, pairs=16))


def gpu_check(
    baselines: dict | None = None, iterations: int = 10, tile_choices: tuple[Tiles, ...] = GPU_CHECK_TILES
) -> dict:
    """What only a GPU can tell (benchmarks/gpu_suite.py runs it; no GPU has yet): a JSON-able dict.

    1. `correct`: the compiled kernels (tensor-core bf16 dots, "ieee" fp32 dots, which the interpreter
       does not run) against `reference_layer` with dropout, at sizes with several tiles and a ragged
       end: relative error of the output and each gradient (want fp32 <= 1e-4, bf16 autocast <= 2e-2).
    2. `speed`: one layer's forward + backward at the 14gb config's sizes (B16 T384 D256 H4 N6144)
       under bf16 autocast: ms, peak bytes above the inputs, and spec TFLOP/s, for reference (eager and
       torch.compile), the `baselines` given (name -> a layer function (x, E, Ev, Dec, cos, sin, dropout);
       the suite passes {"chunked": kernels.chunked_layer}: this module cannot import kernels.py, which
       imports it) and fused with each tile choice. The issue's goal: fused at 1.5x the compiled
       reference's speed with peak memory no more than chunked's.
    """
    device = torch.device("cuda")

    def inputs(B, T, D, H, N, dtype=torch.float32, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.nn.functional.layer_norm(torch.randn(B, 1, T, D, device=device, generator=gen), (D,))
        weights = [torch.randn(H, D, N, device=device, generator=gen) * 0.02 for _ in range(2)]
        weights.append(torch.randn(H * N, D, device=device, generator=gen) * 0.02)
        cos, sin = rope_cos_sin(torch.arange(T, device=device), N)
        tensors = [t.to(dtype).requires_grad_() for t in (x, *weights)]
        return tensors, cos, sin, torch.randn(B, 1, T, D, device=device, generator=gen).to(dtype)

    def run(fn, tensors, cos, sin, grad, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*tensors, cos, sin)
        return (out, *torch.autograd.grad(out, tensors, grad.to(out.dtype)))

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    results = {"device": torch.cuda.get_device_name(), "correct": {}, "speed": {}}
    B, T, D, H, N, p, seed = 3, 200, 96, 2, 1000, 0.2, 1234
    mask = masks.dropout_mask(seed, B, H, T, N, p, device)
    for label, autocast in (("fp32", False), ("bf16_autocast", True)):
        for tiles in tile_choices:
            tensors, cos, sin, grad = inputs(B, T, D, H, N)
            want = run(lambda *a: reference_layer(*a, p, True, dropout_mask=mask), tensors, cos, sin, grad, autocast)
            got = run(lambda *a: fused_layer(*a, p, seed=seed, tiles=tiles), tensors, cos, sin, grad, autocast)
            names = ("out", "d_x", "d_encoder", "d_encoder_v", "d_decoder")
            results["correct"][f"{label} {tiles}"] = {n: rel(g, w) for n, g, w in zip(names, got, want)}

    B, T, D, H, N = 16, 384, 256, 4, 6144  # configs/14gb.yaml
    cost = layer_cost(B, T, D, H, N)
    kernels = {
        "reference": lambda *a: reference_layer(*a, 0.1, True),
        "reference+compile": torch.compile(lambda *a: reference_layer(*a, 0.1, True)),
    }
    kernels.update({name: (lambda f: lambda *a: f(*a, 0.1))(f) for name, f in (baselines or {}).items()})
    kernels.update({f"fused {t}": (lambda t: lambda *a: fused_layer(*a, 0.1, tiles=t))(t) for t in tile_choices})
    for name, fn in kernels.items():
        try:
            tensors, cos, sin, grad = inputs(B, T, D, H, N)
            run(fn, tensors, cos, sin, grad, True)  # compile, autotune, warm up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                run(fn, tensors, cos, sin, grad, True)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / iterations
            results["speed"][name] = {
                "ms": ms,
                "peak_bytes": torch.cuda.max_memory_allocated() - base,
                "spec_tflops": cost["spec_flops"] / ms / 1e9,
            }
        except Exception as error:  # a benchmark reports what failed and goes on to the next kernel
            results["speed"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return results


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "compile"
    if what == "compile":
        print(json.dumps(compile_offline("bf16")))
    elif what == "check":
        print(json.dumps(gpu_check(baselines={"chunked": chunked_layer}), indent=1))
    else:
        sys.exit("usage: fused_tools.py compile|check")
