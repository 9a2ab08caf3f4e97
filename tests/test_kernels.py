"""The chunked layer against the plain reference: outputs and every gradient, dropout masks, gradcheck,
autocast, checkpoints across kernels, torch.compile."""

import pytest
import torch

from bdh_lightning.kernels import MASK_BLOCK, chunked_layer, dropout_mask, resolve_kernel
from bdh_lightning.errors import ConfigError
from bdh_lightning.layer import layer_norm, reference_layer, rope_cos_sin
from bdh_lightning.model import BDH, BDHConfig


def random_layer(dtype, B=2, T=12, D=16, H=2, N=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = layer_norm(torch.randn(B, 1, T, D, dtype=dtype, generator=gen)).requires_grad_()
    weights = [
        (torch.randn(H, D, N, dtype=dtype, generator=gen) * 0.3).requires_grad_(),
        (torch.randn(H, D, N, dtype=dtype, generator=gen) * 0.3).requires_grad_(),
        (torch.randn(H * N, D, dtype=dtype, generator=gen) * 0.1).requires_grad_(),
    ]
    cos, sin = rope_cos_sin(torch.arange(T), N)
    grad_out = torch.randn(B, 1, T, D, dtype=dtype, generator=gen)
    return x, weights, cos, sin, grad_out


def grads(out, grad_out, inputs):
    return torch.autograd.grad(out, inputs, grad_out)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size", [dict(B=2, T=12, D=16, H=2, N=128), dict(B=3, T=20, D=8, H=3, N=192), dict(B=1, T=9, D=32, H=1, N=64)])
@pytest.mark.parametrize("chunk_size", [0, MASK_BLOCK, 2 * MASK_BLOCK])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_equals_reference(dtype, tol, size, chunk_size, p):
    x, weights, cos, sin, grad_out = random_layer(dtype, **size)
    B, T, H, N = size["B"], size["T"], size["H"], size["N"]
    mask = dropout_mask(1234, B, H, T, N, p).to(dtype) if p else None
    expected = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask)
    got = chunked_layer(x, *weights, cos, sin, p, seed=1234, chunk_size=chunk_size)
    assert rel_err(got, expected) < tol
    for g, e in zip(grads(got, grad_out, [x, *weights]), grads(expected, grad_out, [x, *weights])):
        assert rel_err(g, e) < tol


def test_gradcheck_tiny():
    x, weights, cos, sin, _ = random_layer(torch.float64, B=2, T=5, D=4, H=2, N=128)
    for chunk_size in (0, MASK_BLOCK):  # one chunk per head, and two
        assert torch.autograd.gradcheck(
            lambda *t: chunked_layer(*t, cos, sin, 0.25, seed=7, chunk_size=chunk_size), (x, *weights), fast_mode=True
        )


def test_dropout_masks_regenerate_from_the_seed():
    B, H, T, N, p = 2, 2, 16, 256, 0.25
    mask = dropout_mask(99, B, H, T, N, p)
    assert torch.equal(mask, dropout_mask(99, B, H, T, N, p))  # same seed, same mask
    assert not torch.equal(mask, dropout_mask(100, B, H, T, N, p))
    assert abs(mask.mean().item() - (1 - p)) < 0.02
    # The chunked layer with the seed equals the reference with that mask, whatever the chunk size.
    x, weights, cos, sin, _ = random_layer(torch.float64, B=B, T=T, H=H, N=N)
    expected = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask.double())
    for chunk_size in (MASK_BLOCK, 2 * MASK_BLOCK, N):
        assert rel_err(chunked_layer(x, *weights, cos, sin, p, seed=99, chunk_size=chunk_size), expected) < 1e-12
    # Without a seed, one is drawn from torch's global generator: reproducible under manual_seed.
    torch.manual_seed(5)
    first = chunked_layer(x, *weights, cos, sin, p)
    torch.manual_seed(5)
    assert torch.equal(first, chunked_layer(x, *weights, cos, sin, p))


def test_autocast_bf16_close_to_reference():
    x, weights, cos, sin, grad_out = random_layer(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_layer(x, *weights, cos, sin, 0.0, True)
        got = chunked_layer(x, *weights, cos, sin, 0.0)
    assert got.dtype == expected.dtype
    assert rel_err(got.float(), expected.float()) < 3e-2
    g_got, g_exp = grads(got, grad_out.to(got.dtype), [x, *weights]), grads(expected, grad_out.to(expected.dtype), [x, *weights])
    for g, e, w in zip(g_got, g_exp, [x, *weights]):
        assert g.dtype == w.dtype
        assert rel_err(g, e) < 5e-2


def tiny_config(kernel, **overrides):
    return BDHConfig(**{**dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0, kernel=kernel), **overrides})


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


def test_kernel_switch():
    assert resolve_kernel("auto", torch.device("cpu"), n_wide=2**21) == "reference"
    assert resolve_kernel("auto", torch.device("cpu"), n_wide=2**24) == "chunked"
    assert resolve_kernel("auto", torch.device("cuda")) == "chunked"
    assert resolve_kernel("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ConfigError, match="fused is not available"):
        resolve_kernel("fused", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
def test_chunked_on_cuda_equals_cpu_reference():
    x, weights, cos, sin, grad_out = random_layer(torch.float64)
    expected = reference_layer(x, *weights, cos, sin, 0.0, True)
    inputs = [t.detach().cuda().requires_grad_() for t in (x, *weights)]
    got = chunked_layer(*inputs, cos.cuda(), sin.cuda(), 0.0, chunk_size=MASK_BLOCK)
    assert rel_err(got.cpu(), expected) < 1e-10
    for g, e in zip(grads(got, grad_out.cuda(), inputs), grads(expected, grad_out, [x, *weights])):
        assert rel_err(g.cpu(), e) < 1e-10


def fit_tiny(tmp_path, **module_args):
    import lightning as L

    from bdh_lightning.module import BDHLitModule

    L.seed_everything(0)
    data = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=4)
    args = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1, block_size=16)
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
    """torch.compile on the CPU (inductor needs a C compiler): a two-step fit, then the saved keys."""
    module, path = fit_tiny(tmp_path, kernel="chunked", compile=True)
    assert module._compiled
    keys = set(torch.load(path, weights_only=False)["state_dict"])
    assert {"model.embed.weight", "model.encoder", "model.encoder_v", "model.decoder", "model.lm_head"} <= keys
    assert not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("chunk_size", [0, 64])
def test_chunked_attention_does_not_overflow_under_float16_autocast(chunk_size):
    """Scores and S @ x past float16's range: the chunked layer keeps them in float32, as the reference does."""
    from test_faults import overflowing_inputs  # inputs shown there to overflow float16 attention

    x, encoder, encoder_v, decoder, cos, sin = overflowing_inputs()
    weights = [w.requires_grad_() for w in (encoder, encoder_v, decoder)]
    expected = reference_layer(x, *weights, cos, sin, 0.0, False)
    with torch.autocast("cpu", dtype=torch.float16):
        got = chunked_layer(x, *weights, cos, sin, 0.0, chunk_size=chunk_size)
        reference_half = reference_layer(x, *weights, cos, sin, 0.0, False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)
    torch.testing.assert_close(got.float(), reference_half.float(), atol=2e-2, rtol=0)
    got.float().square().sum().backward()
    assert all(torch.isfinite(w.grad).all() for w in weights)
