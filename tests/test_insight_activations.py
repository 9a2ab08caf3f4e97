"""insight/activations.py's helpers with planted values: the contexts shown around a position, the k largest values
kept over batches, the shuffled-window control, the strongest contexts and the selective-neuron report's fields
(test_insight_planted.py checks the measures themselves against planted models)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bdh_lightning.data.corpus import read_corpus
from bdh_lightning.errors import DataError
from bdh_lightning.insight.activations import (
    ELEMENT_BUDGET,
    CorpusSample,
    TopValues,
    selective_neurons,
    show_bytes,
    shuffled_windows,
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
    assert report["selectivity_ceiling"] == 4 * 25 / 2


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
