"""BDH (bdh_lightning/model.py) against the independent spec oracle (tests/spec_oracle.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from spec_oracle import (
    oracle_layer,
    oracle_logits,
    oracle_logits_of,
    oracle_loss,
    oracle_rope,
    oracle_rope_frequencies,
    oracle_rope_phases,
)

from bdh_lightning.errors import ConfigError
from bdh_lightning.layer import EXACT_PHASES_FROM, rope, rope_cos_sin, rope_frequencies
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import BDHLitModule


def tiny_model(n_layer=2, n_embd=32, n_head=2, multiplier=8, dropout=0.1, weight_std=None, dtype=torch.float32):
    """A small BDH; weight_std replaces the Normal(0, 0.02) init with larger random weights."""
    config = BDHConfig(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, mlp_internal_dim_multiplier=multiplier, dropout=dropout
    )
    model = BDH(config).to(dtype)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, weight_std)
    return model


def random_bytes(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_close_to_oracle(got, want, rtol):
    # Norm-based: the largest error against the largest logit.
    relative = ((got - want).abs().max() / want.abs().max()).item()
    assert relative <= rtol, f"max|diff|/max|ref| = {relative:.3g} > {rtol}"
    # Elementwise: a logit that nearly cancels to zero still carries float32 rounding of terms as
    # large as the largest logits, so atol is 1e-6 of the largest logit (about 8 ulps of it).
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize(
    "n_layer, n_embd, n_head, multiplier, B, T, weight_std",
    [
        (2, 32, 2, 8, 2, 64, None),  # the model's own init, N = 128
        (3, 24, 3, 5, 2, 50, None),  # odd H, N = 40
        (1, 20, 3, 7, 2, 33, None),  # H does not divide m*D: N = 140 // 3 = 46
        (2, 16, 4, 4, 3, 1, None),  # T = 1: no past, attention reads nothing
        (2, 32, 4, 8, 2, 40, 1.0),  # large random weights: scores in the thousands
        (2, 16, 2, 8, 1, 1024, None),  # long context, N = 64
    ],
)
def test_logits_match_oracle_float32(n_layer, n_embd, n_head, multiplier, B, T, weight_std):
    torch.manual_seed(n_layer * 1000 + n_embd)
    model = tiny_model(n_layer, n_embd, n_head, multiplier, weight_std=weight_std).eval()
    idx = random_bytes(B, T, seed=T)
    with torch.no_grad():
        logits = model(idx)
        want = oracle_logits_of(model, idx)
    assert logits.shape == (B, T, 256) and logits.dtype == torch.float32
    assert_close_to_oracle(logits, want, rtol=1e-5)


def test_logits_match_oracle_float64_tightly():
    # In float64 only the (shared, float32) rope phases are not exact, so model and oracle must agree
    # to float64 rounding: this catches any real formula difference that float32 noise could hide.
    torch.manual_seed(1)
    model = tiny_model(n_layer=3, n_embd=24, n_head=3, multiplier=5, weight_std=0.3, dtype=torch.float64).eval()
    idx = random_bytes(2, 70)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), oracle_logits_of(model, idx), rtol=1e-10, atol=1e-12)


def test_loss_gradients_match_oracle_float64():
    torch.manual_seed(2)
    model = tiny_model(n_layer=2, n_embd=8, n_head=2, multiplier=4, weight_std=0.5, dtype=torch.float64).eval()
    idx = random_bytes(2, 12, seed=3)
    targets = random_bytes(2, 12, seed=4)

    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    weights = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    want_logits = oracle_logits(
        idx,
        weights["embed.weight"],
        weights["encoder"],
        weights["encoder_v"],
        weights["decoder"],
        weights["lm_head"],
        2,
    )
    oracle_loss(want_logits, targets).backward()

    assert set(weights) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    for name, p in model.named_parameters():
        want = weights[name].grad
        assert want.abs().max() > 0, f"oracle gradient of {name} is all zero: the test would be vacuous"
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12 * want.abs().max().item(), msg=name)


def test_lit_module_loss_is_mean_next_byte_cross_entropy():
    torch.manual_seed(3)
    lit = BDHLitModule(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8).eval()
    data = random_bytes(2, 41, seed=5)
    x, y = data[:, :-1], data[:, 1:]
    with torch.no_grad():
        got = lit.loss((x, y))
        want = oracle_loss(oracle_logits_of(lit.model, x), y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


def test_oracle_layer_is_what_the_model_applies_per_layer():
    # One layer of the oracle composes to the oracle's logits; checks the per-layer function other
    # tests use, against the model with n_layer = 1.
    torch.manual_seed(4)
    model = tiny_model(n_layer=1, n_embd=24, n_head=3, multiplier=5, weight_std=0.2, dtype=torch.float64).eval()
    idx = random_bytes(2, 20)
    x0 = F.layer_norm(model.embed.weight[idx], (24,), eps=1e-5)
    with torch.no_grad():
        x1 = oracle_layer(x0, model.encoder, model.encoder_v, model.decoder)
        torch.testing.assert_close(model(idx), x1 @ model.lm_head, rtol=1e-10, atol=1e-12)


def test_strictly_causal_and_positions_start_at_zero():
    # Logits at position t depend on bytes up to t only, and a prefix is processed exactly as the
    # start of the longer sequence (absolute positions from 0).
    torch.manual_seed(5)
    model = tiny_model(weight_std=0.3).eval()
    idx = random_bytes(2, 48)
    changed = idx.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 256
    with torch.no_grad():
        full = model(idx)
        prefix = model(idx[:, :30])
        other_future = model(changed)
    torch.testing.assert_close(full[:, :30], prefix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other_future[:, :30], full[:, :30], rtol=1e-5, atol=1e-6)
    assert (other_future[:, 30:] - full[:, 30:]).abs().max() > 1e-3


def test_first_position_reads_nothing_not_even_itself():
    # Strictly lower: position 0 has no past, so S = 0, y = ln(0) = 0, b = 0, z = 0, u = 0 and each
    # layer maps x to ln(x + 0). Were the diagonal kept (s <= t), q_0 . q_0 > 0 would change this.
    torch.manual_seed(6)
    model = tiny_model(n_layer=2, weight_std=0.3).eval()
    idx = random_bytes(3, 9)
    x = F.layer_norm(model.embed.weight[idx[:, 0]], (model.config.n_embd,), eps=1e-5)
    for _ in range(model.config.n_layer):
        x = F.layer_norm(x, (model.config.n_embd,), eps=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, 0], x @ model.lm_head, rtol=1e-5, atol=1e-6)


# The four configurations the spec names, with its counts.
SPEC_PARAMETER_COUNTS = [
    (dict(), 25_296_896),
    (dict(n_layer=4, n_embd=192, n_head=4, mlp_internal_dim_multiplier=64), 7_176_192),
    (dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=96), 19_005_440),
    (dict(n_layer=8, n_embd=512, n_head=8, mlp_internal_dim_multiplier=128), 100_925_440),
]


@pytest.mark.parametrize("settings, count", SPEC_PARAMETER_COUNTS)
def test_parameter_count_of_spec_configs(settings, count):
    config = BDHConfig(**settings)
    with torch.device("meta"):  # shapes only, no memory
        model = BDH(config)
    assert sum(p.numel() for p in model.parameters()) == count
    assert config.num_parameters == count


@pytest.mark.parametrize("n_layer, n_embd, n_head, multiplier", [(1, 32, 2, 8), (5, 24, 3, 5), (2, 20, 3, 7)])
def test_parameter_count_formula_and_shared_layers(n_layer, n_embd, n_head, multiplier):
    model = tiny_model(n_layer, n_embd, n_head, multiplier)
    H, D, V = n_head, n_embd, 256
    N = multiplier * D // H
    assert model.config.neurons_per_head == N
    assert sum(p.numel() for p in model.parameters()) == 3 * H * N * D + 2 * V * D
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embed.weight": (V, D),
        "encoder": (H, D, N),
        "encoder_v": (H, D, N),
        "decoder": (H * N, D),
        "lm_head": (D, V),
    }
    # Weights are shared by all layers: more layers, same count.
    deeper = tiny_model(n_layer + 3, n_embd, n_head, multiplier)
    assert sum(p.numel() for p in deeper.parameters()) == sum(p.numel() for p in model.parameters())


def test_init_is_normal_002():
    torch.manual_seed(7)
    model = BDH(BDHConfig(n_layer=1, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16))
    for name, p in model.named_parameters():
        assert abs(p.mean().item()) < 0.001, name  # >= 16384 samples: 6 sigma
        assert abs(p.std().item() - 0.02) < 0.001, name


@pytest.mark.parametrize(
    "settings, names",
    [
        (dict(n_layer=0), ["model.n_layer"]),
        (dict(n_layer=-1), ["model.n_layer"]),
        (dict(n_embd=0), ["model.n_embd"]),
        (dict(n_embd=-256), ["model.n_embd"]),
        (dict(n_head=0), ["model.n_head"]),
        (dict(n_head=-4), ["model.n_head"]),
        (dict(mlp_internal_dim_multiplier=0), ["model.mlp_internal_dim_multiplier"]),
        (dict(mlp_internal_dim_multiplier=-2), ["model.mlp_internal_dim_multiplier"]),
        (dict(n_embd=2.5), ["model.n_embd"]),
        # N = m*D//H odd (3) or zero (2 // 4): the message must name a setting that makes N.
        (
            dict(n_embd=3, n_head=1, mlp_internal_dim_multiplier=1),
            ["model.mlp_internal_dim_multiplier", "model.n_embd", "model.n_head"],
        ),
        (
            dict(n_embd=2, n_head=4, mlp_internal_dim_multiplier=1),
            ["model.mlp_internal_dim_multiplier", "model.n_embd", "model.n_head"],
        ),
        (dict(dropout=-0.1), ["model.dropout"]),
        (dict(dropout=1.0), ["model.dropout"]),
        (dict(dropout=1.5), ["model.dropout"]),
        (dict(dropout=float("nan")), ["model.dropout"]),
        (dict(vocab_size=255), ["model.vocab_size"]),
        (dict(vocab_size=257), ["model.vocab_size"]),
        (dict(vocab_size=0), ["model.vocab_size"]),
    ],
)
def test_config_errors_are_one_line_naming_the_setting(settings, names):
    with pytest.raises(ConfigError) as error:
        BDHConfig(**settings)
    message = str(error.value)
    assert "\n" not in message, message
    assert any(name in message for name in names), message


def test_valid_edge_configs_are_accepted():
    BDHConfig(dropout=0.0, n_layer=1, n_embd=1, n_head=1, mlp_internal_dim_multiplier=2)  # N = 2
    BDHConfig(dropout=0.999)


# Positions where float32 phase arithmetic matters: 2^24 is where float32 stops holding every integer.
LONG_POSITIONS = torch.tensor(
    [0, 1, 2, 1023, 8191, 8192, 65_535, 65_536, 1_000_003, 10**7 + 3, 2**24 + 5, 123_456_789, 10**9, 10**9 + 77]
)


@pytest.mark.parametrize("N", [64, 46, 8192])
def test_rope_phases_are_the_reference_s_in_a_window_and_exact_beyond(N):
    # Bit-equal frequencies: the reference's order (1/theta^(k/N))/(2 pi), not the spec's formula.
    assert torch.equal(rope_frequencies(N), oracle_rope_frequencies(N))
    window = torch.arange(0, EXACT_PHASES_FROM, 7)  # every window length the reference runs at
    cos, sin = rope_cos_sin(window, N)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32 and cos.shape == (len(window), N)
    phases = oracle_rope_phases(window, N)  # the spec's float32 phases
    torch.testing.assert_close(cos, torch.cos(phases), rtol=0, atol=2e-7)
    torch.testing.assert_close(sin, torch.sin(phases), rtol=0, atol=2e-7)
    # Long streams: within 1e-3 rad of the exact phase of the same (float32) frequencies up to 10^9.
    cos, sin = rope_cos_sin(LONG_POSITIONS, N)
    exact = 2 * math.pi * ((LONG_POSITIONS.double()[:, None] * rope_frequencies(N).double()) % 1.0)
    error = torch.atan2(sin.double() * torch.cos(exact) - cos.double() * torch.sin(exact),
                        cos.double() * torch.cos(exact) + sin.double() * torch.sin(exact)).abs()  # fmt: skip
    assert error.max() < 1e-3
    if N == 8192:  # guard that this can fail: the spec's float32 phases are far off there
        spec = oracle_rope_phases(LONG_POSITIONS, N).double()
        assert (torch.cos(spec) - torch.cos(exact)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_rotation_matches_oracle(dtype):
    torch.manual_seed(8)
    N = 46
    positions = torch.arange(5000, 5037)  # not starting at 0: the rotation uses the positions given
    a = torch.relu(torch.randn(2, 3, len(positions), N, dtype=dtype))
    cos, sin = rope_cos_sin(positions, N)
    got = rope(a, cos, sin)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got, oracle_rope(a, positions), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7
    )
    # The rotation is orthogonal: pair norms are kept.
    torch.testing.assert_close(got.square().sum(-1), a.square().sum(-1))


def test_dropout_only_in_training():
    torch.manual_seed(9)
    model = tiny_model(dropout=0.5, weight_std=0.3)
    idx = random_bytes(2, 32)
    with torch.no_grad():
        model.train()
        train_a, train_b = model(idx), model(idx)
        model.eval()
        eval_a, eval_b = model(idx), model(idx)
        want = oracle_logits_of(model, idx)
    assert (train_a - train_b).abs().max() > 1e-3, "dropout=0.5 in train mode must make two passes differ"
    assert (train_a - want).abs().max() > 1e-3
    torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)
    assert_close_to_oracle(eval_a, want, rtol=1e-5)


def test_zero_dropout_training_equals_oracle():
    torch.manual_seed(10)
    model = tiny_model(dropout=0.0, weight_std=0.3).train()
    idx = random_bytes(2, 32)
    with torch.no_grad():
        assert_close_to_oracle(model(idx), oracle_logits_of(model, idx), rtol=1e-5)


def test_kernel_and_chunk_size_errors_are_one_line_naming_the_setting():
    with pytest.raises(ConfigError) as error:
        BDHConfig(kernel="fast")
    assert str(error.value) == "model.kernel must be one of auto, reference, chunked, fused; got 'fast'"
    for chunk_size in (-1, -64, 2.5, "64"):
        with pytest.raises(ConfigError) as error:
            BDHConfig(chunk_size=chunk_size)
        assert (
            str(error.value) == f"model.chunk_size must be a non-negative integer (0 = automatic), got {chunk_size!r}"
        )
    assert BDHConfig(kernel="chunked", chunk_size=0).chunk_size == 0 and BDHConfig(chunk_size=64).chunk_size == 64


def test_neurons_per_head_error_says_what_n_is_and_what_it_must_be():
    with pytest.raises(ConfigError) as error:
        BDHConfig(n_embd=3, n_head=1, mlp_internal_dim_multiplier=1)
    assert str(error.value) == ("model.mlp_internal_dim_multiplier * model.n_embd // model.n_head (neurons per head, N) must "
                                "be a positive even number for the rotary pairs, got 3")  # fmt: skip
    with pytest.raises(ConfigError, match="got 0$"):
        BDHConfig(n_embd=2, n_head=4, mlp_internal_dim_multiplier=1)


def test_from_dict_takes_the_settings_and_ignores_other_keys():
    config = BDHConfig.from_dict({"n_layer": 3, "n_embd": 24, "n_head": 3, "learning_rate": 1e-3, "_instantiator": "x"})
    assert (config.n_layer, config.n_embd, config.n_head) == (3, 24, 3)
    assert config.mlp_internal_dim_multiplier == BDHConfig().mlp_internal_dim_multiplier  # the default
    with pytest.raises(ConfigError):
        BDHConfig.from_dict({"n_layer": 0})


def test_from_checkpoint_takes_the_architecture_and_this_machines_kernel():
    hparams = dict(n_layer=3, n_embd=24, n_head=3, mlp_internal_dim_multiplier=5, dropout=0.2, kernel="chunked",
                   chunk_size=128, learning_rate=1e-3)  # fmt: skip
    config = BDHConfig.from_checkpoint({"hyper_parameters": hparams})
    assert config.architecture() == {"n_layer": 3, "n_embd": 24, "dropout": 0.2, "n_head": 3,
                                     "mlp_internal_dim_multiplier": 5, "vocab_size": 256}  # fmt: skip
    assert (config.kernel, config.chunk_size) == ("auto", 0)  # the file's kernel is not this machine's choice
    config = BDHConfig.from_checkpoint({"hyper_parameters": hparams}, kernel="reference", chunk_size=64)
    assert (config.kernel, config.chunk_size, config.n_layer) == ("reference", 64, 3)
    assert BDHConfig.from_checkpoint({}) == BDHConfig()  # no settings stored: the defaults
    assert BDHConfig.from_checkpoint({"hyper_parameters": None}) == BDHConfig()
    with pytest.raises(ConfigError, match="^the checkpoint's hyper_parameters are not a mapping of settings$"):
        BDHConfig.from_checkpoint({"hyper_parameters": ["n_layer", 3]})


def recorded_layer_settings(monkeypatch, run) -> list[dict]:
    """The keyword settings (all but the state) each layer call of `run(model)` hands kernels.apply_layer, for a
    chunked model with dropout."""
    import bdh_lightning.model as model_module

    calls = []
    real_layer = model_module.apply_layer

    def recording_layer(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "state"})
        return real_layer(*args, **kwargs)

    monkeypatch.setattr(model_module, "apply_layer", recording_layer)
    config = BDHConfig(
        n_layer=3, n_embd=16, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.3, kernel="chunked", chunk_size=32
    )
    run(BDH(config))
    return calls


def test_forward_and_forward_stream_hand_each_layer_the_kernel_settings(monkeypatch):
    def forward(model):
        model(random_bytes(1, 5))
        model.eval()(random_bytes(1, 5))

    def forward_stream(model):
        _, states = model.forward_stream(random_bytes(1, 5), 0)
        model.eval().forward_stream(random_bytes(1, 5), 5, states)

    want = dict(kernel="chunked", dropout=0.3, chunk_size=32)
    expected = [{**want, "training": True}] * 3 + [{**want, "training": False}] * 3
    assert recorded_layer_settings(monkeypatch, forward) == expected
    assert recorded_layer_settings(monkeypatch, forward_stream) == [{**e, "stream": True} for e in expected]


def test_forward_stream_exact_reads_in_float32_under_autocast_and_drops_out_in_training():
    torch.manual_seed(11)
    model = tiny_model(dropout=0.5, weight_std=0.3).eval()
    idx = random_bytes(2, 24, seed=12)
    with torch.no_grad():
        full, _ = model.forward_stream(idx, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model.forward_stream(idx, 0)  # exact defaults to False: the read in bfloat16 too
            exact, _ = model.forward_stream(idx, 0, exact=True)
    assert not torch.equal(low, exact)  # (neither is reliably closer to float32: the N-wide products are bf16 in both)
    for got in (low, exact):
        assert (got.float() - full).abs().max() < 0.05 * full.abs().max()
    model.train()
    with torch.no_grad():
        first, _ = model.forward_stream(idx, 0)
        second, _ = model.forward_stream(idx, 0)
    assert (first - second).abs().max() > 1e-3  # dropout=0.5 while training
    assert (first - full).abs().max() > 1e-3


def test_every_input_safe_n_layer_has_an_upper_bound():
    """Layers share their weights, so no memory check stops 1e30 of them: refused in one line, any source."""
    assert BDHConfig(n_layer=10_000, n_embd=8, n_head=1, mlp_internal_dim_multiplier=2).n_layer == 10_000
    with pytest.raises(ConfigError, match=r"^model.n_layer must be at most 10,000, got 10,001$"):
        BDHConfig(n_layer=10_001)
    with pytest.raises(ConfigError, match="n_layer must be at most"):
        BDHConfig.from_checkpoint({"hyper_parameters": {"n_layer": 10**30}})
