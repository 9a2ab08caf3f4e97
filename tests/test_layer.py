"""The layer's primitives (bdh_lightning/layer.py) one by one against the spec oracle (tests/spec_oracle.py),
on random inputs in float64 (tight) and float32, forward and gradients."""

import math

import pytest
import torch
from spec_oracle import oracle_layer, oracle_layer_norm, oracle_rope

from bdh_lightning.layer import (
    LN_EPS,
    ROPE_THETA,
    attention_dtype,
    causal_attention,
    decode,
    layer_norm,
    layer_output,
    neuron_activations,
    reference_layer,
    rope,
    rope_cos_sin,
    rope_frequencies,
)

B, H, T, D, N = 2, 3, 11, 12, 10


def randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def layer_inputs(seed=0, dtype=torch.float64, T=T):
    x = oracle_layer_norm(randn(B, 1, T, D, seed=seed, dtype=dtype))
    encoder = randn(H, D, N, seed=seed + 1, scale=0.5, dtype=dtype)
    encoder_v = randn(H, D, N, seed=seed + 2, scale=0.5, dtype=dtype)
    decoder = randn(H * N, D, seed=seed + 3, scale=0.3, dtype=dtype)
    cos, sin = rope_cos_sin(torch.arange(T), N)
    return x, encoder, encoder_v, decoder, cos, sin


def oracle_activations(x, encoder, encoder_v):
    """a and b of every head, written out per head from the spec."""
    positions = torch.arange(x.shape[-2])
    strictly_lower = torch.tril(torch.ones(x.shape[-2], x.shape[-2], dtype=x.dtype), diagonal=-1)
    a_heads, b_heads = [], []
    for h in range(encoder.shape[0]):
        a = torch.relu(x[:, 0] @ encoder[h])
        q = oracle_rope(a, positions)
        y = oracle_layer_norm(((q @ q.transpose(-1, -2)) * strictly_lower) @ x[:, 0])
        a_heads.append(a)
        b_heads.append(torch.relu(y @ encoder_v[h]))
    return torch.stack(a_heads, 1), torch.stack(b_heads, 1)


def test_constants_are_the_spec_ones():
    assert ROPE_THETA == 65536.0 and LN_EPS == 1e-5


@pytest.mark.parametrize("scale", [1.0, 1e-3, 30.0])
def test_layer_norm_matches_the_oracle(scale):
    # scale 1e-3: the variance (1e-6) is below eps, so a wrong eps shows; a mean offset so centring matters.
    z = randn(4, 7, 33, seed=1, scale=scale) + 2.5 * scale
    torch.testing.assert_close(layer_norm(z), oracle_layer_norm(z), rtol=1e-12, atol=1e-12)
    assert layer_norm(z).shape == z.shape


def test_layer_norm_normalizes_the_last_axis_only():
    z = randn(3, 5, 8, seed=2) * torch.arange(1.0, 9.0, dtype=torch.float64)
    out = layer_norm(z)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    variance = out.var(-1, unbiased=False)
    want = z.var(-1, unbiased=False) / (z.var(-1, unbiased=False) + LN_EPS)
    torch.testing.assert_close(variance, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("n", [2, 10, 64, 46])
def test_rope_frequencies_formula(n):
    f = rope_frequencies(n)
    assert f.dtype == torch.float32 and f.shape == (n,)
    k = torch.arange(n) // 2 * 2
    want = 1.0 / (65536.0 ** (k.double() / n)) / (2 * math.pi)
    torch.testing.assert_close(f.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(f[0::2], f[1::2])  # a pair shares its frequency
    assert f[0] == pytest.approx(1 / (2 * math.pi))


def test_rope_cos_sin_at_positions_not_starting_at_zero():
    positions = torch.tensor([3, 0, 17, 1000])
    cos, sin = rope_cos_sin(positions, N)
    turns = positions.double()[:, None] * rope_frequencies(N).double()
    torch.testing.assert_close(cos.double(), torch.cos(2 * math.pi * turns), rtol=0, atol=1e-3)
    torch.testing.assert_close(sin.double(), torch.sin(2 * math.pi * turns), rtol=0, atol=1e-3)
    assert cos.dtype == sin.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rope_matches_the_oracle_forward_and_backward(dtype):
    v = randn(B, H, T, N, seed=3, dtype=dtype).requires_grad_()
    positions = torch.arange(5, 5 + T)
    cos, sin = rope_cos_sin(positions, N)
    got = rope(v, cos, sin)
    want = oracle_rope(v, positions)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.dtype == dtype
    g = randn(B, H, T, N, seed=4, dtype=dtype)
    torch.testing.assert_close(*[torch.autograd.grad(o, v, g)[0] for o in (got, want)], rtol=tol, atol=tol)


def test_attention_dtype():
    assert attention_dtype(torch.float16) == torch.float32
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert attention_dtype(dtype) == dtype


def test_causal_attention_matches_the_oracle():
    x = oracle_layer_norm(randn(B, 1, T, D, seed=5))
    q = randn(B, H, T, N, seed=6).relu()
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.float64), diagonal=-1)
    want = oracle_layer_norm(((q @ q.transpose(-1, -2)) * strictly_lower) @ x)
    got = causal_attention(q, x)
    assert got.shape == (B, H, T, D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_causal_attention_of_float16_is_computed_in_float32():
    # Queries large enough that the scores pass float16's largest value (65504) but not float32's.
    x = oracle_layer_norm(randn(1, 1, 40, D, seed=7, dtype=torch.float32))
    q = (randn(1, 2, 40, 16, seed=8, dtype=torch.float32).relu() * 60).half()
    got = causal_attention(q, x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    want = causal_attention(q.float(), x.half().float())
    torch.testing.assert_close(got.float(), want, rtol=0, atol=5e-3)
    # And under autocast, where a matmul would otherwise be cast back to float16.
    with torch.autocast("cpu", dtype=torch.float16):
        under_autocast = causal_attention(q, x.half())
    assert torch.isfinite(under_autocast).all()
    torch.testing.assert_close(under_autocast.float(), want, rtol=0, atol=5e-3)


def test_neuron_activations_match_the_oracle():
    x, encoder, encoder_v, _, cos, sin = layer_inputs(seed=9)
    a, b = neuron_activations(x, encoder, encoder_v, cos, sin)
    want_a, want_b = oracle_activations(x, encoder, encoder_v)
    assert (a > 0).any() and (a == 0).any() and (b > 0).any() and (b == 0).any()  # sparse, not all zero
    torch.testing.assert_close(a, want_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, want_b, rtol=1e-12, atol=1e-12)


def test_neuron_activations_use_the_read_they_are_given():
    x, encoder, encoder_v, _, cos, sin = layer_inputs(seed=10)
    seen = {}

    def read(q, values):
        seen["q"], seen["x"] = q, values
        return torch.ones(B, H, T, D, dtype=x.dtype)

    a, b = neuron_activations(x, encoder, encoder_v, cos, sin, read=read)
    torch.testing.assert_close(seen["q"], rope(torch.relu(x @ encoder), cos, sin))
    assert seen["x"] is x
    torch.testing.assert_close(b, torch.relu(torch.ones(B, H, T, D, dtype=x.dtype) @ encoder_v))


def test_decode_is_heads_major():
    z = randn(B, H, T, N, seed=11)
    decoder = randn(H * N, D, seed=12)
    want = torch.cat([z[:, h] for h in range(H)], dim=-1) @ decoder  # neuron n of head h is row h*N + n
    got = decode(z, decoder)
    assert got.shape == (B, 1, T, D)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-12, atol=1e-12)


def test_layer_output_is_ln_of_x_plus_ln_u():
    x, u = randn(B, 1, T, D, seed=13), randn(B, 1, T, D, seed=14, scale=7.0) + 3.0
    torch.testing.assert_close(layer_output(x, u), oracle_layer_norm(x + oracle_layer_norm(u)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_layer_matches_the_oracle_forward_and_gradients(dtype):
    x, *weights = layer_inputs(seed=15, dtype=dtype)
    weights, (cos, sin) = weights[:3], weights[3:]
    inputs = [x.requires_grad_(), *(w.requires_grad_() for w in weights)]
    got = reference_layer(x, *weights, cos, sin)
    want = oracle_layer(x[:, 0], *weights).unsqueeze(1)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = randn(B, 1, T, D, seed=16, dtype=dtype)
    for mine, theirs in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol * theirs.abs().max().item())


def test_reference_layer_with_a_dropout_mask_scales_the_kept_products():
    x, encoder, encoder_v, decoder, cos, sin = layer_inputs(seed=17)
    p = 0.3
    mask = (torch.rand(B, H, T, N, generator=torch.Generator().manual_seed(18)) >= p).double()
    a, b = oracle_activations(x, encoder, encoder_v)
    z = a * b * mask / (1 - p)
    want = oracle_layer_norm(x + oracle_layer_norm(decode(z, decoder)))
    got = reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=p, training=True, dropout_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_layer_drops_out_only_when_training_with_p_above_zero():
    x, encoder, encoder_v, decoder, cos, sin = layer_inputs(seed=19)
    plain = reference_layer(x, encoder, encoder_v, decoder, cos, sin)
    assert torch.equal(reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=0.5, training=False), plain)
    assert torch.equal(reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=0.0, training=True), plain)
    torch.manual_seed(20)
    dropped = reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=0.5, training=True)
    assert (dropped - plain).abs().max() > 1e-3
    # It is F.dropout on a*b: the same seed gives the same output as an explicit mask drawn the same way.
    a, b = oracle_activations(x, encoder, encoder_v)
    torch.manual_seed(20)
    z = torch.nn.functional.dropout(a * b, 0.5, training=True)
    torch.testing.assert_close(
        dropped, oracle_layer_norm(x + oracle_layer_norm(decode(z, decoder))), rtol=1e-12, atol=1e-12
    )


def test_reference_layer_defaults_are_no_dropout_and_the_causal_read():
    x, encoder, encoder_v, decoder, cos, sin = layer_inputs(seed=21)
    plain = oracle_layer(x[:, 0], encoder, encoder_v, decoder).unsqueeze(1)
    torch.testing.assert_close(reference_layer(x, encoder, encoder_v, decoder, cos, sin), plain, rtol=1e-12, atol=1e-12)
    # training=True alone (dropout defaults to 0) and dropout alone (training defaults to False) drop nothing.
    torch.testing.assert_close(
        reference_layer(x, encoder, encoder_v, decoder, cos, sin, training=True), plain, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=0.4), plain, rtol=1e-12, atol=1e-12
    )


def test_reference_layer_passes_its_read_on():
    x, encoder, encoder_v, decoder, cos, sin = layer_inputs(seed=22)
    constant = torch.full((B, H, T, D), 0.7, dtype=x.dtype)
    got = reference_layer(x, encoder, encoder_v, decoder, cos, sin, read=lambda q, values: constant)
    a = torch.relu(x @ encoder)
    b = torch.relu(constant @ encoder_v)
    torch.testing.assert_close(got, layer_output(x, decode(a * b, decoder)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_reference_layer_drops_with_the_probability_it_is_given(p):
    x, encoder, encoder_v, decoder, cos, sin = layer_inputs(seed=23)
    a, b = oracle_activations(x, encoder, encoder_v)
    torch.manual_seed(24)
    got = reference_layer(x, encoder, encoder_v, decoder, cos, sin, dropout=p, training=True)
    torch.manual_seed(24)
    z = torch.nn.functional.dropout(a * b, p, training=True)
    torch.testing.assert_close(got, layer_output(x, decode(z, decoder)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_keeps_a_16_bit_dtype(dtype):
    # cos and sin are float32: both products are cast back, so the rotated queries keep v's dtype.
    v = randn(B, H, T, N, seed=25, dtype=torch.float32).to(dtype)
    positions = torch.arange(T)
    got = rope(v, *rope_cos_sin(positions, N))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), oracle_rope(v.float(), positions), rtol=2e-2, atol=2e-2)


def test_rope_cos_sin_stays_float32_past_the_exact_phase_threshold_and_takes_no_positions():
    from bdh_lightning.layer import EXACT_PHASES_FROM

    positions = torch.tensor([3, EXACT_PHASES_FROM - 1, EXACT_PHASES_FROM + 1, 10**8 + 7])
    cos, sin = rope_cos_sin(positions, N)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (4, N)
    turns = (positions.double()[:, None] * rope_frequencies(N).double()) % 1.0
    exact = torch.cos(2 * math.pi * turns)
    torch.testing.assert_close(cos.double()[:2], exact[:2], rtol=0, atol=1e-3)  # float32 t * f: the reference's bits
    torch.testing.assert_close(cos.double()[2:], exact[2:], rtol=0, atol=1e-5)  # float64 t * f from the threshold
    empty_cos, empty_sin = rope_cos_sin(torch.zeros(0, dtype=torch.long), N)
    assert empty_cos.shape == empty_sin.shape == (0, N)


def stream_inputs(dtype, scale=1.0):
    x = layer_norm(randn(B, 1, T, D, seed=30, dtype=torch.float32)).to(dtype)
    q = (randn(B, H, T, N, seed=31, dtype=torch.float32).relu() * scale).to(dtype)
    state = randn(B, H, N, D, seed=32, dtype=torch.float32)
    return x, q, state


def wide_read(x, q, state):
    x, q = x.double(), q.double()
    y = ((q @ q.transpose(-1, -2)).tril(diagonal=-1) @ x) + q @ state.double()
    return oracle_layer_norm(y), state.double() + q.transpose(-1, -2) @ x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("under_autocast", [False, True])
def test_stream_attention_dtypes(dtype, under_autocast):
    """The read keeps 16-bit inputs' dtype (float16 computed in float32: its range), `exact` reads in float32 whatever
    the autocast; the carried state is always float32."""
    from bdh_lightning.layer import stream_attention

    x, q, state = stream_inputs(dtype, scale=100.0 if dtype == torch.float16 else 1.0)  # float16: scores past 65504
    want, want_state = wide_read(x, q, state)
    for exact in (False, True):
        written = []
        with torch.autocast("cpu", dtype=dtype, enabled=under_autocast):
            y = stream_attention(state, written, exact)(q, x) if exact else stream_attention(state, written)(q, x)
        assert y.dtype == (torch.float32 if exact else dtype), (exact, y.dtype)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), want, rtol=0, atol=0.1)
        (new_state,) = written
        assert new_state.dtype == torch.float32
        torch.testing.assert_close(new_state.double(), want_state, rtol=2e-2, atol=1e-3 * want_state.abs().max().item())
