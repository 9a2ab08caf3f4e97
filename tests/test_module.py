"""BDHLitModule (bdh_lightning/module.py): the loss, the learning-rate schedule (against its formula and through a
real run's logged train/lr), AdamW's settings and parameter groups, the dropout seed per rank, step and
micro-batch, and the validation mean weighted by bytes when the last batch is smaller."""

import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARGS, TINY_MODEL, scalars
from spec_oracle import oracle_logits_of, oracle_loss
from torch.utils.data import DataLoader

from bdh_lightning.errors import BDHError
from bdh_lightning.main import main
from bdh_lightning.module import BDHLitModule


def schedule_formula(step, peak, warmup, decay, floor):
    """The schedule as BDHLitModule's help states it, written independently: linear warmup to the peak over `warmup` steps
    (step s uses peak * (s + 1) / warmup), then cosine from the peak to the floor over `decay` steps, then the
    floor; decay 0 means constant after warmup."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == 0:
        return peak
    t = step - warmup
    if t >= decay:
        return floor
    return floor + (peak - floor) * (1 + math.cos(math.pi * t / decay)) / 2


SCHEDULES = [
    dict(learning_rate=1e-3, warmup_steps=10, decay_steps=50, min_learning_rate=1e-4),
    dict(learning_rate=3e-3, warmup_steps=0, decay_steps=37, min_learning_rate=0.0),
    dict(learning_rate=2e-4, warmup_steps=7, decay_steps=0, min_learning_rate=5e-5),
    dict(learning_rate=5e-4, warmup_steps=0, decay_steps=0, min_learning_rate=0.0),
    dict(learning_rate=1e-2, warmup_steps=1, decay_steps=1, min_learning_rate=1e-3),
]


def tiny_module(**settings):
    return BDHLitModule(**{**TINY_MODEL, **settings})


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda s: f"w{s['warmup_steps']}-d{s['decay_steps']}")
def test_learning_rate_at_follows_the_formula_at_every_step(settings):
    module = tiny_module(**settings)
    peak, warmup, decay, floor = (
        settings[k] for k in ("learning_rate", "warmup_steps", "decay_steps", "min_learning_rate")
    )
    for step in range(warmup + decay + 30):
        want = schedule_formula(step, peak, warmup, decay, floor)
        assert module.learning_rate_at(step) == pytest.approx(want, rel=1e-12, abs=1e-15), step


def test_schedule_landmarks():
    module = tiny_module(learning_rate=1e-3, warmup_steps=4, decay_steps=8, min_learning_rate=1e-4)
    assert module.learning_rate_at(0) == pytest.approx(2.5e-4)  # a quarter of the way up: never 0
    assert module.learning_rate_at(3) == pytest.approx(1e-3)  # the last warmup step reaches the peak
    assert module.learning_rate_at(4) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert module.learning_rate_at(8) == pytest.approx(5.5e-4)  # halfway down: the mean of peak and floor
    assert module.learning_rate_at(12) == pytest.approx(1e-4)  # the floor, then held
    assert module.learning_rate_at(1000) == pytest.approx(1e-4)
    values = [module.learning_rate_at(s) for s in range(14)]
    assert values[:4] == sorted(values[:4]) and values[4:] == sorted(values[4:], reverse=True)


def test_the_scheduler_applies_the_schedule_to_the_optimizer():
    settings = dict(learning_rate=2e-3, warmup_steps=3, decay_steps=5, min_learning_rate=2e-4)
    module = tiny_module(**settings)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step" and configured["lr_scheduler"]["name"] == "train/lr"
    for step in range(12):
        want = schedule_formula(step, 2e-3, 3, 5, 2e-4)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), step
        optimizer.step()
        scheduler.step()


def test_adamw_settings_and_one_group_of_every_parameter():
    module = tiny_module(learning_rate=7e-4, weight_decay=0.05, betas=[0.8, 0.95])
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in module.model.parameters()]
    assert len(group["params"]) == 5  # embed, encoder, encoder_v, decoder, lm_head: all decayed, as the reference
    assert group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.95) and group["initial_lr"] == 7e-4


def test_logged_learning_rate_of_a_real_run_follows_the_formula(tmp_path, monkeypatch):
    from conftest import write_letters

    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt", size=20000)
    args = [
        "fit",
        "--data.path",
        "corpus.txt",
        *TINY_ARGS,
        "--model.learning_rate",
        "2e-3",
        "--model.warmup_steps",
        "3",
        "--model.decay_steps",
        "6",
        "--model.min_learning_rate",
        "4e-4",
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "12",
        "--data.val_windows",
        "2",
        "--model.n_layer",
        "1",
    ]
    assert main(args) == 0
    logged = scalars(tmp_path / "lightning_logs/version_0", "train/lr")
    assert sorted(logged) == list(range(12))
    for step, value in logged.items():
        assert value == pytest.approx(schedule_formula(step, 2e-3, 3, 6, 4e-4), rel=1e-6), step


def test_loss_is_the_mean_cross_entropy_in_float32_under_bfloat16():
    torch.manual_seed(0)
    module = tiny_module(dropout=0.0).eval()
    data = torch.randint(0, 256, (3, 25), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    with torch.no_grad():
        want = oracle_loss(oracle_logits_of(module.model, x), y)
        torch.testing.assert_close(module.loss((x, y)), want, rtol=1e-5, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = module.loss((x, y))
            logits = module.model(x)
        assert half.dtype == torch.float32  # cross-entropy of float32 logits, not bfloat16
        assert half.item() == pytest.approx(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item(), rel=1e-6)
        assert half.item() == pytest.approx(want.item(), rel=2e-2)
        double = tiny_module(dropout=0.0).double().eval()
        assert double.loss((x, y)).dtype == torch.float64
    assert torch.equal(module(x), module.model(x))


def test_loss_gradient_reaches_every_parameter():
    module = tiny_module(dropout=0.0)
    data = torch.randint(0, 256, (2, 17))
    module.loss((data[:, :-1], data[:, 1:])).backward()
    for name, p in module.model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ---------------------------------------------------------------- dropout seeds


def seed_after_batch_start(module, rank, step, batch_idx, accumulate=1, global_seed="0"):
    """torch's seed after on_train_batch_start on `rank` at `step`, batch `batch_idx` of the epoch."""
    module._trainer = SimpleNamespace(accumulate_grad_batches=accumulate, global_rank=rank, global_step=step)
    os.environ["PL_GLOBAL_SEED"] = global_seed
    try:
        module.on_train_batch_start(None, batch_idx)
    finally:
        module._trainer = None
    return torch.initial_seed()


@pytest.fixture
def keep_global_seed():
    before = os.environ.get("PL_GLOBAL_SEED")
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)
    if before is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = before


def test_dropout_seed_differs_per_rank_step_and_micro_batch(keep_global_seed):
    module = tiny_module()
    seeds = {}
    for rank in range(4):
        for step in range(3):
            for micro in range(3):
                seeds[rank, step, micro] = seed_after_batch_start(
                    module, rank, step, batch_idx=step * 3 + micro, accumulate=3
                )
    assert len(set(seeds.values())) == len(seeds)  # no two (rank, step, micro-batch) draw the same masks
    # A function of (global seed, rank, step, micro-batch) only: a resumed run draws the same masks.
    assert seed_after_batch_start(module, 2, 1, batch_idx=4, accumulate=3) == seeds[2, 1, 1]
    # The micro-batch is batch_idx modulo accumulation: the epoch's batch index does not enter otherwise.
    assert seed_after_batch_start(module, 2, 1, batch_idx=301, accumulate=3) == seeds[2, 1, 1]
    assert seed_after_batch_start(module, 0, 5, batch_idx=7, accumulate=1) == seed_after_batch_start(module, 0, 5, 0)
    assert seed_after_batch_start(module, 0, 0, 0, global_seed="1") != seeds[0, 0, 0]


def test_ranks_draw_different_dropout_masks(keep_global_seed):
    module = tiny_module(dropout=0.5).train()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))

    def forward_on(rank, micro):
        seed_after_batch_start(module, rank, step=3, batch_idx=micro, accumulate=2)
        with torch.no_grad():
            return module(idx)

    rank0, rank1, rank0_again, rank0_next_micro = forward_on(0, 0), forward_on(1, 0), forward_on(0, 0), forward_on(0, 1)
    assert torch.equal(rank0, rank0_again)
    assert (rank0 - rank1).abs().max() > 1e-3
    assert (rank0 - rank0_next_micro).abs().max() > 1e-3


# ---------------------------------------------------------------- validation mean


def test_validation_loss_is_weighted_by_bytes_when_the_last_batch_is_smaller(tmp_path):
    torch.manual_seed(3)
    module = tiny_module(dropout=0.0)
    data = torch.randint(0, 256, (5, 21), generator=torch.Generator().manual_seed(4))
    windows = list(zip(data[:, :-1], data[:, 1:]))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (result,) = trainer.validate(module, DataLoader(windows, batch_size=2))  # batches of 2, 2 and 1 windows
    with torch.no_grad():
        per_batch = [module.loss((data[i : i + 2, :-1], data[i : i + 2, 1:])).item() for i in (0, 2, 4)]
        want = module.loss((data[:, :-1], data[:, 1:])).item()
    assert abs(sum(per_batch) / 3 - want) > 1e-4  # the unweighted mean of batch means would differ
    assert result["val/loss"] == pytest.approx(want, rel=1e-5)
    assert result["val/bpb"] == pytest.approx(want / math.log(2), rel=1e-5)
    (tested,) = trainer.test(module, DataLoader(windows, batch_size=2))
    assert tested["test/loss"] == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- settings


def test_fused_kernel_is_refused_at_construction_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fused is allowed")
    with pytest.raises(BDHError) as error:
        tiny_module(kernel="fused")
    assert "\n" not in str(error.value) and "fused" in str(error.value)


def test_settings_reach_the_model_config():
    module = tiny_module(dropout=0.25, kernel="chunked", chunk_size=64)
    c = module.config
    assert (c.n_layer, c.n_embd, c.n_head, c.mlp_internal_dim_multiplier) == (2, 32, 2, 8)
    assert (c.dropout, c.kernel, c.chunk_size, c.vocab_size) == (0.25, "chunked", 64, 256)
    assert module.model.config is c
    assert module.hparams.learning_rate == 1e-3 and module.hparams.decay_steps == 0


def test_compile_wraps_the_forward_once():
    module = tiny_module(compile=True)
    plain_forward = module.model.forward
    module.configure_model()
    compiled = module.model.forward
    assert compiled is not plain_forward
    module.configure_model()  # Lightning may call it again (e.g. on validate after fit)
    assert module.model.forward is compiled
    assert "model.encoder" in module.state_dict()  # parameters keep their plain names
    not_compiled = tiny_module()
    forward = not_compiled.model.forward
    not_compiled.configure_model()
    assert not_compiled.model.forward == forward


def test_flops_formula():
    module = BDHLitModule(n_layer=3, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4)
    H, D, N, T, V = 2, 16, 32, 10, 256
    per_token = 3 * (6 * H * D * N + 2 * H * N * T + 2 * H * D * T) + 2 * D * V
    assert module.forward_flops(4, T) == 4 * T * per_token
    assert module.training_flops(4, T) == 3 * 4 * T * per_token


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(learning_rate=0.0), "model.learning_rate must be in (0, inf), got 0.0"),
        (dict(learning_rate=-1e-3), "model.learning_rate must be in (0, inf), got -0.001"),
        (dict(learning_rate=float("nan")), "model.learning_rate must be a finite number, got nan"),
        (dict(weight_decay=-0.1), "model.weight_decay must be in [0, inf), got -0.1 (0 = none)"),
        (dict(weight_decay=float("inf")), "model.weight_decay must be a finite number, got inf (0 = none)"),
        (dict(betas=(0.9,)), "model.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got (0.9,)"),
        (dict(betas=0.9), "model.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got 0.9"),
        (
            dict(betas=[0.9, 0.99, 0.999]),
            "model.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got [0.9, 0.99, 0.999]",
        ),
        (dict(betas=(1.0, 0.9)), "model.betas[0] must be in [0, 1), got 1.0"),
        (dict(betas=(0.9, -0.1)), "model.betas[1] must be in [0, 1), got -0.1"),
        (dict(betas=(0.9, 1.5)), "model.betas[1] must be in [0, 1), got 1.5"),
        (dict(warmup_steps=-1), "model.warmup_steps must be a non-negative integer (0 = no warmup), got -1"),
        (dict(warmup_steps=1.5), "model.warmup_steps must be a non-negative integer (0 = no warmup), got 1.5"),
        (dict(decay_steps=-2), "model.decay_steps must be a non-negative integer (0 = constant learning rate), got -2"),
        (
            dict(min_learning_rate=2e-3),
            "model.min_learning_rate must be in [0, 0.001], got 0.002 (the floor of the cosine "
            "decay, at most model.learning_rate)",
        ),
        (
            dict(min_learning_rate=-1e-4),
            "model.min_learning_rate must be in [0, 0.001], got -0.0001 (the floor of the "
            "cosine decay, at most model.learning_rate)",
        ),
    ],
)
def test_optimizer_settings_errors_are_one_line_naming_the_setting(settings, expected):
    from bdh_lightning.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        tiny_module(**settings)
    assert str(error.value) == expected


@pytest.mark.parametrize(
    "settings",
    [
        dict(learning_rate=1e-9),
        dict(weight_decay=0.0),
        dict(betas=[0.0, 0.5]),
        dict(betas=(0.999, 0.9999)),
        dict(min_learning_rate=1e-3),
        dict(warmup_steps=0, decay_steps=0),
        dict(warmup_steps=10**6),
    ],
)
def test_edge_optimizer_settings_are_accepted(settings):
    tiny_module(**settings)


def test_linear_decay_goes_straight_to_the_floor():
    module = tiny_module(learning_rate=1e-3, warmup_steps=2, decay_steps=10, min_learning_rate=1e-4, decay="linear")
    for step in range(20):
        if step < 2:
            want = 1e-3 * (step + 1) / 2
        else:
            want = 1e-4 + (1e-3 - 1e-4) * max(0.0, 1 - (step - 2) / 10)
        assert module.learning_rate_at(step) == pytest.approx(want, rel=1e-12), step


class LogRecorder:
    def __init__(self):
        self.calls = {}

    def __call__(self, name, value, **kwargs):
        self.calls[name] = (float(value), kwargs)


def test_losses_are_logged_under_their_names_on_the_progress_bar_and_synced(monkeypatch):
    module = tiny_module(dropout=0.0)
    log = LogRecorder()
    monkeypatch.setattr(module, "log", log)
    data = torch.randint(0, 256, (2, 9))
    x, y = data[:, :-1], data[:, 1:]
    loss = module.training_step((x, y), 0)
    assert log.calls == {"train/loss": (pytest.approx(loss.item()), {"prog_bar": True})}
    module.validation_step((x, y), 0)
    module._log_eval_loss("val")
    with torch.no_grad():
        want = module.loss((x, y)).item()
    assert log.calls["val/loss"] == (pytest.approx(want), {"prog_bar": True, "sync_dist": True})
    assert log.calls["val/bpb"] == (pytest.approx(want / math.log(2)), {"sync_dist": True})
    module.test_step((x, y), 0)
    module._log_eval_loss("test")  # the metric was reset after val: the mean of this batch alone
    assert log.calls["test/loss"][0] == pytest.approx(want)


def test_a_one_layer_model_carries_its_state():
    """Catches the batch size or dtype of the carried state read off a second layer's state (a one-layer model
    has only the first)."""
    torch.manual_seed(0)
    module = tiny_module(dropout=0.0, carry_state=True, n_layer=1)
    data = torch.randint(0, 256, (2, 17))
    first = (data[:, :8], data[:, 1:9], torch.tensor([0, 0]))
    second = (data[:, 8:16], data[:, 9:17], torch.tensor([8, 0]))  # row 1 starts a fresh stream
    module.carried_loss(first)
    carried = module.carried_loss(second)
    with torch.no_grad():
        _, states = module.model.forward_stream(first[0], first[2])
        kept = [state * torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1) for state in states]
        logits, _ = module.model.forward_stream(second[0], second[2], kept)
    assert carried.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), second[1].flatten()).item(), rel=1e-5)


@pytest.mark.parametrize("sanity", [False, True])
def test_carried_validation_logs_bits_per_byte_synced_and_not_in_the_sanity_check(monkeypatch, sanity):
    """Catches the carried and windowed losses (and each position's) logged in nats or another base, not synced
    across ranks, or logged during Lightning's sanity check."""
    module = tiny_module(dropout=0.0, carry_state=True)
    log = LogRecorder()
    monkeypatch.setattr(module, "log", log)
    monkeypatch.setattr(module, "_log_eval_loss", lambda split: None)
    monkeypatch.setattr(module, "stream_validation", lambda: (1.5, 2.5, {"carried/pos_4-15": 3.5}))
    module._trainer = SimpleNamespace(sanity_checking=sanity)
    module.on_validation_epoch_end()
    if sanity:
        assert log.calls == {}
        return
    assert log.calls == {
        "val/bpb_carried": (pytest.approx(1.5 / math.log(2)), {"sync_dist": True}),
        "val/bpb_windowed": (pytest.approx(2.5 / math.log(2)), {"sync_dist": True}),
        "val/bpb_carried/pos_4-15": (pytest.approx(3.5 / math.log(2)), {"sync_dist": True}),
    }


def test_a_batch_with_stream_starts_trains_and_validates_on_its_windows(monkeypatch):
    """data.sampling streams yields (x, y, start); without model.carry_state the loss is the windows' own."""
    module = tiny_module(dropout=0.0)
    monkeypatch.setattr(module, "log", LogRecorder())
    data = torch.randint(0, 256, (2, 9))
    x, y, start = data[:, :-1], data[:, 1:], torch.tensor([0, 8])
    with torch.no_grad():
        want = module.loss((x, y))
        assert torch.equal(module.training_step((x, y, start), 0), want)
    module.validation_step((x, y, start), 0)
    assert module.eval_loss.compute().item() == pytest.approx(want.item())


def test_dropout_seed_without_a_global_seed_is_seed_zeros(keep_global_seed):
    module = tiny_module()
    with_zero = seed_after_batch_start(module, 1, 4, 0, global_seed="0")
    os.environ.pop("PL_GLOBAL_SEED", None)
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, global_rank=1, global_step=4)
    try:
        module.on_train_batch_start(None, 0)
    finally:
        module._trainer = None
    assert torch.initial_seed() == with_zero


def test_compile_wraps_the_plain_forward(monkeypatch):
    module = tiny_module(compile=True)
    plain = module.model.forward
    module.configure_model()
    assert module.model.forward._torchdynamo_orig_callable == plain


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init_from")
    L.seed_everything(0)
    module = tiny_module()
    data = torch.randint(0, 256, (8, 17))
    trainer = L.Trainer(
        max_steps=1,
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=8))
    trainer.save_checkpoint(folder / "two.ckpt")
    return folder / "two.ckpt", module


def test_init_from_copies_the_weights_and_notes_another_depth(two_layer_checkpoint, capsys):
    path, trained = two_layer_checkpoint
    same = tiny_module(init_from=str(path))
    for name, value in trained.model.state_dict().items():
        assert torch.equal(same.model.state_dict()[name], value), name
    assert capsys.readouterr().err == ""  # same depth: nothing to say
    deeper = tiny_module(n_layer=4, init_from=str(path))
    assert torch.equal(deeper.model.encoder, trained.model.encoder)
    assert capsys.readouterr().err == (
        f"note: --model.init_from {path} was trained with n_layer=2; this model applies its layer 4 times\n"
    )


# ---------------------------------------------------------------- carried state, AGC (what mutation found untested)


def test_carried_loss_continues_each_rows_stream_and_resets_where_it_restarts():
    module = tiny_module(dropout=0.0, carry_state=True)
    data = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(7))
    x1, y1, x2, y2 = data[:, :16], data[:, 1:17], data[:, 16:32], data[:, 17:33]
    start1, start2 = torch.tensor([0, 0]), torch.tensor([16, 0])  # row 1 restarts its stream in the second window
    with torch.no_grad():
        module.carried_loss((x1, y1, start1))
        _, states = module.model.forward_stream(x1, start1, None)
        keep = torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1)
        logits, _ = module.model.forward_stream(x2, start2, [state * keep for state in states])
        want = F.cross_entropy(logits.flatten(0, 1), y2.flatten())
        fresh_logits, _ = module.model.forward_stream(x2, start2, None)
        fresh = F.cross_entropy(fresh_logits.flatten(0, 1), y2.flatten())
        got = module.carried_loss((x2, y2, start2))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert abs(got.item() - fresh.item()) > 1e-4  # the carried state mattered
    assert all(not s.requires_grad for s in module.stream_states)  # truncated backpropagation
    with torch.no_grad():  # a batch of another size (the last of an epoch) starts afresh
        small = module.carried_loss((x2[:1], y2[:1], start2[:1]))
        alone, _ = module.model.forward_stream(x2[:1], start2[:1], None)
    assert small.item() == pytest.approx(F.cross_entropy(alone.flatten(0, 1), y2[:1].flatten()).item(), rel=1e-6)


@pytest.mark.parametrize("agc_clip, calls", [(0.0, []), (0.05, [0.05]), (2.0, [2.0])])
def test_unitwise_clipping_runs_before_each_step_when_asked(monkeypatch, agc_clip, calls):
    import bdh_lightning.module as module_file

    seen = []
    monkeypatch.setattr(module_file, "clip_unitwise", lambda model, clip: seen.append((model, clip)))
    module = tiny_module(agc_clip=agc_clip)
    module.on_before_optimizer_step(None)
    assert [clip for _, clip in seen] == calls and all(model is module.model for model, _ in seen)


def test_carry_state_needs_streams_in_one_line():
    from bdh_lightning.errors import ConfigError

    module = tiny_module(carry_state=True)
    for data in (SimpleNamespace(sampling="windows"), SimpleNamespace()):
        module._trainer = SimpleNamespace(datamodule=data)
        try:
            with pytest.raises(ConfigError) as error:
                module.on_fit_start()
        finally:
            module._trainer = None
        assert str(error.value) == (
            "model.carry_state needs data.sampling streams (consecutive windows to carry the state across)"
        )
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(sampling="streams"))
    module.on_fit_start()
    module._trainer = None


def test_carried_state_is_loaded_for_this_rank_only_when_carrying(monkeypatch):
    saved = torch.randn(1, 2, 3, 2, 32, 32)  # world 1, L = 2 layers, B, H, N, D
    carrying = tiny_module(carry_state=True)
    carrying.on_load_checkpoint({"carried_state": saved})
    assert len(carrying.stream_states) == 2 and torch.equal(carrying.stream_states[1], saved[0, 1])
    carrying.stream_states = None
    carrying._trainer = SimpleNamespace(global_rank=1)
    try:
        carrying.on_load_checkpoint({"carried_state": saved})  # no share for rank 1: start afresh
    finally:
        carrying._trainer = None
    assert carrying.stream_states is None
    plain = tiny_module()
    plain.on_load_checkpoint({"carried_state": saved})
    plain.on_load_checkpoint({})
    assert plain.stream_states is None


def test_configure_model_chooses_the_kernel_once_from_the_data_and_precision(monkeypatch):
    module = tiny_module(compile=True)
    seen = []
    monkeypatch.setattr(
        module, "choose_kernel", lambda *args: seen.append(args) or setattr(module, "kernel_reason", "r")
    )
    data = SimpleNamespace(batch_size=3, block_size=17)
    module._trainer = SimpleNamespace(datamodule=data, precision="bf16-mixed",
                                      strategy=SimpleNamespace(root_device=torch.device("cpu")))  # fmt: skip
    try:
        module.configure_model()
        module.configure_model()
    finally:
        module._trainer = None
    assert seen == [(3, 17, "bf16-mixed", torch.device("cpu"))]  # once: Lightning may call configure_model again
    assert callable(module.model.forward_stream) and hasattr(module.model.forward_stream, "_torchdynamo_orig_callable")
    without_data = tiny_module()
    without_data._trainer = SimpleNamespace(datamodule=SimpleNamespace(), precision="32-true")
    try:
        without_data.configure_model()  # loaders given directly: nothing to size the choice by
    finally:
        without_data._trainer = None
    assert getattr(without_data, "kernel_reason", None) is None


def test_choose_kernel_on_a_gpu_counts_the_carried_state(monkeypatch):
    """On CUDA `auto` becomes a concrete kernel once, by predicted memory: the reference where it fits (here a
    faked GPU of 3 GiB), chunked when the carried state no longer leaves room for it; on the CPU `auto` stays."""
    from bdh_lightning import estimate

    monkeypatch.setattr(estimate, "device_memory", lambda device: (3 * 2**30, "the GPU has"))
    windows = tiny_module()
    reason = windows.choose_kernel(64, 256, "bf16-mixed", torch.device("cuda"))
    assert windows.config.kernel == "reference" and reason.startswith("kernel reference: it needs ")
    carried = tiny_module(carry_state=True, n_embd=256, n_head=4)  # a state of 64 x 2 x 4 x 512 x 256 floats
    reason = carried.choose_kernel(64, 256, "bf16-mixed", torch.device("cuda"))
    assert carried.config.kernel == "chunked" and reason.startswith("kernel chunked: reference needs ")
    assert windows.kernel_reason != carried.kernel_reason
    same_without_state = tiny_module(n_embd=256, n_head=4)
    same_without_state.choose_kernel(64, 256, "bf16-mixed", torch.device("cuda"))
    assert same_without_state.config.kernel == "reference"  # the state alone made the difference
    on_cpu = tiny_module()
    on_cpu.choose_kernel(64, 256, "32-true", torch.device("cpu"))
    assert on_cpu.config.kernel == "auto"
