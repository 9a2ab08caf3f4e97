"""insight/activations.py's helpers with planted values: the contexts shown around a position, the k largest values
kept over batches, the shuffled-window control, the strongest contexts and the selective-neuron report's fields
(test_insight_planted.py checks the measures themselves against planted models)."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bdh_lightning.data.corpus import read_corpus
from bdh_lightning.errors import DataError
from bdh_lightning.insight.activations import (
    ELEMENT_BUDGET,
    CorpusSample,
    TopValues,
    loss_correlation,
    selective_neurons,
    show_bytes,
    shuffled_windows,
    spearman,
    strongest_contexts,
    windows_per_batch,
)
from bdh_lightning.insight.options import NeuronOptions

TEXT = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # 62 bytes, each its own


def test_bytes_are_shown_as_utf8_with_invalid_bytes_escaped_and_newlines_marked():
    assert show_bytes(b"caf\xc3\xa9\nnext\xff") == "café↵next\\xff"
    assert show_bytes(np.frombuffer(b"a\nb", dtype=np.uint8)) == "a↵b"


@pytest.fixture
def sample(tmp_path):
    (tmp_path / "text.txt").write_bytes(TEXT)
    return CorpusSample(read_corpus(str(tmp_path / "text.txt")), block_size=8, windows=2, val_fraction=0.5)


@pytest.mark.parametrize(
    "offset, width, before, byte, after",
    [(20, 8, "cdefghij", "k", "lm"), (3, 8, "012", "3", "45"), (20, 4, "ghij", "k", "l"), (20, 2, "ij", "k", "l"),
     (20, 20, "0123456789abcdefghij", "k", "lmnop"), (59, 40, TEXT[19:59].decode(), "X", "YZ"),
     (61, 8, "RSTUVWXY", "Z", ""), (0, 8, "", "0", "12")],
)  # fmt: skip
def test_a_context_is_the_bytes_before_the_byte_read_and_a_quarter_as_many_after(
    sample, offset, width, before, byte, after
):
    assert sample.context(offset, width) == {"before": before, "byte": byte, "after": after}


def test_the_k_largest_values_of_each_neuron_are_kept_with_their_offsets_over_batches():
    top = TopValues(k=2, width=3)
    top.add(torch.tensor([[5.0, 0.0, 1.0]]), torch.tensor([100]))  # fewer rows than k
    assert top.values.tolist() == [[5.0, 0.0, 1.0]] and top.offsets.tolist() == [[100, 100, 100]]
    top.add(torch.tensor([[1.0, 7.0, 2.0], [6.0, 3.0, 0.5]]), torch.tensor([200, 201]))
    values, order = top.values.sort(dim=0, descending=True)
    assert values.tolist() == [[6.0, 7.0, 2.0], [5.0, 3.0, 1.0]]
    assert top.offsets.gather(0, order).tolist() == [[201, 200, 200], [100, 201, 100]]
    top.add(torch.tensor([[9.0, 0.0, 0.0], [8.0, 8.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([300, 301, 302]))
    values, order = top.values.sort(dim=0, descending=True)
    assert values.tolist() == [[9.0, 8.0, 3.0], [8.0, 7.0, 2.0]]
    assert top.offsets.gather(0, order).tolist() == [[300, 301, 302], [301, 200, 200]]


def test_offsets_past_2_to_the_24_are_kept_exactly():
    """Offsets are integers: a float32 copy would round byte 2**25 + 1 of a large corpus to 2**25."""
    top = TopValues(k=2, width=1)
    top.add(torch.tensor([[1.0], [2.0]]), torch.tensor([2**25 + 1, 2**25 + 3]))
    assert sorted(top.offsets.flatten().tolist()) == [2**25 + 1, 2**25 + 3] and top.offsets.dtype == torch.long


def test_exactly_k_values_are_kept_as_they_are():
    top = TopValues(k=2, width=2)
    top.add(torch.tensor([[1.0, 4.0], [3.0, 2.0]]), torch.tensor([10, 11]))
    assert top.values.tolist() == [[3.0, 4.0], [1.0, 2.0]] and top.offsets.tolist() == [[11, 10], [10, 11]]


def test_shuffled_windows_are_each_windows_own_bytes_in_an_order_fixed_by_the_seed():
    idx = torch.arange(40).view(4, 10)
    torch.manual_seed(0)
    first = shuffled_windows(idx, seed=3)
    torch.manual_seed(1)  # the global generator is not what orders them
    assert torch.equal(shuffled_windows(idx, seed=3), first)
    assert not torch.equal(shuffled_windows(idx, seed=4), first) and not torch.equal(first, idx)
    assert torch.equal(first.sort(dim=1).values, idx)  # each window keeps its bytes


def test_strongest_contexts_list_each_positive_value_with_its_offset_and_bytes(sample):
    values = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    offsets = torch.tensor([[20, 5], [3, 6], [7, 30]])
    shown = strongest_contexts({"_strongest": (values, offsets)}, sample, 0, 4)
    assert shown == [{"before": "ghij", "byte": "k", "after": "l", "value": 3.0, "offset": 20},
                     {"before": "012", "byte": "3", "after": "4", "value": 2.0, "offset": 3}]  # fmt: skip
    assert strongest_contexts({"_strongest": (values, offsets)}, sample, 1, 4) == [
        {"before": "qrst", "byte": "u", "after": "v", "value": 1.0, "offset": 30}]  # fmt: skip
    small = torch.tensor([[0.5, 0.0]])  # a value below 1 is still a firing
    assert len(strongest_contexts({"_strongest": (small, offsets[:1])}, sample, 0, 4)) == 1


class Sample:
    offsets, block_size = np.arange(4), 25

    def context(self, offset, width):
        return {"before": "b", "byte": "x", "after": "a", "width": width}


def planted(nonzero, mean, strongest, shuffled, contexts=2, top=4, width=7):
    """selective_neurons over 4 neurons (N = 2: heads 0 and 1) whose k largest values are all `strongest`."""
    k = contexts
    top_values = TopValues(k, 4)
    top_values.add(torch.tensor([strongest] * k), torch.arange(k))
    shuffled_values = torch.tensor([shuffled] * k)
    options = NeuronOptions(top=top, contexts=contexts, width=width, signal="ab")
    return selective_neurons(
        torch.tensor(mean), torch.tensor(nonzero), top_values, shuffled_values, Sample(), options, N=2
    )


def test_eligible_neurons_fire_at_twice_the_contexts_or_more_and_have_a_positive_mean():
    """Neuron 0 fires exactly 4 = 2 x 2 times (eligible), 1 only 3 times, 2 has a zero mean, 3 fires 6 times."""
    report = planted(nonzero=[4, 3, 9, 6], mean=[0.5, 0.5, 0.0, 0.25], strongest=[2.0, 9.0, 9.0, 1.0],
                     shuffled=[1.0, 1.0, 1.0, 1.0])  # fmt: skip
    assert report["eligible"] == 2
    assert [n["neuron"] for n in report["neurons"]] == ["h0:0", "h1:1"]
    floor = 0.01 * 1.5  # 1% of the eligible neurons' median strongest value (2 and 1)
    first, second = report["neurons"]
    assert first == {"neuron": "h0:0", "context_selectivity": pytest.approx((2 + floor) / (1 + floor)),
                     "selectivity": 4.0, "mean": 0.5, "fires": 4,
                     "contexts": [{"before": "b", "byte": "x", "after": "a", "width": 7, "value": 2.0, "offset": 0},
                                  {"before": "b", "byte": "x", "after": "a", "width": 7, "value": 2.0, "offset": 1}]}  # fmt: skip
    assert (second["selectivity"], second["mean"], second["fires"]) == (4.0, 0.25, 6)
    assert report["measure"] == (
        "mean of the 2 largest ab values on the text / the same on the windows with their bytes shuffled "
        "(value = ab averaged over layers; neurons firing at >= 4 positions)"
    )
    assert report["selectivity_ceiling"] == 4 * 25 / 2 and report["median_selectivity"] == 4.0  # 2 / 0.5, 1 / 0.25


def test_a_neuron_firing_on_few_positions_is_not_eligible_even_with_a_positive_mean():
    report = planted(nonzero=[1, 0, 0, 0], mean=[0.1, 0.0, 0.0, 0.0], strongest=[2.0, 0.0, 0.0, 0.0],
                     shuffled=[0.0, 0.0, 0.0, 0.0])  # fmt: skip
    assert report["eligible"] == 0 and report["neurons"] == []
    assert report["median_context_selectivity"] is None and report["share_above_2"] is None
    assert report["median_selectivity"] is None


def test_tiny_values_divide_without_a_floor_of_one():
    """Values far below 1 (a model at initialisation): the ratios are the values' own, not clamped at 1."""
    report = planted(nonzero=[8, 8, 0, 0], mean=[1e-4, 2e-4, 0.0, 0.0], strongest=[4e-4, 4e-4, 0.0, 0.0],
                     shuffled=[1e-4, 2e-4, 0.0, 0.0], top=1)  # fmt: skip
    floor = 0.01 * 4e-4
    (neuron,) = report["neurons"]
    assert neuron["neuron"] == "h0:0" and neuron["selectivity"] == pytest.approx(4.0)
    assert neuron["context_selectivity"] == pytest.approx((4e-4 + floor) / (1e-4 + floor))
    assert report["median_context_selectivity"] == pytest.approx(
        ((4e-4 + floor) / (1e-4 + floor) + (4e-4 + floor) / (2e-4 + floor)) / 2
    )


def test_the_sample_is_windows_evenly_spaced_from_the_split_to_the_last_whole_window(tmp_path):
    (tmp_path / "text.txt").write_bytes(TEXT)
    corpus = read_corpus(str(tmp_path / "text.txt"))
    sample = CorpusSample(corpus, block_size=8, windows=5, val_fraction=0.5)
    # From byte 31 to the last window of 9 bytes (53..61), rounded half to even: 36.5 -> 36, 47.5 -> 48.
    assert sample.split_start == 31 and sample.offsets.tolist() == [31, 36, 42, 48, 53]
    assert sample.offsets.dtype == np.int64
    late = CorpusSample(corpus, block_size=8, windows=3, val_fraction=0.05)  # the split starts inside the last window
    assert late.split_start == 53 and late.offsets.tolist() == [53]
    whole = CorpusSample(corpus, block_size=61, windows=2, val_fraction=1.0)  # one window of 62 bytes: all of it
    assert whole.offsets.tolist() == [0]


def test_a_corpus_shorter_than_one_window_is_one_line(tmp_path):
    (tmp_path / "text.txt").write_bytes(TEXT)
    with pytest.raises(DataError) as error:
        CorpusSample(read_corpus(str(tmp_path / "text.txt")), block_size=62, windows=2, val_fraction=0.5)
    assert str(error.value) == (
        "the corpus has 62 bytes, fewer than one window of data.block_size + 1 = 63; use a smaller "
        "--data.block_size or more data"
    )


def test_a_pass_reads_at_least_one_window_however_wide_the_model():
    wide = SimpleNamespace(config=SimpleNamespace(n_head=64, neurons_per_head=1 << 20))
    assert windows_per_batch(wide, 256) == 1
    tiny = SimpleNamespace(config=SimpleNamespace(n_head=2, neurons_per_head=128))
    assert windows_per_batch(tiny, 32) == ELEMENT_BUDGET // (32 * 2 * 128)


@pytest.fixture
def report_pieces(tmp_path, monkeypatch):
    """A tiny model and a 6-window sample, the report read in batches of 2 windows (3 batches), and one
    activation pass over all 6 windows at once to check it against."""
    from bdh_lightning.insight import activations
    from bdh_lightning.model import BDH, BDHConfig

    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)).eval()
    (tmp_path / "text.txt").write_bytes(
        bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1)).tolist())
    )
    sample = CorpusSample(read_corpus(str(tmp_path / "text.txt")), block_size=16, windows=6, val_fraction=1.0)
    (offsets, idx, targets), *rest = list(sample.batches(100))
    assert rest == [] and len(offsets) == 6
    with torch.no_grad():
        whole = activations.activation_pass(model, idx, targets, signal="ab")
    monkeypatch.setattr(activations, "loss_correlation", partial(activations.loss_correlation, draws=20))
    monkeypatch.setattr(activations, "windows_per_batch", lambda model, block_size: 2)
    neurons = NeuronOptions(top=4, contexts=2, width=4)
    with torch.no_grad():
        report = activations.sparsity_report(model, sample, neurons)
    return SimpleNamespace(model=model, sample=sample, idx=idx, whole=whole, report=report, neurons=neurons)


def test_the_batches_cover_every_window_once_with_its_next_bytes(report_pieces):
    sample = report_pieces.sample
    batches = list(sample.batches(4))
    assert [len(offsets) for offsets, _, _ in batches] == [4, 2]
    corpus = np.frombuffer(sample.corpus.read(0, len(sample.corpus)).tobytes(), dtype=np.uint8)
    for offsets, idx, targets in batches:
        assert idx.shape == targets.shape == (len(offsets), 16)
        for row, offset in enumerate(offsets):
            assert idx[row].tolist() == corpus[offset : offset + 16].tolist()
            assert targets[row].tolist() == corpus[offset + 1 : offset + 17].tolist()


def test_a_report_read_in_batches_counts_as_one_pass_over_all_windows(report_pieces):
    """Rates, positions, per-position active fractions and each selective neuron's mean and firing count are those
    of one pass over the 6 windows, though the report read them 2 at a time."""
    r, whole, model = report_pieces.report, report_pieces.whole, report_pieces.model
    c = model.config
    H, N, L = c.n_head, c.neurons_per_head, c.n_layer
    assert r["positions"] == 6 * 16
    rates = whole.fires.double() / (96 * L)
    assert r["neurons"] == {kind: {"dead": int((rates[i] == 0).sum()), "always_on": int((rates[i] >= 0.99).sum()),
                                   "median_rate": float(rates[i].median())} for i, kind in enumerate(("a", "b", "ab"))}  # fmt: skip
    share = whole.counts.double()  # (L, H, 3) non-zero entries
    assert r["active"] == pytest.approx(dict(zip("a b ab".split(), (share.sum((0, 1)) / (96 * H * N * L)).tolist())))
    assert r["per_layer"] == [
        pytest.approx(dict(zip("a b ab".split(), row))) for row in (share.sum(1) / (96 * H * N)).tolist()
    ]
    assert r["per_layer_head"][1][0] == pytest.approx(dict(zip("a b ab".split(), (share[1, 0] / (96 * N)).tolist())))
    np.testing.assert_array_equal(r["_rates"], (whole.fires.double() / (6 * 16 * L)).numpy())
    expected_active = (whole.position_active[:, :, 1:].double() / (L * H * N)).flatten(1).numpy()
    np.testing.assert_allclose(r["_active"], expected_active, rtol=0, atol=1e-12)  # (3, windows x positions 1..)
    np.testing.assert_allclose(r["_loss"], whole.loss[:, 1:].flatten().numpy())
    pooled = whole.pooled.reshape(-1, H * N)
    fires, means = (pooled > 0).sum(0), pooled.mean(0)
    selective = r["selective"]
    assert selective["eligible"] == int(((fires >= 4) & (means > 0)).sum()) and selective["neurons"]
    for neuron in selective["neurons"]:
        h, n = (int(part) for part in neuron["neuron"][1:].split(":"))
        assert neuron["fires"] == int(fires[h * N + n]) and neuron["mean"] == pytest.approx(float(means[h * N + n]))


def test_an_eligible_neuron_weaker_on_text_than_on_shuffled_text_still_outranks_ineligible_ones():
    """Context selectivity below 1 (neuron 0 is stronger on shuffled bytes): with top 1 it is still the one shown,
    not an ineligible neuron (those score 0)."""
    report = planted(nonzero=[8, 0, 0, 1], mean=[0.5, 0.0, 0.0, 0.1], strongest=[1.0, 0.0, 0.0, 3.0],
                     shuffled=[2.0, 0.0, 0.0, 0.0], top=1)  # fmt: skip
    assert [n["neuron"] for n in report["neurons"]] == ["h0:0"] and report["neurons"][0]["context_selectivity"] < 1


def bootstrap_oracle(active, loss, draws, seed):
    """The documented procedure, with scipy's spearmanr as the correlation: windows resampled with replacement
    (numpy's default_rng(seed).integers(0, windows)), p = twice the share of draws on the far side of 0 counted as
    (k + 1) / (draws + 1), at most 1; the 95% interval from the draws' quantiles."""
    from scipy.stats import spearmanr

    picks = np.random.default_rng(seed).integers(0, loss.shape[0], size=(draws, loss.shape[0]))
    result = {}
    for kind, fraction in zip(("a", "b", "ab"), active):
        boot = np.array([spearmanr(fraction[pick].ravel(), loss[pick].ravel()).statistic for pick in picks])
        tail = min((boot <= 0).sum(), (boot >= 0).sum())
        result[kind] = (min(1.0, 2 * (tail + 1) / (draws + 1)), [np.quantile(boot, 0.025), np.quantile(boot, 0.975)])
    return result


def test_the_window_bootstrap_is_the_documented_procedure():
    gen = torch.Generator().manual_seed(2)
    active, loss = (
        torch.rand(3, 6, 5, generator=gen, dtype=torch.float64),
        torch.rand(6, 5, generator=gen, dtype=torch.float64),
    )
    active[0] = loss + 0.1 * active[0]  # one kind correlated with the loss, the others not
    result = loss_correlation(active, loss, draws=200, seed=7)
    expected = bootstrap_oracle(active.numpy(), loss.numpy(), 200, 7)
    for kind in ("a", "b", "ab"):
        got = result["active_vs_loss"][kind]
        assert got["p"] == pytest.approx(expected[kind][0]) and got["ci95"] == pytest.approx(expected[kind][1]), kind
        assert got["windows"] == 6 and got["spearman"] == pytest.approx(
            float(spearmanr(active[("a", "b", "ab").index(kind)].ravel(), loss.ravel()).statistic)
        )
    assert 0 < result["active_vs_loss"]["b"]["p"] < 1 and result["active_vs_loss"]["a"]["p"] < 0.05
    assert result["loss"] == pytest.approx(float(loss.mean()))
    assert result["_active"].shape == (3, 30) and np.array_equal(result["_loss"], loss.flatten().numpy())
    again = loss_correlation(active, loss, draws=200, seed=7)  # the same draws each time
    assert again["active_vs_loss"] == result["active_vs_loss"]


def test_draws_exactly_at_zero_count_on_both_sides():
    """Every window the same pattern of Spearman 0 (ranks 1 2 3 4 against 2 4 1 3): every draw is exactly 0, so p = 1."""
    fraction = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).repeat(3, 5, 1)
    loss = torch.tensor([2.0, 4.0, 1.0, 3.0], dtype=torch.float64).repeat(5, 1)
    for kind in loss_correlation(fraction, loss, draws=40)["active_vs_loss"].values():
        assert kind["spearman"] == 0.0 and kind["p"] == 1.0 and kind["ci95"] == [0.0, 0.0]


def test_one_window_has_no_bootstrap_p_and_a_constant_fraction_no_correlation():
    gen = torch.Generator().manual_seed(3)
    active, loss = (
        torch.rand(3, 1, 8, generator=gen, dtype=torch.float64),
        torch.rand(1, 8, generator=gen, dtype=torch.float64),
    )
    one = loss_correlation(active, loss, draws=30)["active_vs_loss"]["a"]
    assert one["p"] is None and one["spearman"] is not None and one["windows"] == 1
    two = loss_correlation(
        torch.rand(3, 2, 8, generator=gen, dtype=torch.float64),
        torch.rand(2, 8, generator=gen, dtype=torch.float64),
        draws=30,
    )
    assert two["active_vs_loss"]["a"]["p"] is not None  # two windows are enough to resample
    flat = loss_correlation(
        torch.full((3, 4, 8), 0.25, dtype=torch.float64), torch.rand(4, 8, generator=gen, dtype=torch.float64), draws=30
    )
    for kind in flat["active_vs_loss"].values():  # a constant has no rank correlation: nothing to report
        assert kind["spearman"] is None and kind["p_independent"] is None and kind["p"] is None and kind["ci95"] is None


def test_spearman_of_two_points_and_of_a_constant():
    assert spearman(np.array([1.0, 2.0]), np.array([3.0, 5.0])) == 1.0
    assert spearman(np.array([1.0, 2.0]), np.array([5.0, 3.0])) == -1.0
    assert math.isnan(spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))
