"""Training on streams with carried state (issue 20): the stream layout, the same function as one long pass,
gradients within a window, the generator continuing a stream, exact resume, the schedule options."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, record_carried_losses, write_letters

from bdh_lightning.cli import BDHCLI
from bdh_lightning.data.streams import ShortStreams, StreamBatches, StreamLayout, validation_streams
from bdh_lightning.errors import DataError
from bdh_lightning.generate import Generator
from bdh_lightning.layer import layer_norm, rope_cos_sin
from bdh_lightning.main import main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import BDHLitModule, clip_unitwise

T = 8


def corpus_of(sizes):
    """A stand-in corpus of files of these sizes whose byte i is i % 251 (so windows can be located)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    data = (np.arange(starts[-1]) % 251).astype(np.int64)

    def windows(offsets, length):
        return torch.from_numpy(np.stack([data[o : o + length] for o in offsets]))

    return SimpleNamespace(starts=starts, windows=windows)


def test_each_row_reads_its_stretch_window_after_window_and_restarts_at_its_end():
    layout = StreamLayout(np.array([0, 400]), 0, 400, rows=4, block_size=T)  # stretches of 100 bytes
    for row in range(4):
        places = [layout.window(row, k) for k in range(30)]
        per_cycle = (100 - 1) // T  # 12 whole windows of T + 1 bytes in 100 bytes
        for k, (offset, position) in enumerate(places):
            assert offset == row * 100 + (k % per_cycle) * T and position == (k % per_cycle) * T
            assert offset + T + 1 <= (row + 1) * 100  # inside its stretch
    assert layout.window(1, 12) == (100, 0)  # used up: the stream starts again, at position 0


def test_no_window_spans_two_files_and_streams_restart_at_file_boundaries():
    sizes = [50, 37, 200, 13]
    corpus = corpus_of(sizes)
    layout = StreamLayout(corpus.starts, 0, sum(sizes), rows=2, block_size=T)
    starts = set(int(s) for s in corpus.starts)
    for row in range(2):
        previous = None
        for k in range(60):
            offset, position = layout.window(row, k)
            inside = [s for s in starts if offset < s < offset + T + 1]
            assert not inside, (row, k, offset)
            if previous is not None and position:
                assert offset == previous + T  # continues the previous window
            if position == 0 and previous is not None:
                assert offset in starts or offset == row * (sum(sizes) // 2)
            previous = offset
    batches = StreamBatches(corpus, layout, 0, 2, start=0)
    x, y, start = batches.batch(5)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, T) and start.shape == (2,)
    assert torch.equal(StreamBatches(corpus, layout, 0, 2, start=5).batch(5)[0], x)  # batch k is a function of k


def test_pieces_of_exact_multiples_of_block_size_keep_their_last_window_inside_them():
    """A piece of n * T bytes holds n - 1 windows of T + 1 bytes, not n: the n-th would read one byte past it (the
    next file's first byte; at the end of the training split, the first validation byte)."""
    corpus = corpus_of([32, 48, 64])  # files of 4, 6 and 8 times T
    layout = StreamLayout(corpus.starts, 0, 144, rows=1, block_size=T)
    assert int(layout.windows[0][-1]) == 3 + 5 + 7  # windows in one pass of the stream
    ends = corpus.starts[1:]
    for k in range(2 * 15):
        offset, position = layout.window(0, k)
        end = int(ends[np.searchsorted(ends, offset, side="right")])  # the end of the file holding the window
        assert offset + T + 1 <= end, (k, offset)
    assert layout.window(0, 2) == (16, 16) and layout.window(0, 3) == (32, 0)  # 24 would read byte 32
    split = StreamLayout(np.array([0, 200]), 0, 64, rows=2, block_size=T)  # a training split ending at byte 64
    last = max(split.window(1, k)[0] for k in range(10))
    assert last == 32 + 16 and last + T + 1 <= 64  # the window at 56 would read the first validation byte


def test_validation_streams_never_restart_within_one_validation():
    """400 validation bytes, T = 16 and 64 windows: 8 streams of 3 whole windows each, so 3 batches, not 8 (without
    the clamp, row 0 read windows at 0, 16, 32, 0, 16, 32, ... and counted them twice, carrying state across)."""
    corpus = corpus_of([2000])
    batches = validation_streams(corpus, 1600, 2000, 16, 64)
    assert len(batches) == 3
    for k, (x, y, positions) in enumerate(batches):
        assert positions.tolist() == [k * 16] * 8  # no row starts again
    for k, (x, y, _) in enumerate(batches):  # row r reads its stretch [1600 + 50 r, 1650 + 50 r) in order
        for row in range(8):
            start = 1600 + row * 50 + k * 16
            assert x[row].tolist() == [i % 251 for i in range(start, start + 16)]
            assert y[row].tolist() == [i % 251 for i in range(start + 1, start + 17)]


def test_validation_streams_are_as_many_as_the_windows_and_the_split_allow():
    corpus = corpus_of([2000])
    assert [x.shape for x, _, _ in validation_streams(corpus, 1600, 2000, 16, 3)] == [(3, 16)]  # one per window
    assert [x.shape for x, _, _ in validation_streams(corpus, 1600, 2000, 16, 1)] == [(1, 16)]
    batches = validation_streams(corpus, 1600, 1645, 8, 64)  # 45 bytes hold 5 windows of T + 1 = 9 bytes
    assert [x.shape for x, _, _ in batches] == [(5, 8)]  # 5 streams (not 8) of one window each
    assert batches[0][0][:, 0].tolist() == [(1600 + 9 * row) % 251 for row in range(5)]  # stretches of 9 bytes
    # A file boundary inside a stream: it restarts there, and the validation still reads all 12 windows of each.
    batches = validation_streams(corpus_of([1600, 100, 300]), 1600, 2000, 16, 24, max_streams=2)
    assert len(batches) == 12
    assert [int(positions[0]) for _, _, positions in batches] == [16 * k for k in range(6)] * 2


def test_split_and_file_layouts_word_for_word():
    one = StreamLayout(np.array([0, 9]), 0, 9, rows=1, block_size=T)  # exactly T + 1 bytes: one window
    assert int(one.windows[0][-1]) == 1 and one.window(0, 5) == (0, 0)
    uneven = StreamLayout(np.array([0, 50]), 0, 50, rows=3, block_size=T)  # 50 // 3 = 16 bytes per stream
    assert [uneven.window(row, 0) for row in range(3)] == [(0, 0), (16, 0), (32, 0)]
    counts = StreamLayout(corpus_of([9, 17, 25]).starts, 0, 51, rows=1, block_size=T)  # n * T + 1 bytes: n windows
    assert int(counts.windows[0][-1]) == 1 + 2 + 3
    with pytest.raises(DataError) as error:
        StreamLayout(np.array([0, 100]), 0, 16, rows=2, block_size=T)
    assert str(error.value) == (
        "data.sampling streams: the training split (16 bytes) gives each of 2 streams (devices x data.batch_size) "
        "8 bytes, fewer than block_size + 1 = 9; use a smaller data.batch_size or data.block_size, or more data"
    )
    with pytest.raises(DataError) as error:
        validation_streams(corpus_of([2000]), 1600, 1608, T, 64)
    assert str(error.value).startswith("data.sampling streams: the validation split (8 bytes) gives each of 1 streams")
    with pytest.raises(DataError) as error:
        StreamLayout(corpus_of([5, 5, 5, 5]).starts, 0, 20, rows=1, block_size=T)
    assert str(error.value) == (
        "data.sampling streams: stream 0 (0..20) holds no whole window of 9 bytes inside one file; use a smaller "
        "data.block_size, or data.sampling windows"
    )


def test_loader_workers_take_turns_so_the_stream_is_the_same_for_any_number():
    corpus = corpus_of([400])
    layout = StreamLayout(corpus.starts, 0, 400, rows=2, block_size=T)
    batches = StreamBatches(corpus, layout, 0, 2, start=3)
    expected = [batches.batch(k) for k in range(3, 8)]
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers)
        got = [batch for batch, _ in zip(loader, range(5))]
        for (x, y, p), (ex, ey, ep) in zip(got, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(p, ep), workers


def test_a_split_too_small_for_its_streams_is_one_line():
    with pytest.raises(DataError) as error:
        StreamLayout(np.array([0, 100]), 0, 100, rows=32, block_size=T)
    assert "streams" in str(error.value) and "\n" not in str(error.value)


def short_streams(sizes, windows=4, seed=3, first_row=0, batch_size=5):
    corpus = corpus_of(sizes)
    layout = StreamLayout(corpus.starts, 0, sum(sizes), rows=1, block_size=T)
    return ShortStreams(corpus, layout, windows, seed, first_row, batch_size, start=0), set(
        int(s) for s in corpus.starts
    )


def test_short_streams_read_k_windows_from_random_places_out_of_step():
    """data.stream_windows 4: each row reads 4 consecutive windows, then jumps to a random place and starts a
    fresh stream (position 0); row r's first stream is 4 - r % 4 windows long, so the rows restart on
    different steps; the rows and the streams read different places."""
    batches, _ = short_streams([4000], windows=4)
    fresh_at = {row: [] for row in range(5)}
    begins = set()
    for row in range(5):
        previous = None
        for k in range(40):
            offset, position = batches.place(row, k)
            first = 4 - row % 4
            expected = (k if k < first else (k - first) % 4) * T
            assert position == expected, (row, k)
            if position:
                assert offset == previous + T  # continues its stream
            else:
                fresh_at[row].append(k)
                begins.add(offset)
            previous = offset
    assert fresh_at[0][:3] == [0, 4, 8] and fresh_at[1][:3] == [0, 3, 7] and fresh_at[3][:3] == [0, 1, 5]
    assert len(begins) > 40  # random places, not a fixed stretch (5 rows x about 10 streams each)
    x, y, positions = batches.batch(6)
    assert x.shape == (5, T) and torch.equal(positions, torch.tensor([batches.place(r, 6)[1] for r in range(5)]))
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_short_streams_start_anywhere_their_windows_fit_and_nowhere_else():
    """Catches the range of stream starts off by one either way (a stream running past the split's last window,
    or a start never drawn), and the row's or stream's part of the seed dropped."""
    batches, _ = short_streams([6 * T + 1], windows=4, batch_size=40)  # 6 windows: a stream of 4 starts at 0, 1 or 2
    begins = {}
    for row in range(40):
        for k in range(12):
            offset, position = batches.place(row, k)
            first = 4 - row % 4
            i = k if k < first else (k - first) % 4
            assert position == i * T and offset == offset // T * T and offset // T - i in (0, 1, 2), (row, k, offset)
            begins.setdefault(offset // T - i, set()).add(row)
    assert sorted(begins) == [0, 1, 2] and all(len(rows) > 3 for rows in begins.values())


def test_the_jth_stream_of_row_r_starts_where_seed_r_j_says():
    """Catches the streams of a row numbered from 1 or 2 (the docstring's contract: row r's j-th stream is drawn
    from (seed, r, j)), and a split shorter than one stream drawing a start other than its first window."""
    batches, _ = short_streams([4000], windows=4, seed=3)
    begins = batches.begins
    for row in (0, 1, 6):
        first = 4 - row % 4
        starts = [batches.place(row, 0)[0]] + [batches.place(row, first + 4 * j)[0] for j in range(3)]
        drawn = [int(np.random.default_rng([3, row, j]).integers(begins)) * T for j in range(4)]
        assert starts == drawn, row
    short, _ = short_streams([3 * T + 1], windows=4)  # 3 windows, streams of 4: every stream starts at the first
    assert {short.place(row, k)[0] for row in range(8) for k in (0, *range(4 - row % 4, 20, 4))} == {0}


def test_short_streams_restart_at_file_boundaries_and_never_span_two_files():
    batches, starts = short_streams([50, 37, 200, 13, 90], windows=6, batch_size=4)
    restarts_inside = 0
    for row in range(4):
        previous = None
        for k in range(200):
            offset, position = batches.place(row, k)
            assert not [s for s in starts if offset < s < offset + T + 1], (row, k, offset)
            first = 6 - row % 6
            i = k if k < first else (k - first) % 6  # windows since the stream's random start
            assert position <= i * T
            if position:
                assert offset == previous + T
            elif i:  # restarted within its 6 windows: only where the next file begins
                assert offset in starts and offset >= previous + T
                restarts_inside += 1
            previous = offset
    assert restarts_inside > 0  # the boundary case was met


def test_short_streams_are_a_pure_function_of_the_batch_number_and_the_seed():
    one, _ = short_streams([3000], seed=5)
    again, _ = short_streams([3000], seed=5)
    other, _ = short_streams([3000], seed=6)
    assert all(torch.equal(a, b) for a, b in zip(one.batch(17), again.batch(17)))
    assert not torch.equal(one.batch(17)[0], other.batch(17)[0])
    later = ShortStreams(one.corpus, one.layout, 4, 5, 0, 5, start=17)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(later)), one.batch(17)))  # a resumed run


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data.sampling", "streams", "--data.stream_windows", "-1"], "non-negative integer"),
        (["--data.stream_windows", "4"], "needs data.sampling streams"),
    ],
)
def test_bad_stream_windows_are_one_line(tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    assert main(["fit", "--data.path", "corpus.txt", *TINY_ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "data.stream_windows" in err
    assert not (tmp_path / "lightning_logs").exists()


def test_short_streams_through_the_module_equal_one_long_pass_since_each_fresh_start(tmp_path):
    """data.stream_windows 3 feeding BDHLitModule.carried_loss (the plain sum, random weights, float64): every
    step's loss is that of one causal pass over each row's bytes since its stream's fresh start, so the state
    resets exactly where a short stream begins and carries everywhere else."""
    from bdh_lightning.data import ByteDataModule

    write_letters(tmp_path / "corpus.txt")
    data = ByteDataModule(
        path=str(tmp_path / "corpus.txt"), block_size=T, batch_size=4, sampling="streams", stream_windows=3
    )
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=0, accumulate_grad_batches=1)
    module = BDHLitModule(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=8, carry_state=True)
    module.model = tiny_model()
    since = [[] for _ in range(4)]  # each row's windows since its stream began
    fresh = 0
    for _, (x, y, start) in zip(range(8), data.train_dataloader()):
        got = module.carried_loss((x, y, start))
        logits = []
        for row in range(4):
            if int(start[row]) == 0:
                since[row], fresh = [], fresh + 1
            since[row].append(x[row])
            assert int(start[row]) == (len(since[row]) - 1) * T
            logits.append(module.model(torch.cat(since[row]).unsqueeze(0))[0, -T:])
        expected = torch.nn.functional.cross_entropy(torch.stack(logits).float().flatten(0, 1), y.flatten())
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)  # the module takes its loss in float32
    assert fresh >= 4 + 8  # every row restarted at least twice more in 8 steps (streams of at most 3 windows)


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = BDH(
        BDHConfig(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0, kernel="reference")
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # large enough that every layer's attention matters
    return model.to(dtype).eval()


@pytest.mark.parametrize("starts", [[0, 0, 0], [0, 5000, 9000]])
def test_windows_with_carried_state_equal_one_long_pass(starts):
    model = tiny_model()
    B, windows = 3, 4
    idx = torch.randint(0, 256, (B, windows * T))
    start = torch.tensor(starts)
    whole, _ = model.forward_stream(idx, start)  # one pass over the concatenation
    states, pieces = None, []
    for k in range(windows):
        logits, states = model.forward_stream(idx[:, k * T : (k + 1) * T], start + k * T, states)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)
    if starts == [0, 0, 0]:
        torch.testing.assert_close(whole, model(idx), rtol=1e-10, atol=1e-10)  # the plain forward, too
    # The generator continues the stream from that state: its next logits are the long pass's.
    longer = torch.cat([idx, torch.randint(0, 256, (B, 1))], dim=1)
    expected, _ = model.forward_stream(longer, start)
    generator = Generator(model, B, states=states, position=0)
    generator.position = windows * T
    if starts == [0, 0, 0]:
        with torch.no_grad():
            got = generator.step(longer[:, -1])
        torch.testing.assert_close(got, expected[:, -1], rtol=1e-10, atol=1e-10)


def plain_window_loss(model, idx, targets, positions, states):
    """The spec's layer written out with the incoming state M as a constant: y_t = ln(q_t M + sum_{s<t} q_t·q_s x_s)."""
    c = model.config
    N = c.neurons_per_head
    cos, sin = rope_cos_sin(positions, N)
    x = layer_norm(model.embed(idx))  # B, T, D
    for layer in range(c.n_layer):
        u = 0
        for h in range(c.n_head):
            a = torch.relu(x @ model.encoder[h])  # B, T, N
            q = a * cos + torch.stack((-a[..., 1::2], a[..., 0::2]), -1).flatten(-2) * sin
            y = torch.einsum("btn,bnd->btd", q, states[layer][:, h])
            scores = torch.einsum("btn,bsn->bts", q, q).tril(-1)
            y = layer_norm(y + scores @ x)
            b = torch.relu(y @ model.encoder_v[h])
            u = u + (a * b) @ model.decoder[h * N : (h + 1) * N]
        x = layer_norm(x + layer_norm(u))
    logits = x @ model.lm_head
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_gradients_stay_within_the_window():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 3 * T))
    _, states = model.forward_stream(idx[:, :T], 0)
    states = [s.double() for s in states]
    window, targets = idx[:, T : 2 * T], idx[:, T + 1 : 2 * T + 1]
    logits, _ = model.forward_stream(window, T, states)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    got = torch.autograd.grad(loss, list(model.parameters()))
    want_loss = plain_window_loss(model, window, targets, torch.arange(T, 2 * T), states)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert all(not s.requires_grad for s in states)


STREAM_ARGS = (
    TINY_ARGS
    + (
        "--data.sampling streams --model.carry_state true --model.dropout 0.1 --data.batch_size 4 "
        "--trainer.val_check_interval 3 --checkpoint.every_n_train_steps 3 --data.val_windows 4 --sample.length 0 "
        "--sparsity.max_batches 1"
    ).split()
)


@pytest.mark.parametrize("short", [[], ["--data.stream_windows", "2"]])
def test_training_with_carried_state_resumes_exactly_and_validates_both_ways(tmp_path, monkeypatch, short):
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    seen = record_carried_losses(monkeypatch)

    def fit(root: str, steps: int, *extra: str) -> BDHCLI:
        args = ["fit", "--data.path", "corpus.txt", *STREAM_ARGS, *short, "--trainer.max_steps", str(steps)]
        return BDHCLI(args=[*args, "--trainer.default_root_dir", root, *extra])

    straight = fit("a", 6)
    first = list(seen)
    assert len(first) == 6
    metrics = straight.trainer.callback_metrics
    assert "val/bpb_carried" in metrics and "val/bpb_windowed" in metrics
    ckpt = tmp_path / "a/lightning_logs/version_0/checkpoints"
    halfway = sorted(ckpt.glob("*.ckpt"))
    assert any("carried_state" in torch.load(p, weights_only=True) for p in halfway)
    seen.clear()
    fit("b", 3)
    seen.clear()
    step3 = tmp_path / "b/lightning_logs/version_0/checkpoints/last.ckpt"
    fit("b", 6, "--ckpt_path", str(step3))
    assert seen == first[3:]  # the same streams, the same carried state, the same dropout: bit for bit


def test_carry_state_without_streams_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    assert main(["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--model.carry_state", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.sampling streams" in err
    assert not (tmp_path / "lightning_logs").exists()


def test_linear_decay_reaches_the_floor_in_a_straight_line():
    module = BDHLitModule(
        n_layer=1,
        n_embd=8,
        n_head=1,
        mlp_internal_dim_multiplier=2,
        learning_rate=1e-2,
        warmup_steps=10,
        decay_steps=100,
        min_learning_rate=1e-3,
        decay="linear",
    )
    for step in (10, 35, 60, 85, 110, 500):
        progress = min(1.0, (step - 10) / 100)
        assert math.isclose(module.learning_rate_at(step), 1e-3 + (1 - progress) * 9e-3, rel_tol=1e-12)
    assert module.learning_rate_at(4) == pytest.approx(1e-2 * 5 / 10)


def test_unitwise_clipping_bounds_each_neuron_by_its_weights():
    model = tiny_model(torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100
    small = model.encoder.grad[:, :, 0].clone() * 0 + 1e-9
    model.encoder.grad[:, :, 0] = small  # a unit under its bound keeps its gradient
    clip_unitwise(model, 0.05)
    for name, p in model.named_parameters():
        axis = {"embed.weight": 1, "encoder": 1, "encoder_v": 1, "decoder": 1, "lm_head": 0}[name]
        bound = 0.05 * p.norm(dim=axis).clamp_min(1e-3)
        assert (p.grad.norm(dim=axis) <= bound * (1 + 1e-5)).all(), name
    torch.testing.assert_close(model.encoder.grad[:, :, 0], small)


@pytest.mark.parametrize("short", [0, 4])
def test_every_rank_reads_streams_of_its_own(tmp_path, short):
    from bdh_lightning.data import ByteDataModule

    write_letters(tmp_path / "corpus.txt")
    seen = []
    for rank in range(2):
        data = ByteDataModule(
            path=str(tmp_path / "corpus.txt"), block_size=T, batch_size=3, sampling="streams", stream_windows=short
        )
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        x, _, start = next(iter(data.train_dataloader()))
        assert torch.equal(start, torch.zeros(3, dtype=torch.long))
        seen.append(x)
    rows = torch.cat(seen)
    assert len({tuple(row.tolist()) for row in rows}) == 6  # six distinct streams, three per rank


def test_carried_state_under_bf16_autocast_stays_close_and_float32():
    model = tiny_model(torch.float32)
    idx = torch.randint(0, 256, (2, 2 * T))
    _, exact_states = model.forward_stream(idx[:, :T], 0)
    want, _ = model.forward_stream(idx[:, T:], T, exact_states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, states = model.forward_stream(idx[:, :T], 0)
        got, _ = model.forward_stream(idx[:, T:], T, states)
    assert all(s.dtype == torch.float32 for s in states)
    assert ((got.float() - want).norm() / want.norm()).item() < 5e-2


@pytest.mark.parametrize("chunk_size", [0, 6])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_the_chunked_kernel_carries_the_state_as_the_reference_does(chunk_size, p):
    from bdh_lightning.kernels import chunked_layer
    from bdh_lightning.kernels.masks import dropout_mask
    from bdh_lightning.layer import reference_layer, stream_attention

    gen = torch.Generator().manual_seed(3)
    B, H, D, N = 2, 2, 8, 16
    x = layer_norm(torch.randn(B, 1, T, D, dtype=torch.float64, generator=gen)).requires_grad_()
    weights = [(torch.randn(*shape, dtype=torch.float64, generator=gen) * 0.3).requires_grad_()
               for shape in ((H, D, N), (H, D, N), (H * N, D))]  # fmt: skip
    state = torch.randn(B, H, N, D, dtype=torch.float64, generator=gen)
    positions = torch.tensor([[40], [0]]) + torch.arange(T)
    cos, sin = (t.unsqueeze(1) for t in rope_cos_sin(positions, N))
    mask = dropout_mask(77, B, H, T, N, p).double() if p else None
    want_states, got_states = [], []
    read = stream_attention(state, want_states)
    want = reference_layer(x, *weights, cos, sin, p, True, dropout_mask=mask, read=read)
    got = chunked_layer(x, *weights, cos, sin, p, seed=77, chunk_size=chunk_size, state=state, states_out=got_states)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_states[0], want_states[0], rtol=1e-10, atol=1e-10)
    g = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, [x, *weights], g), torch.autograd.grad(want, [x, *weights], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_windows_with_carried_state_equal_one_long_pass_with_the_chunked_kernel():
    model = tiny_model()
    model.config.kernel, model.config.chunk_size = "chunked", 6
    idx = torch.randint(0, 256, (2, 3 * T))
    whole, _ = model.forward_stream(idx, torch.tensor([0, 100]))
    states, pieces = None, []
    for k in range(3):
        logits, states = model.forward_stream(idx[:, k * T : (k + 1) * T], torch.tensor([0, 100]) + k * T, states)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
def test_a_window_with_carried_state_traces_as_one_graph_in_training(kernel):
    """torch.compile sees forward_stream whole (dropout, per-row positions, exact rotary phases, the state read
    and written): no graph break, with and without an incoming state, and the layer as one compile region."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1, kernel=kernel))
    model.train()
    idx = torch.randint(0, 256, (2, T))
    start = torch.tensor([0, 2**20])
    for states in (None, [torch.randn(2, 2, 64, 16) for _ in range(2)]):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.forward_stream)(idx, start, states)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        calls = [n for n in explained.graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        assert len(calls) == 2 and len({n.args[0].target for n in calls}) == 1  # the layer: one region, two calls


def test_compiled_windows_with_carried_state_equal_eager(tmp_path):
    """Two windows of a stream through the compiled forward_stream give the eager logits, states and gradients
    (chunked kernel, dropout, uneven chunks, rows at different stream positions). AOTAutograd's graphs run eagerly
    (backend aot_eager): inductor's C++ build of this graph takes minutes on 2 cores; the fit below runs
    inductor."""
    torch.manual_seed(0)
    config = BDHConfig(
        n_layer=1, n_embd=16, n_head=1, mlp_internal_dim_multiplier=4, dropout=0.2, kernel="chunked", chunk_size=24
    )
    model = BDH(config).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    compiled = torch.compile(model.forward_stream, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 256, (2, 2 * T))
    want_states = got_states = None
    for k in range(2):  # a fresh stream, then one carrying its state
        window, start = idx[:, k * T : (k + 1) * T], torch.tensor([0, 5000]) + k * T
        torch.manual_seed(k)  # the same dropout seeds for both
        want, want_states = model.forward_stream(window, start, want_states)
        want_grads = torch.autograd.grad(want.square().mean(), list(model.parameters()))
        torch.manual_seed(k)
        got, got_states = compiled(window, start, got_states)
        got_grads = torch.autograd.grad(got.square().mean(), list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_states, want_states, rtol=1e-4, atol=1e-4)
        for g, e in zip(got_grads, want_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        want_states = [s.detach() for s in want_states]
        got_states = [s.detach() for s in got_states]


def test_compiled_training_with_carried_state(tmp_path, monkeypatch):
    """model.compile with model.carry_state: a short fit through the CLI trains through the compiled (inductor)
    forward_stream and carries the state into its checkpoint. (No validation: each of its graphs is another
    compile; the validation's code is the same with compile off, tested above.)"""
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    args = ["fit", "--data.path", "corpus.txt", *STREAM_ARGS, "--trainer.max_steps", "2", "--model.compile", "true"]
    small = ["--model.n_layer", "1", "--model.n_head", "1", "--model.kernel", "reference"]
    cli = BDHCLI(args=[*args, *small, "--trainer.num_sanity_val_steps", "0", "--trainer.val_check_interval", "4"])
    module = cli.model
    assert module._compiled and module.model.forward_stream is not BDH.forward_stream.__get__(module.model)
    assert module.stream_states is not None and module.stream_states[0].abs().sum() > 0
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    saved = torch.load(last, weights_only=True)["carried_state"]
    torch.testing.assert_close(saved[0], torch.stack(module.stream_states))


def test_gradient_accumulation_carries_the_state_from_micro_batch_to_micro_batch(tmp_path, monkeypatch):
    """With trainer.accumulate_grad_batches 2 each micro-batch is the next window of the same streams and reads
    the state the previous micro-batch wrote (a window's gradient still stays within it)."""
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    seen = []
    forward_stream = BDH.forward_stream

    def recording(self, idx, start, states=None, exact=False):
        logits, written = forward_stream(self, idx, start, states, exact)
        if self.training:
            seen.append((start.tolist(), None if states is None else [s.clone() for s in states], written))
        return logits, written

    monkeypatch.setattr(BDH, "forward_stream", recording)
    args = ["fit", "--data.path", "corpus.txt", *STREAM_ARGS, "--trainer.max_steps", "2"]
    cli = BDHCLI(args=[*args, "--trainer.accumulate_grad_batches", "2", "--trainer.num_sanity_val_steps", "0"])
    assert cli.trainer.global_step == 2 and len(seen) == 4  # two optimizer steps of two windows each
    block = cli.datamodule.block_size
    starts = [start for start, _, _ in seen]
    assert starts == [[k * block] * 4 for k in range(4)]  # every row's stream continues window after window
    assert seen[0][1] is None
    for (_, _, written), (_, read, _) in zip(seen, seen[1:]):
        for w, r in zip(written, read):
            torch.testing.assert_close(r, w, rtol=0, atol=0)


def test_a_checkpoint_of_either_mode_resumes_in_the_other(tmp_path, monkeypatch):
    """Windows to streams with carried state (the state starts from zero) and back (the saved state is left
    unused): both resume at the checkpoint's step and train on."""
    monkeypatch.chdir(tmp_path)
    write_letters(tmp_path / "corpus.txt")
    plain = ["fit", "--data.path", "corpus.txt", *TINY_ARGS, "--sample.length", "0", "--sparsity.max_batches", "1"]
    carried = ["fit", "--data.path", "corpus.txt", *STREAM_ARGS]

    def last(root: str) -> str:
        versions = sorted((tmp_path / root / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
        return str(versions[-1] / "checkpoints/last.ckpt")

    BDHCLI(args=[*plain, "--trainer.max_steps", "2", "--trainer.default_root_dir", "w"])
    cli = BDHCLI(
        args=[*carried, "--trainer.max_steps", "4", "--trainer.default_root_dir", "w", "--ckpt_path", last("w")]
    )
    assert cli.trainer.global_step == 4 and cli.model.stream_states is not None
    assert "carried_state" in torch.load(last("w"), weights_only=True)
    BDHCLI(args=[*carried, "--trainer.max_steps", "2", "--trainer.default_root_dir", "s"])
    cli = BDHCLI(args=[*plain, "--trainer.max_steps", "4", "--trainer.default_root_dir", "s", "--ckpt_path", last("s")])
    assert cli.trainer.global_step == 4 and cli.model.stream_states is None
