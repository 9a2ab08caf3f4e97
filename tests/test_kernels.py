"""The chunked layer against the plain reference: outputs and every gradient, dropout masks (the counter hash),
gradcheck, autocast and *-true dtypes, checkpoints across kernels, torch.compile, `auto`."""

import pytest
import torch

from bdh_lightning import layer
from bdh_lightning.errors import ConfigError
from bdh_lightning.kernels import chunked, masks, resolve_kernel
from bdh_lightning.kernels.chunked import chunk_width, chunked_layer, draw_seed
from bdh_lightning.kernels.masks import dropout_mask
from bdh_lightning.layer import layer_norm, reference_layer, rope, rope_cos_sin, stream_attention
from bdh_lightning.model import BDH, BDHConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")


def random_layer(dtype, B=2, T=12, D=16, H=2, N=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = layer_norm(torch.randn(B, 1, T, D, generator=gen)).to(dtype).requires_grad_()
    weights = [
        (torch.randn(H, D, N, generator=gen) * 0.3).to(dtype).requires_grad_(),
        (torch.randn(H, D, N, generator=gen) * 0.3).to(dtype).requires_grad_(),
        (torch.randn(H * N, D, generator=gen) * 0.1).to(dtype).requires_grad_(),
    ]
    cos, sin = rope_cos_sin(torch.arange(T), N)
    grad_out = torch.randn(B, 1, T, D, generator=gen).to(dtype)
    return x, weights, cos, sin, grad_out


def grads(out, grad_out, inputs):
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_layer_close(size, dtype, tol, chunk_size, p, seed=1234, autocast=None):
    """chunked_layer with `seed` against reference_layer with masks.dropout_mask(seed): output and all
    gradients. Under autocast both are also held against the float32 result: chunked's error at most
    twice the reference's (plus `tol` / 10)."""
    x, weights, cos, sin, grad_out = random_layer(dtype, **size)
    B, T, H, N = size["B"], size["T"], size["H"], size["N"]
    inputs = [x, *weights]
    mask = dropout_mask(seed, B, H, T, N, p).to(dtype) if p else None
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        expected = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask)
        got = chunked_layer(x, *weights, cos, sin, p, seed=seed, chunk_size=chunk_size)
    assert got.dtype == expected.dtype
    results = [(got, expected)] + list(zip(grads(got, grad_out, inputs), grads(expected, grad_out, inputs)))
    if autocast is not None:
        exact = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask)
        truths = [exact, *grads(exact, grad_out, inputs)]
    for i, (g, e) in enumerate(results):
        assert g.dtype == (got.dtype if i == 0 else inputs[i - 1].dtype)
        assert rel_err(g, e) < tol
        if autocast is not None:
            assert rel_err(g, truths[i]) <= 2 * rel_err(e, truths[i]) + tol / 10


# N and chunk sizes that do not divide, N smaller than the chunk, one head, many heads.
SIZES = [
    (dict(B=2, T=12, D=16, H=2, N=70), 24),
    (dict(B=3, T=9, D=8, H=3, N=50), 10),
    (dict(B=1, T=7, D=32, H=1, N=30), 64),
    (dict(B=2, T=10, D=16, H=2, N=128), 0),
    (dict(B=2, T=10, D=16, H=2, N=128), 46),
    (dict(B=2, T=9, D=8, H=2, N=40), 20),  # exactly two chunks per head
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size,chunk_size", SIZES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_equals_reference(dtype, tol, size, chunk_size, p):
    assert_layer_close(size, dtype, tol, chunk_size, p)


@pytest.mark.parametrize("size,chunk_size", SIZES[:3])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_equals_reference_under_bf16_autocast(size, chunk_size, p):
    """The dtypes bf16-mixed takes on a GPU: bf16 products, float32 norms and accumulations (bf16 tolerances)."""
    assert_layer_close(size, torch.float32, 5e-2, chunk_size, p, autocast=torch.bfloat16)


def test_chunked_equals_reference_under_float16_autocast():
    """16-mixed's dtypes: float16 products, float32 attention read (layer.attention_dtype)."""
    assert_layer_close(SIZES[0][0], torch.float32, 1e-2, SIZES[0][1], 0.3, autocast=torch.float16)


def test_gradcheck_tiny():
    x, weights, cos, sin, _ = random_layer(torch.float64, B=2, T=5, D=4, H=2, N=24)
    for chunk_size in (0, 10):  # one chunk per head, and three uneven ones
        assert torch.autograd.gradcheck(
            lambda *t: chunked_layer(*t, cos, sin, 0.25, seed=7, chunk_size=chunk_size), (x, *weights), fast_mode=True
        )


def test_chunk_width_is_even_and_at_most_n():
    assert chunk_width(0, 10, 128) == 128
    assert chunk_width(24, 10, 70) == 24
    assert chunk_width(25, 10, 70) == 24  # rotary pairs stay within a chunk
    assert chunk_width(1, 10, 70) == 2
    assert chunk_width(500, 10, 70) == 70
    # Automatic above AUTO_CHUNK_ELEMENTS: the fewest equal chunks whose B x T x chunk tensors fit.
    assert chunk_width(0, 32 * 1024, 8192) == 2048
    assert chunk_width(0, 3 * 2**20, 100) == 20  # 5 chunks of 3 M x 20 elements


# ---------------------------------------------------------------------------------------------------
# Dropout masks: the counter-based hash (masks.py, HASH.md)


def hash_md_keep(seed, head, row, pos, neuron, p):
    """HASH.md's formula in plain Python integers: the statement masks.py must match bit for bit."""

    def mix(h):
        h ^= h >> 16
        h = (h * 0x21F0AAAD) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x735A2D97) & 0xFFFFFFFF
        h ^= h >> 15
        return h

    h = mix(seed & 0xFFFFFFFF)
    h = mix(h ^ ((seed >> 32) & 0xFFFFFFFF))
    for value in (head, row, pos, neuron):
        h = mix(h ^ value)
    return (h >> 8) >= int(p * 2**24)


def test_masks_match_the_hash_formula():
    B, H, T, N, p = 2, 3, 5, 6, 0.4
    for seed in (0, 1, 2**32 - 1, 2**32 + 5, 2**62 - 1, 123456789012345):
        mask = dropout_mask(seed, B, H, T, N, p)
        expected = torch.tensor(
            [
                [[[hash_md_keep(seed, h, b, t, n, p) for n in range(N)] for t in range(T)] for h in range(H)]
                for b in range(B)
            ]
        )
        assert torch.equal(mask, expected.float())
    # Pinned values: the Triton kernel and any other implementation must give these exact hashes.
    assert masks.entry_hash(123456789012345, 1, 0, 2, 3) == 1770166996
    assert masks.mix32(0x12345678) == masks.mix32(torch.tensor(0x12345678)).item()


def test_masks_do_not_depend_on_chunking_seed_type_or_default_dtype():
    B, H, T, N, p = 2, 2, 16, 70, 0.25
    seed = 2**40 + 99
    mask = dropout_mask(seed, B, H, T, N, p)
    assert torch.equal(mask, dropout_mask(torch.tensor(seed), B, H, T, N, p))
    assert not torch.equal(mask, dropout_mask(seed + 1, B, H, T, N, p))
    assert abs(mask.mean().item() - (1 - p)) < 0.03
    for h in range(H):
        for start, stop in ((0, 70), (0, 24), (24, 48), (48, 70), (13, 14)):
            block = masks.block_keep(torch.tensor(seed), h, B, T, start, stop, p)
            assert torch.equal(block.float(), mask[:, h, :, start:stop])
    default = torch.get_default_dtype()
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            torch.set_default_dtype(dtype)
            assert torch.equal(dropout_mask(seed, B, H, T, N, p), mask)
    finally:
        torch.set_default_dtype(default)
    assert masks.drop_threshold(0.0) == 0 and dropout_mask(seed, B, H, T, N, 0.0).all()


def test_seed_comes_from_the_global_generator():
    """Exact resume: a reseeded generator gives the same seeds, hence the same masks and outputs."""
    x, weights, cos, sin, _ = random_layer(torch.float64, N=70)
    torch.manual_seed(5)
    seeds = [draw_seed() for _ in range(3)]
    first = chunked_layer(x, *weights, cos, sin, 0.3, chunk_size=24)
    torch.manual_seed(5)
    assert [draw_seed() for _ in range(3)] == seeds
    assert torch.equal(first, chunked_layer(x, *weights, cos, sin, 0.3, chunk_size=24))
    assert seeds[0].dtype == torch.int64 and 0 <= seeds[0].item() < 2**62


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_precision_masks_are_the_same_in_forward_and_backward(precision, monkeypatch):
    """Lightning's *-true plugin sets the default dtype during the forward only: the backward must
    regenerate exactly the forward's masks, and the gradients match the reference with that mask."""
    from lightning.pytorch.plugins import HalfPrecision

    made = {"forward": [], "backward": []}
    phase = ["forward"]

    def recording_block_keep(*args, **kwargs):
        keep = masks.block_keep(*args, **kwargs)
        made[phase[0]].append(keep)
        return keep

    monkeypatch.setattr(chunked, "block_keep", recording_block_keep)
    plugin = HalfPrecision(precision)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    size = dict(B=2, T=12, D=16, H=2, N=70)
    x, weights, cos, sin, grad_out = random_layer(dtype, **size)
    with plugin.forward_context():
        assert torch.get_default_dtype() == dtype
        got = chunked_layer(x, *weights, cos, sin, 0.3, seed=31, chunk_size=24)
    phase[0] = "backward"
    got_grads = grads(got, grad_out, [x, *weights])
    assert len(made["forward"]) == len(made["backward"]) == 2 * 3  # heads x chunks
    for f, b in zip(made["forward"], made["backward"]):
        assert torch.equal(f, b)
    mask = dropout_mask(31, 2, 2, 12, 70, 0.3)
    assert torch.equal(torch.cat(made["forward"][:3], -1).float(), mask[:, 0])
    with plugin.forward_context():
        expected = reference_layer(x, *weights, cos, sin, 0.3, True, dropout_mask=mask.to(dtype))
    for g, e in zip(got_grads, grads(expected, grad_out, [x, *weights])):
        assert rel_err(g, e) < 3e-2


# ---------------------------------------------------------------------------------------------------
# Float16 range


def overflowing(dtype, T=64, D=32, H=2, N=128):
    """Layer inputs whose scores and S @ x exceed float16's range (encoder weights 3.0, not 0.02)."""
    gen = torch.Generator().manual_seed(0)
    x = layer_norm(torch.randn(1, 1, T, D, generator=gen))
    encoder = torch.randn(H, D, N, generator=gen) * 3.0
    encoder_v = torch.randn(H, D, N, generator=gen) * 0.02
    decoder = torch.randn(H * N, D, generator=gen) * 0.02
    cos, sin = rope_cos_sin(torch.arange(T), N)
    q = rope(torch.relu(x @ encoder), cos, sin).half()
    assert not torch.isfinite((q @ q.transpose(-1, -2)).tril(-1) @ x.half()).all()  # they do overflow
    weights = [w.to(dtype).requires_grad_() for w in (encoder, encoder_v, decoder)]
    return x, weights, cos, sin


@pytest.mark.parametrize("chunk_size", [0, 46])
def test_chunked_attention_does_not_overflow_under_float16_autocast(chunk_size):
    """Scores and S @ x past float16's range: the chunked layer keeps them in float32, as the reference does."""
    x, weights, cos, sin = overflowing(torch.float32)
    expected = reference_layer(x, *weights, cos, sin, 0.0, False)
    with torch.autocast("cpu", dtype=torch.float16):
        got = chunked_layer(x, *weights, cos, sin, 0.0, chunk_size=chunk_size)
        reference_half = reference_layer(x, *weights, cos, sin, 0.0, False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)
    torch.testing.assert_close(got.float(), reference_half.float(), atol=2e-2, rtol=0)
    got.float().square().sum().backward()
    assert all(torch.isfinite(w.grad).all() for w in weights)


@pytest.mark.parametrize("chunk_size", [0, 46])
def test_16_true_chunked_stays_finite(chunk_size):
    """16-true (float16 weights, no autocast): S @ x and its norm in float32, not float16 (which is inf, then NaN)."""
    x, weights, cos, sin = overflowing(torch.float16)
    x = x.half()
    expected = reference_layer(x, *weights, cos, sin, 0.0, False)
    assert torch.isfinite(expected).all()
    got = chunked_layer(x, *weights, cos, sin, 0.0, chunk_size=chunk_size)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)
    got.float().square().sum().backward()
    assert all(torch.isfinite(w.grad).all() for w in weights)


# ---------------------------------------------------------------------------------------------------
# The model: kernels agree, checkpoints, torch.compile


def tiny_config(kernel, **overrides):
    settings = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0, kernel=kernel)
    return BDHConfig(**{**settings, **overrides})


def test_model_gradients_equal_across_kernels():
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for kernel in ("reference", "chunked", "auto"):
        torch.manual_seed(0)
        model = BDH(tiny_config(kernel)).double()
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert rel_err(a, b) < 1e-10


def test_whole_model_traces_without_graph_breaks_in_training():
    """torch.compile sees one graph: chunked layers with dropout, the seed draws included."""
    model = BDH(tiny_config("chunked", dropout=0.2, chunk_size=46)).train()
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
def test_the_layers_compile_as_one_region_stamped_out_per_layer(kernel):
    """model.forward's layers are one nested compile region (kernels.layer_region): traced and compiled once,
    called n_layer times (compile time does not grow with depth), and the compiled model computes what eager
    does, dropout included (AOTAutograd's graphs run eagerly here, so torch's RNG draws the same seeds)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = BDH(tiny_config(kernel, dropout=0.2, n_layer=3)).train()
    idx = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(idx[:, :-1])
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    graph = explained.graphs[0]
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 3 and len({n.args[0].target for n in calls}) == 1  # one subgraph, three calls
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for forward in (compiled, model):
        torch.manual_seed(1)
        F.cross_entropy(forward(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        results.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_compiled_chunked_layer_equals_eager():
    """Inductor on the CPU: forward and every gradient of a compiled chunked layer (dropout, uneven
    chunks) equal the eager ones; the seed is an input, so one compiled graph serves every seed."""
    x, weights, cos, sin, grad_out = random_layer(torch.float32, B=2, T=8, D=8, H=1, N=20)

    def layer(x, encoder, encoder_v, decoder, seed):
        return chunked_layer(x, encoder, encoder_v, decoder, cos, sin, 0.3, seed=seed, chunk_size=12)

    compiled = torch.compile(layer, fullgraph=True)
    for seed in (torch.tensor(11), torch.tensor(2**50 + 3)):
        expected = layer(x, *weights, seed)
        got = compiled(x, *weights, seed)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads(got, grad_out, [x, *weights]), grads(expected, grad_out, [x, *weights])):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def fit_tiny(tmp_path, **module_args):
    import lightning as L

    from bdh_lightning.module import BDHLitModule

    L.seed_everything(0)
    data = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=4)
    args = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1)
    module = BDHLitModule(**{**args, **module_args})
    trainer = L.Trainer(
        max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, loader)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_checkpoints_load_with_any_kernel(tmp_path):
    from bdh_lightning.module import BDHLitModule

    trained, path = fit_tiny(tmp_path, kernel="chunked")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = trained.model.eval()(idx)
    for kernel in ("reference", "chunked", "auto"):
        loaded = BDHLitModule.load_from_checkpoint(path, kernel=kernel).eval()
        assert loaded.config.kernel == kernel
        assert torch.allclose(loaded.model(idx), expected, rtol=1e-5, atol=1e-5)


def test_compile_trains_and_keeps_checkpoint_keys_plain(tmp_path):
    """model.compile: true on the CPU (inductor needs a C compiler): a two-step fit of the whole model
    with chunked layers and dropout, then the saved keys."""
    from torch._dynamo.utils import counters

    counters.clear()
    module, path = fit_tiny(tmp_path, kernel="chunked", compile=True, n_layer=1, n_head=1)  # small: compile time
    assert module._compiled
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole model, chunked layer included
    assert counters["stats"]["unique_graphs"] >= 1
    keys = set(torch.load(path, weights_only=False)["state_dict"])
    assert {"model.embed.weight", "model.encoder", "model.encoder_v", "model.decoder", "model.lm_head"} <= keys
    assert not any("_orig_mod" in k for k in keys)


# ---------------------------------------------------------------------------------------------------
# Which kernel


def test_kernel_switch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, fused runs on CPU tensors (test_fused.py)
    assert resolve_kernel("auto", torch.device("cpu"), n_wide=2**21) == "reference"
    assert resolve_kernel("auto", torch.device("cpu"), n_wide=2**24) == "chunked"
    assert resolve_kernel("auto", torch.device("cuda")) == "chunked"  # unresolved by the run: the one that fits
    assert resolve_kernel("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ConfigError, match="fused cannot run here"):
        resolve_kernel("fused", torch.device("cpu"))


@CUDA
def test_cuda_chunked_equals_cpu_reference():
    x, weights, cos, sin, grad_out = random_layer(torch.float64, N=70)
    mask = dropout_mask(5, 2, 2, 12, 70, 0.3)
    assert torch.equal(dropout_mask(5, 2, 2, 12, 70, 0.3, device="cuda").cpu(), mask)  # same mask on the GPU
    expected = reference_layer(x, *weights, cos, sin, 0.3, True, dropout_mask=mask.double())
    inputs = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    got = chunked_layer(*inputs, cos.cuda(), sin.cuda(), 0.3, seed=5, chunk_size=24)
    assert rel_err(got.cpu(), expected) < 1e-10
    for g, e in zip(grads(got, grad_out.cuda(), inputs), grads(expected, grad_out, [x, *weights])):
        assert rel_err(g.cpu(), e) < 1e-10


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_chunked_under_autocast_close_to_reference(dtype):
    size = dict(B=2, T=64, D=32, H=2, N=128)
    x, weights, cos, sin, grad_out = random_layer(torch.float32, **size)
    mask = dropout_mask(9, 2, 2, 64, 128, 0.2, device="cuda")
    inputs = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    with torch.autocast("cuda", dtype=dtype):
        expected = reference_layer(*inputs, cos.cuda(), sin.cuda(), 0.2, True, dropout_mask=mask)
        got = chunked_layer(*inputs, cos.cuda(), sin.cuda(), 0.2, seed=9, chunk_size=46)
    assert rel_err(got, expected) < 3e-2
    for g, e in zip(grads(got, grad_out.cuda(), inputs), grads(expected, grad_out.cuda(), inputs)):
        assert rel_err(g, e) < 5e-2


@CUDA
def test_cuda_compiled_chunked_equals_eager():
    x, weights, cos, sin, grad_out = random_layer(torch.float32, B=2, T=64, D=32, H=2, N=128)
    inputs = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    cos, sin, seed = cos.cuda(), sin.cuda(), torch.tensor(3)

    def layer(*t):
        return chunked_layer(*t, cos, sin, 0.2, seed=seed, chunk_size=46)

    expected = layer(*inputs)
    got = torch.compile(layer, fullgraph=True)(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads(got, grad_out.cuda(), inputs), grads(expected, grad_out.cuda(), inputs)):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def fake_run(module, monkeypatch, gpu_bytes, batch_size=8, block_size=256, precision="bf16-mixed"):
    """Attach a stand-in trainer on a CUDA device with `gpu_bytes` of memory, then configure_model()."""
    from types import SimpleNamespace

    from bdh_lightning import estimate

    monkeypatch.setattr(estimate, "device_memory", lambda device: (gpu_bytes, "the GPU has"))
    data = SimpleNamespace(batch_size=batch_size, block_size=block_size)
    trainer = SimpleNamespace(
        datamodule=data, precision=precision, strategy=SimpleNamespace(root_device=torch.device("cuda", 0))
    )
    monkeypatch.setattr(module, "_trainer", trainer)
    module.configure_model()
    return module.kernel_reason


def test_auto_on_cuda_takes_the_reference_where_it_fits(monkeypatch):
    """The run resolves `auto` once from the estimate and the GPU's memory (faked here)."""
    from bdh_lightning.console import format_bytes
    from bdh_lightning.estimate import AUTO_FIXED_MARGIN, estimate_memory
    from bdh_lightning.module import BDHLitModule

    settings = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)
    peaks = {k: m.peak_bytes for k, m in estimate_memory(settings, 8, 256, "bf16-mixed", "cuda").kernels.items()}
    # The reference fits `big` only; chunked fits both.
    big, small = 80 * 2**30, AUTO_FIXED_MARGIN + int(1.15 * (peaks["reference"] + peaks["chunked"]) / 2)
    module = BDHLitModule(**settings, kernel="auto")
    assert fake_run(module, monkeypatch, big) == (
        f"kernel reference: it needs {format_bytes(peaks['reference'])} (predicted), the GPU has 80.00 GiB"
    )
    assert module.config.kernel == module.model.config.kernel == "reference"
    module = BDHLitModule(**settings, kernel="auto")
    assert fake_run(module, monkeypatch, small) == (
        f"kernel chunked: reference needs {format_bytes(peaks['reference'])}, the GPU has {format_bytes(small)}"
    )
    assert module.model.config.kernel == "chunked" and module.hparams.kernel == "auto"  # checkpoints keep auto
    module = BDHLitModule(**settings, kernel="auto")
    assert "may not fit either" in fake_run(module, monkeypatch, AUTO_FIXED_MARGIN)
    module = BDHLitModule(**settings, kernel="reference")
    assert fake_run(module, monkeypatch, AUTO_FIXED_MARGIN) == "kernel reference: set by model.kernel"


def test_auto_choice_for_the_configs():
    """The configs on an 80 GB GPU: 8gb and 14gb fit the reference, 24gb needs chunked (over 190 GiB)."""
    import yaml
    from conftest import REPO

    from bdh_lightning.estimate import choose_kernel

    expected = {"8gb": "reference", "14gb": "reference", "24gb": "chunked"}
    for name, kernel in expected.items():
        raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        config = BDHConfig.from_dict(raw["model"])
        got, reason = choose_kernel(config, raw["data"]["batch_size"], raw["data"]["block_size"], "bf16-mixed", "cuda",
                                    80 * 2**30)  # fmt: skip
        assert got == kernel, reason
    assert reason.startswith("kernel chunked: reference needs 19") and reason.endswith(" GiB, the GPU has 80.00 GiB")
    cpu_kernel, cpu_reason = choose_kernel(config, 1, 64, "32-true", "cpu")
    assert cpu_kernel == "reference" and cpu_reason.startswith("kernel reference: on the CPU, below 2**23")


# ---------------------------------------------------------------------------------------------------
# Carried state: a window that continues a stream (the chunked kernel against the reference's stream read)


def stream_state(B, H, N, D, dtype, seed=9):
    """A random carried state (B, H, N, D): what earlier windows' sum of qᵀ x would be, never zeros."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) * 0.5).to(dtype)


def per_row_phases(B, T, N):
    """cos, sin (B, 1, T, N) for rows at different stream positions (forward_stream's per-row case)."""
    positions = torch.tensor([[40], [3], [17]][:B]) + torch.arange(T)
    return tuple(t.unsqueeze(1) for t in rope_cos_sin(positions, N))


def assert_all_close(got, want, tol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) < tol, rel_err(g, w)


STREAM = dict(B=2, T=9, D=8, H=2, N=28)  # chunk widths 28 (one), 14 (two), 10 (10, 10, 8): none equals T or D


@pytest.mark.parametrize("chunk_size", [0, 14, 10])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("carried", [True, False], ids=["state", "fresh"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_chunked_continues_a_stream_as_the_reference_does(chunk_size, p, carried, per_row):
    """Output, the state after the window and every gradient, float64 to 1e-10: the state is a constant."""
    x, weights, cos, sin, grad_out = random_layer(torch.float64, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    if per_row:
        cos, sin = per_row_phases(B, T, N)
    state = stream_state(B, H, N, D, torch.float64) if carried else None
    mask = dropout_mask(77, B, H, T, N, p).double() if p else None
    want_states, got_states = [], []
    want = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask, read=stream_attention(state, want_states))
    got = chunked_layer(x, *weights, cos, sin, p, seed=77, chunk_size=chunk_size, state=state, states_out=got_states)
    assert len(got_states) == 1 and got_states[0].dtype == torch.float64
    assert_all_close([got, got_states[0]], [want, want_states[0]], 1e-10)
    inputs = [x, *weights]
    assert_all_close(grads(got, grad_out, inputs), grads(want, grad_out, inputs), 1e-10)
    if carried:  # the state did count: without it the window reads something else
        alone = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask)
        assert rel_err(got, alone) > 1e-2


def test_a_float32_state_continues_a_float64_window_in_float64():
    """A state written by a float32 window, read by a float64 one: the read and the new state in float64."""
    x, weights, cos, sin, grad_out = random_layer(torch.float64, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    state = stream_state(B, H, N, D, torch.float32)
    want_states, got_states = [], []
    want = reference_layer(x, *weights, cos, sin, read=stream_attention(state, want_states))
    got = chunked_layer(x, *weights, cos, sin, chunk_size=10, state=state, states_out=got_states)
    assert want_states[0].dtype == got_states[0].dtype == torch.float64
    assert_all_close([got, got_states[0]], [want, want_states[0]], 1e-10)
    inputs = [x, *weights]
    assert_all_close(grads(got, grad_out, inputs), grads(want, grad_out, inputs), 1e-10)


@pytest.mark.parametrize("chunk_size", [0, 10])
def test_bf16_true_window_reads_and_writes_a_float32_state(chunk_size):
    """bf16 weights (bf16-true) and a float32 state: the state after the window stays float32, the rest
    matches the reference's stream read to bf16's precision."""
    x, weights, cos, sin, grad_out = random_layer(torch.bfloat16, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    state = stream_state(B, H, N, D, torch.float32)
    mask = dropout_mask(5, B, H, T, N, 0.2).to(torch.bfloat16)
    want_states, got_states = [], []
    want = reference_layer(x, *weights, cos, sin, 0.2, True, dropout_mask=mask,
                           read=stream_attention(state, want_states))  # fmt: skip
    got = chunked_layer(x, *weights, cos, sin, 0.2, seed=5, chunk_size=chunk_size, state=state, states_out=got_states)
    assert got.dtype == torch.bfloat16 and got_states[0].dtype == want_states[0].dtype == torch.float32
    assert_all_close([got, got_states[0]], [want, want_states[0]], 3e-2)
    inputs = [x, *weights]
    assert_all_close(grads(got, grad_out, inputs), grads(want, grad_out, inputs), 5e-2)


# ---------------------------------------------------------------------------------------------------
# apply_layer: which implementation runs, and what it is handed


def layer_kinds(out):
    """The autograd node types behind `out`: ChunkedLayerBackward where the chunked kernel ran."""
    kinds, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.add(type(node).__name__)
        stack.extend(parent for parent, _ in node.next_functions)
    return kinds


def ran_chunked(out):
    return "ChunkedLayerBackward" in layer_kinds(out)


@pytest.fixture
def chunks_seen(monkeypatch):
    """The (head, start, stop) of every dropout block the chunked kernel draws, forward and backward."""

    seen = []

    def recording_block_keep(seed, head, batch, length, start, stop, p, device=None):
        seen.append((head, start, stop))
        return masks.block_keep(seed, head, batch, length, start, stop, p, device)

    monkeypatch.setattr(chunked, "block_keep", recording_block_keep)
    return seen


def test_apply_layer_defaults_are_an_evaluation_pass_of_the_reference():
    from bdh_lightning.kernels import apply_layer

    x, weights, cos, sin, grad_out = random_layer(torch.float64)
    want = reference_layer(x, *weights, cos, sin)
    got = apply_layer(x, *weights, cos, sin)  # kernel auto: the reference at this size on the CPU
    assert not ran_chunked(got)
    assert torch.equal(got, want)
    assert torch.equal(apply_layer(x, *weights, cos, sin, training=True), want)  # no dropout unless asked
    assert torch.equal(apply_layer(x, *weights, cos, sin, dropout=0.3), want)  # nor outside training
    got = apply_layer(x, *weights, cos, sin, kernel="chunked", dropout=0.3)
    assert ran_chunked(got)
    assert_all_close([got, *grads(got, grad_out, [x, *weights])], [want, *grads(want, grad_out, [x, *weights])], 1e-10)


@pytest.mark.parametrize("stream", [False, True], ids=["window", "stream"])
def test_apply_layer_runs_the_kernel_it_names_with_dropout_in_training_only(stream, chunks_seen):
    from bdh_lightning.kernels import apply_layer

    x, weights, cos, sin, grad_out = random_layer(torch.float64, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    state = stream_state(B, H, N, D, torch.float64) if stream else None
    inputs = [x, *weights]

    def run(kernel, training, p=0.3):
        extra = dict(stream=True, state=state) if stream else {}
        out = apply_layer(x, *weights, cos, sin, kernel=kernel, dropout=p, training=training, chunk_size=10, **extra)
        out, states = (out[0], [out[1]]) if stream else (out, None)
        assert ran_chunked(out) == (kernel == "chunked")
        return out, states

    def expected(mask=None, training=False, p=0.3):
        states = []
        read = stream_attention(state, states) if stream else layer.causal_attention
        return reference_layer(x, *weights, cos, sin, p, training, dropout_mask=mask, read=read), states

    evaluation, eval_states = expected()
    eval_grads = grads(evaluation, grad_out, inputs)
    for kernel in ("reference", "chunked"):
        got, states = run(kernel, training=False)
        assert_all_close([got, *grads(got, grad_out, inputs)], [evaluation, *eval_grads], 1e-10)
        if stream:
            assert_all_close(states, eval_states, 1e-10)
    # Training: the reference draws torch's dropout, chunked its seed, both from the global generator.
    torch.manual_seed(3)
    got, states = run("reference", training=True)
    torch.manual_seed(3)
    want, want_states = expected(training=True)
    assert torch.equal(got, want) and rel_err(got, evaluation) > 1e-3
    torch.manual_seed(4)
    seed = draw_seed()
    torch.manual_seed(4)
    chunks_seen.clear()
    got, states = run("chunked", training=True)
    assert chunks_seen == [(0, 0, 10), (0, 10, 20), (0, 20, 28), (1, 0, 10), (1, 10, 20), (1, 20, 28)]  # chunk_size
    want, want_states = expected(dropout_mask(seed, B, H, T, N, 0.3).double(), training=True)
    assert_all_close([got, *grads(got, grad_out, inputs)], [want, *grads(want, grad_out, inputs)], 1e-10)
    assert rel_err(got, evaluation) > 1e-3
    if stream:
        assert_all_close(states, want_states, 1e-10)


def test_chunked_default_chunk_is_a_whole_head(chunks_seen):
    """chunk_size 0 (the default of apply_layer and chunked_layer): one chunk per head at these sizes."""
    from bdh_lightning.kernels import apply_layer

    x, weights, cos, sin, _ = random_layer(torch.float64, **STREAM)
    apply_layer(x, *weights, cos, sin, kernel="chunked", dropout=0.3, training=True)
    chunked_layer(x, *weights, cos, sin, 0.3, seed=1)
    assert chunks_seen == [(0, 0, 28), (1, 0, 28)] * 2


def test_auto_switches_at_cpu_chunked_from_counting_b_h_t_n(monkeypatch):
    """`auto` on the CPU: chunked from CPU_CHUNKED_FROM elements of one B x H x T x N tensor (moved here to
    this test's size), the reference below it."""
    from bdh_lightning import kernels

    x, weights, cos, sin, _ = random_layer(torch.float64, **STREAM)
    n_wide = 2 * 2 * 9 * 28
    monkeypatch.setattr(kernels, "CPU_CHUNKED_FROM", n_wide)
    assert ran_chunked(kernels.apply_layer(x, *weights, cos, sin))
    monkeypatch.setattr(kernels, "CPU_CHUNKED_FROM", n_wide + 1)
    assert not ran_chunked(kernels.apply_layer(x, *weights, cos, sin))


def test_automatic_chunks_split_n_evenly_above_auto_chunk_elements(monkeypatch, chunks_seen):
    """chunk_size 0 where a head's B x T x N tensors pass AUTO_CHUNK_ELEMENTS (lowered to this size): the
    fewest equal even chunks, and still the reference's function."""

    size = dict(B=2, T=9, D=8, H=1, N=70)
    monkeypatch.setattr(chunked, "AUTO_CHUNK_ELEMENTS", 2 * 9 * 70 // 3)  # three pieces: ceil(70 / 3) = 24
    x, weights, cos, sin, grad_out = random_layer(torch.float64, **size)
    mask = dropout_mask(8, 2, 1, 9, 70, 0.3).double()
    want = reference_layer(x, *weights, cos, sin, 0.3, True, dropout_mask=mask)
    got = chunked_layer(x, *weights, cos, sin, 0.3, seed=8)
    assert chunks_seen == [(0, 0, 24), (0, 24, 48), (0, 48, 70)]
    inputs = [x, *weights]
    assert_all_close([got, *grads(got, grad_out, inputs)], [want, *grads(want, grad_out, inputs)], 1e-10)


def test_fused_is_handed_the_layer_and_the_applied_dropout(monkeypatch):
    """apply_layer's fused branch (the kernel itself runs under Triton's interpreter in test_fused.py):
    fused_layer, chunked_layer's signature and function, gets the weights in order and dropout only in
    training; a stream window runs chunked (the fused kernel reads no carried state)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from bdh_lightning import kernels
    from bdh_lightning.kernels import fused  # the plain import: triton's kernels compiled, not interpreted

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what lets resolve_kernel take fused on CPU tensors
    calls = []

    def recording_fused_layer(*args, **kwargs):
        calls.append(args)
        return chunked_layer(*args, **kwargs)

    monkeypatch.setattr(fused, "fused_layer", recording_fused_layer)
    x, weights, cos, sin, grad_out = random_layer(torch.float64, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    evaluation = reference_layer(x, *weights, cos, sin)
    got = kernels.apply_layer(x, *weights, cos, sin, kernel="fused", dropout=0.3)
    assert len(calls) == 1 and all(a is b for a, b in zip(calls[0], (x, *weights, cos, sin)))
    assert calls[0][6:] == (0.0,)
    assert_all_close([got], [evaluation], 1e-10)
    torch.manual_seed(6)
    seed = draw_seed()
    torch.manual_seed(6)
    got = kernels.apply_layer(x, *weights, cos, sin, kernel="fused", dropout=0.3, training=True)
    assert len(calls) == 2 and calls[1][6:] == (0.3,)
    want = reference_layer(x, *weights, cos, sin, 0.3, True, dropout_mask=dropout_mask(seed, B, H, T, N, 0.3).double())
    assert_all_close([got], [want], 1e-10)
    state, want_states = stream_state(B, H, N, D, torch.float64), []
    got, got_state = kernels.apply_layer(x, *weights, cos, sin, kernel="fused", stream=True, state=state)
    assert len(calls) == 2 and ran_chunked(got)
    want = reference_layer(x, *weights, cos, sin, read=stream_attention(state, want_states))
    assert_all_close([got, got_state], [want, *want_states], 1e-10)


@pytest.mark.parametrize(
    "kernel, stream, region",
    [("chunked", False, True), ("reference", False, True), ("auto", False, True), ("fused", False, False),
     ("fused", True, True), ("reference", True, True)],
)  # fmt: skip
def test_apply_layer_runs_through_the_compile_region_except_a_fused_window(monkeypatch, kernel, stream, region):
    """Every layer goes through kernels.layer_region (one compile region), except the fused kernel's plain windows
    (the Triton kernel has never run inside such a region); a stream window of `fused` runs chunked, in it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from bdh_lightning import kernels
    from bdh_lightning.kernels import fused  # the plain import: triton's kernels compiled, not interpreted

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what lets resolve_kernel take fused on CPU tensors
    called = []
    monkeypatch.setattr(kernels, "layer_region", lambda x, *args: called.append(("region", *args[-5:-2])) or x)
    monkeypatch.setattr(fused, "fused_layer", lambda x, *args, **kwargs: called.append(("plain",)) or x)
    x, weights, cos, sin, _ = random_layer(torch.float64, **STREAM)
    kernels.apply_layer(x, *weights, cos, sin, kernel=kernel, dropout=0.3, training=True, chunk_size=8, stream=stream)
    resolved = "reference" if kernel == "auto" else kernel  # auto at this size on the CPU
    assert called == [("region", resolved, 0.3, 8) if region else ("plain",)]


# ---------------------------------------------------------------------------------------------------
# The small functions: seeds, dtypes, chunk widths, kernel names and their messages


def test_chunked_draws_a_seed_only_for_dropout():
    x, weights, cos, sin, _ = random_layer(torch.float64, **STREAM)
    B, T, D, H, N = (STREAM[k] for k in "BTDHN")
    torch.manual_seed(2)
    seed = draw_seed()
    torch.manual_seed(2)
    got = chunked_layer(x, *weights, cos, sin, 0.3, chunk_size=10)
    after = torch.rand(3)
    want = reference_layer(x, *weights, cos, sin, 0.3, True, dropout_mask=dropout_mask(seed, B, H, T, N, 0.3).double())
    assert rel_err(got, want) < 1e-10
    torch.manual_seed(2)
    torch.rand(())  # what one draw moves the generator by: the next numbers differ
    assert not torch.equal(torch.rand(3), after)
    torch.manual_seed(2)
    chunked_layer(x, *weights, cos, sin, 0.0, chunk_size=10)  # no dropout: the generator is left alone
    torch.manual_seed(2)
    expected_next = torch.rand(3)
    torch.manual_seed(2)
    chunked_layer(x, *weights, cos, sin, chunk_size=10)
    assert torch.equal(torch.rand(3), expected_next)


def test_an_int32_seed_tensor_gives_the_masks_of_its_value():
    x, weights, cos, sin, _ = random_layer(torch.float64, **STREAM)
    want = chunked_layer(x, *weights, cos, sin, 0.3, seed=2**30 + 7, chunk_size=10)
    got = chunked_layer(x, *weights, cos, sin, 0.3, seed=torch.tensor(2**30 + 7, dtype=torch.int32), chunk_size=10)
    assert torch.equal(got, want)


def test_draw_seed_draws_what_fused_draws():
    """fused_layer draws its seed as torch.randint(0, 2**62, ()): under one generator state both kernels
    take the same masks (test_fused.py's model check trains them side by side)."""
    for state in (0, 1, 12345):
        torch.manual_seed(state)
        seed = draw_seed()
        torch.manual_seed(state)
        assert seed.dtype == torch.int64 and seed.shape == () and seed.item() == torch.randint(0, 2**62, ()).item()


def test_compute_dtypes():
    from bdh_lightning.kernels.chunked import compute_dtypes

    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    for dtype, expected in ((f32, (f32, f32)), (f64, (f64, f64)), (bf16, (bf16, f32)), (f16, (f16, f32))):
        assert compute_dtypes(torch.ones(2, dtype=dtype)) == expected
    with torch.autocast("cpu", dtype=bf16):
        assert compute_dtypes(torch.ones(2)) == (bf16, f32)
        assert compute_dtypes(torch.ones(2, dtype=f64)) == (bf16, f32)


def test_chunked_saves_float32_reads_under_bf16():
    """What the chunked kernel keeps for backward (estimate.py counts it): x, the scores S (B, H, T, T) in
    the products' dtype, y (B, H, T, D) and its rstd in float32, whatever the weights' dtype."""
    size = dict(B=2, T=9, D=8, H=2, N=28)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        x, weights, cos, sin, _ = random_layer(dtype, **size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = chunked_layer(x, *weights, cos, sin, 0.2, seed=3, chunk_size=10)
        stack, node = [out.grad_fn], None
        while node is None or type(node).__name__ != "ChunkedLayerBackward":
            node = stack.pop()
            stack.extend(parent for parent, _ in node.next_functions if parent is not None)
        saved = node.saved_tensors
        scores, ys, rstds = saved[7:10]
        assert scores.shape == (2, 2, 9, 9) and scores.dtype == torch.bfloat16
        assert ys.shape == (2, 2, 9, 8) and ys.dtype == torch.float32
        assert rstds.shape == (2, 2, 9, 1) and rstds.dtype == torch.float32


def test_chunked_scores_past_float16_range_under_16_true():
    """Scores q qᵀ themselves past 65504: chunked makes them in float32 under 16-true, as the reference does."""
    gen = torch.Generator().manual_seed(1)
    T, D, H, N = 16, 32, 1, 64
    x = layer_norm(torch.randn(1, 1, T, D, generator=gen))
    encoder = torch.randn(H, D, N, generator=gen) * 12.0
    q = rope(torch.relu(x @ encoder), *rope_cos_sin(torch.arange(T), N))
    assert (q @ q.transpose(-1, -2)).abs().max() > 2 * 65504
    weights = [encoder, torch.randn(H, D, N, generator=gen) * 0.02, torch.randn(H * N, D, generator=gen) * 0.02]
    cos, sin = rope_cos_sin(torch.arange(T), N)
    expected = reference_layer(x, *weights, cos, sin)
    for chunk_size in (0, 22):
        got = chunked_layer(x.half(), *(w.half() for w in weights), cos, sin, chunk_size=chunk_size)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)


def test_chunk_width_rounds_up_to_even_and_is_an_int():
    assert chunk_width(0, 4026531, 50) == 18  # 3 pieces of 50: ceil(50 / 3) = 17, rounded up to 18
    for args in ((0, 10, 128), (0, 3 * 2**20, 100), (0, 4026531, 50), (25, 10, 70)):
        assert type(chunk_width(*args)) is int


def test_kernel_names_and_messages(monkeypatch):
    import importlib.util

    from bdh_lightning.kernels import fused_unavailable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernel("auto", cpu, n_wide=2**23 - 1) == "reference"
    assert resolve_kernel("auto", cpu, n_wide=2**23) == "chunked"
    assert resolve_kernel("auto", cpu) == "reference"
    assert resolve_kernel("chunked", cpu) == "chunked"
    with pytest.raises(ConfigError) as error:
        resolve_kernel("fast", cpu)
    assert str(error.value) == "model.kernel must be one of auto, reference, chunked, fused; got 'fast'"
    needs_cuda = (
        "it needs a CUDA device; on cpu tensors it runs only under TRITON_INTERPRET=1 "
        "(Triton's interpreter: slow, for tests)"
    )
    assert fused_unavailable(cuda) is None
    assert fused_unavailable(cpu) == needs_cuda
    with pytest.raises(ConfigError) as error:
        resolve_kernel("fused", cpu)
    assert str(error.value) == f"model.kernel=fused cannot run here: {needs_cuda}; use model.kernel=chunked (or auto)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fused_unavailable(cpu) == needs_cuda
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_unavailable(cpu) is None and resolve_kernel("fused", cpu) == "fused"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert fused_unavailable(cuda) == fused_unavailable(cpu) == "triton is not installed (pip install triton)"
    with pytest.raises(ConfigError) as error:
        resolve_kernel("fused", cuda)
    assert str(error.value) == (
        "model.kernel=fused cannot run here: triton is not installed (pip install triton); "
        "use model.kernel=chunked (or auto)"
    )


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("fresh", [True, False])
def test_apply_layer_on_a_stream_returns_the_output_and_the_state_after(kernel, fresh):
    """apply_layer(stream=True) (forward_stream's call): the output and the state after the window that the kernel
    computes from `state` (None: a fresh stream), the settings passed through (dropout in training, chunk_size)."""
    from bdh_lightning.kernels import apply_layer

    x, weights, cos, sin, _ = random_layer(torch.float64, N=20)
    B, H, D, N = x.shape[0], weights[0].shape[0], x.shape[-1], 20
    state = None if fresh else torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    settings = dict(kernel=kernel, dropout=0.25, chunk_size=6, stream=True, state=state)
    written: list = []
    torch.manual_seed(3)
    if kernel == "chunked":
        want = chunked_layer(x, *weights, cos, sin, 0.25, chunk_size=6, state=state, states_out=written)
    else:
        want = reference_layer(x, *weights, cos, sin, 0.25, True, read=stream_attention(state, written))
    torch.manual_seed(3)
    got, got_state = apply_layer(x, *weights, cos, sin, training=True, **settings)
    assert torch.equal(got, want) and torch.equal(got_state, written[0])
    torch.manual_seed(3)
    evaluated, evaluated_state = apply_layer(x, *weights, cos, sin, **settings)
    assert not torch.equal(evaluated, want)  # no dropout outside training
    assert torch.equal(evaluated_state, got_state)  # the state is the queries' and inputs': dropout never reaches it
