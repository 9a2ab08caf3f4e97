"""The carried state's opt-in forms (issue 27: model.carry_half_lives, model.carry_mean) against a plain float64
statement, forward and gradients, for both kernels; stored with the weights and resumed; the validation by
position in the stream."""

import math

import pytest
import torch
from conftest import TINY_ARGS, record_carried_losses, write_letters

from bdh_lightning import model as model_module
from bdh_lightning.cli import BDHCLI
from bdh_lightning.errors import ConfigError, UsageError
from bdh_lightning.layer import layer_norm, rope_cos_sin
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import position_bucket
from bdh_lightning.weights import load_weights, write_weights

T, WINDOWS = 6, 5
FORMS = [((), True), ((9.0,), False), ((5.0, 40.0), False), ((5.0, 40.0), True), ((), False)]


def tiny_model(lives=(), mean=False, kernel="reference", chunk_size=0):
    torch.manual_seed(0)
    config = BDHConfig(n_layer=2, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0, kernel=kernel,
                       chunk_size=chunk_size, carry_half_lives=lives, carry_mean=mean)  # fmt: skip
    model = BDH(config).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # large enough that every layer's attention matters
    return model


def plain_stream(model, windows, lives, mean):
    """Logits of each window, written out: window k's byte t reads
    y_t = ln(sum_{s<t in the window} (q_t·q_s) x_s + q_t H_k),  H_k = sum_{j<k} w_kj W_j,  W_j = sum over window j of qᵀ x,
    w_kj = g^(k-j) with g = 2^(-T/half-life) per head (1 without), divided by sum_{j<k} w_kj for the mean.
    H_k is a constant (gradients stay in the window)."""
    c = model.config
    N = c.neurons_per_head
    g = [2.0 ** (-T / (lives[h] if len(lives) > 1 else lives[0])) if lives else 1.0 for h in range(c.n_head)]
    written = [[[] for _ in range(c.n_head)] for _ in range(c.n_layer)]  # layer, head -> W_j of each window
    out = []
    for k, idx in enumerate(windows):
        cos, sin = rope_cos_sin(torch.arange(k * T, (k + 1) * T), N)
        x = layer_norm(model.embed(idx))  # B, T, D
        for layer in range(c.n_layer):
            u = 0
            for h in range(c.n_head):
                a = torch.relu(x @ model.encoder[h])
                q = a * cos + torch.stack((-a[..., 1::2], a[..., 0::2]), -1).flatten(-2) * sin
                weights = [g[h] ** (k - j) for j in range(k)]
                history = sum(
                    (w * W for w, W in zip(weights, written[layer][h])),
                    torch.zeros(1, N, c.n_embd, dtype=torch.float64),
                )
                if mean and k:
                    history = history / sum(weights)
                within = torch.einsum("btn,bsn->bts", q, q).tril(-1) @ x
                y = layer_norm(within + q @ history)
                written[layer][h].append((q.transpose(1, 2) @ x).detach())
                u = u + (a * torch.relu(y @ model.encoder_v[h])) @ model.decoder[h * N : (h + 1) * N]
            x = layer_norm(x + layer_norm(u))
        out.append(x @ model.lm_head)
    return out


@pytest.mark.parametrize("lives,mean", FORMS)
@pytest.mark.parametrize("kernel,chunk_size", [("reference", 0), ("chunked", 4)])
@pytest.mark.parametrize("per_row", [False, True])
def test_each_form_equals_its_plain_statement_forward_and_gradients(lives, mean, kernel, chunk_size, per_row):
    model = tiny_model(lives, mean, kernel, chunk_size)
    torch.manual_seed(1)
    windows = [torch.randint(0, 256, (3, T)) for _ in range(WINDOWS)]
    weights = torch.randn(3, T, 256, dtype=torch.float64)
    expected = plain_stream(model, windows, lives, mean)
    (expected[-1] * weights).sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    states = None
    for k, idx in enumerate(windows):
        start = torch.full((3,), k * T) if per_row else k * T
        logits, states = model.forward_stream(idx, start, states)
        torch.testing.assert_close(logits, expected[k], rtol=1e-9, atol=1e-9)
    (logits * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-9, msg=name)


def test_the_forms_differ_from_the_plain_sum_and_from_each_other():
    """A check that the statement above can fail: each form's last window differs from the others'."""
    torch.manual_seed(1)
    windows = [torch.randint(0, 256, (2, T)) for _ in range(WINDOWS)]
    last = [plain_stream(tiny_model(lives, mean), windows, lives, mean)[-1] for lives, mean in FORMS]
    for i in range(len(last)):
        for j in range(i):
            assert (last[i] - last[j]).abs().max() > 1e-3


def test_the_default_is_the_reference_sum_and_writes_no_new_setting():
    config = BDHConfig(n_layer=1, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4)
    assert config.carries_plain_sum and set(config.architecture()) == {
        "n_layer", "n_embd", "dropout", "n_head", "mlp_internal_dim_multiplier", "vocab_size"
    }  # fmt: skip
    assert BDHConfig.from_dict({"carry_half_lives": None}).carries_plain_sum  # a checkpoint's None
    chosen = BDHConfig(n_head=2, carry_half_lives=[64, 1024], carry_mean=True).architecture()
    assert chosen["carry_half_lives"] == [64.0, 1024.0] and chosen["carry_mean"] is True


@pytest.mark.parametrize(
    "settings,words",
    [({"carry_half_lives": (1.0, 2.0, 3.0)}, "n_head=2"), ({"carry_half_lives": (0,)}, "positive"),
     ({"carry_half_lives": (math.inf,)}, "positive"), ({"carry_mean": "yes"}, "true or false"),
     ({"carry_half_lives": (True,)}, "positive"), ({"carry_half_lives": ("64",)}, "positive")],
)  # fmt: skip
def test_bad_forms_are_one_line(settings, words):
    """Catches a bool or a string taken for a number of bytes (True would be a half-life of 1)."""
    with pytest.raises(ConfigError) as error:
        BDHConfig(n_head=2, **settings)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_half_life_under_one_byte_is_a_half_life():
    """Catches a lower bound of 1 instead of 0: any positive number of bytes is a half-life."""
    assert BDHConfig(n_head=2, carry_half_lives=[0.5]).carry_half_lives == (0.5,)


@pytest.mark.parametrize("lives, mean", FORMS[1:4])
def test_float32_states_stay_float32_under_every_form(lives, mean):
    """Catches a form's float64 factors promoting the carried state (twice its memory, every window after)."""
    model = tiny_model(lives, mean).float()
    states = None
    for k in range(3):
        _, states = model.forward_stream(torch.randint(0, 256, (2, T)), k * T, states)
        assert [s.dtype for s in states] == [torch.float32] * model.config.n_layer


def test_the_mean_counts_whole_windows_before_the_start():
    """Catches the number of earlier windows taken as start / T instead of start // T."""
    g = 2.0 ** (-T / 9.0)
    config = BDHConfig(n_head=2, carry_half_lives=[9.0], carry_mean=True)
    _, factor, divisor = model_module.carry_form(config, T, 2 * T + 1, "cpu")  # two whole windows before
    weight = 1 + g
    assert torch.allclose(factor.flatten(), torch.tensor([g * weight - 1] * 2, dtype=torch.float64))
    assert torch.allclose(divisor.flatten(), torch.tensor([g * weight + 1] * 2, dtype=torch.float64))


def test_generation_refuses_a_form_it_cannot_read_byte_by_byte():
    model = tiny_model((8.0,), True)
    _, states = model.forward_stream(torch.randint(0, 256, (1, T)), 0)
    with pytest.raises(ConfigError) as error:
        model.forward_stream(torch.randint(0, 256, (1, 1)), T, states, exact=True)
    assert str(error.value) == (
        "generation reads a stream byte by byte, but model.carry_half_lives / model.carry_mean are defined per "
        "training window; generate from this model without a carried state"
    )


@pytest.mark.parametrize("fmt", ["safetensors", "reference"])
def test_the_form_is_exported_with_the_weights_and_read_back(tmp_path, fmt):
    model = tiny_model((5.0, 40.0), True)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    written = write_weights(
        tensors, model.config, fmt, tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    )
    config, _, _ = load_weights(written[0])
    assert config.carry_half_lives == (5.0, 40.0) and config.carry_mean is True


def test_hf_refuses_a_form_it_cannot_hold_in_one_line(tmp_path):
    model = tiny_model((), True)
    with pytest.raises(UsageError) as error:
        write_weights(dict(model.state_dict()), model.config, "hf", tmp_path / "hf")
    assert "carry_mean" in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_position_buckets():
    names = [position_bucket(k) for k in (0, 1, 3, 4, 15, 16, 63, 64, 10**6)]
    assert names == ["0", "1-3", "1-3", "4-15", "4-15", "16-63", "16-63", "64+", "64+"]


FORM_ARGS = (
    TINY_ARGS
    + (
        "--data.sampling streams --model.carry_state true --model.dropout 0.1 --data.batch_size 4 "
        "--model.carry_mean true --model.carry_half_lives [64,512] "
        "--trainer.val_check_interval 3 --checkpoint.every_n_train_steps 3 --data.val_windows 48 --sample.length 0"
    ).split()
)


def test_a_form_trains_resumes_exactly_and_validates_by_position(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    seen = record_carried_losses(monkeypatch)

    def fit(root: str, steps: int, *extra: str) -> BDHCLI:
        args = ["fit", "--data.path", "corpus.txt", *FORM_ARGS, "--trainer.max_steps", str(steps)]
        return BDHCLI(args=[*args, "--trainer.default_root_dir", root, *extra])

    straight = fit("a", 6)
    first = list(seen)
    metrics = straight.trainer.callback_metrics
    # 48 windows in 8 streams: windows 0 to 5 of each, in buckets 0, 1-3, 4-15
    for name in ("carried", "windowed"):
        assert {k for k in metrics if k.startswith(f"val/bpb_{name}/")} == {
            f"val/bpb_{name}/pos_{b}" for b in ("0", "1-3", "4-15")
        }
        mean = (metrics[f"val/bpb_{name}/pos_0"] + 3 * metrics[f"val/bpb_{name}/pos_1-3"]
                + 2 * metrics[f"val/bpb_{name}/pos_4-15"]) / 6  # fmt: skip
        torch.testing.assert_close(mean, metrics[f"val/bpb_{name}"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["val/bpb_carried/pos_0"], metrics["val/bpb_windowed/pos_0"])
    assert abs(float(metrics["val/bpb_carried/pos_4-15"] - metrics["val/bpb_windowed/pos_4-15"])) > 1e-6
    seen.clear()
    fit("b", 3)
    seen.clear()
    resumed = fit("b", 6, "--ckpt_path", str(tmp_path / "b/lightning_logs/version_0/checkpoints/last.ckpt"))
    assert seen == first[3:]  # the same streams, the same (normalised, faded) state, the same dropout
    assert resumed.model.config.carry_half_lives == (64.0, 512.0) and resumed.model.config.carry_mean
