"""`inspect`'s statistics against planted truths, each test named for the mistake it catches: a two-head graph
with asymmetric and cross-head edges (head slicing, a transposed G, the encoder_v path), tails of known
shape (power law, exponential), a probe on neurons of known effect with false positives counted on nulls,
a correlation of known sign and one whose windows share a cluster effect, and context selectivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdh_lightning.insight import GraphOptions, NeuronOptions
from bdh_lightning.insight.activations import TopValues, loss_correlation, selective_neurons, spearman
from bdh_lightning.insight.graph import (
    degrees,
    fit_power_law,
    graph_report,
    head_graph,
    thresholded_edges,
    whole_graph_report,
)
from bdh_lightning.insight.probes import benjamini_hochberg, holm, permutation_null, probe_report
from bdh_lightning.model import BDH, BDHConfig

H, N, D = 2, 32, 32  # two heads of 32 neurons, a 32-wide residual stream


def neuron(head: int, n: int) -> int:
    return head * N + n


# Planted edges (global neuron index -> global neuron index, weight); each group written through its own
# residual dimension, so G = decoder @ encoder holds exactly these entries (plus a 1e-6 noise floor).
HUB = [(neuron(0, 5), neuron(0, j), 1.0) for j in range(10, 20)]  # h0:5 drives ten neurons of head 0
CHAIN = [(neuron(1, i), neuron(1, i + 7), 1.0) for i in range(8)]  # head 1: i -> i + 7, never back
CROSS = [(neuron(0, 20), neuron(1, 3), 2.0), (neuron(1, 30), neuron(0, 0), 1.5)]  # across heads, strongest
VALUE_EDGE = (neuron(0, 1), neuron(1, 2), 3.0)  # only on the encoder_v path


def planted_graph_model() -> BDH:
    config = BDHConfig(n_layer=1, n_embd=D, n_head=H, mlp_internal_dim_multiplier=N * H // D, dropout=0.0)
    model = BDH(config)
    gen = torch.Generator().manual_seed(0)
    decoder = 1e-3 * torch.rand(H * N, D, generator=gen)
    encoder = 1e-3 * torch.rand(D, H * N, generator=gen)  # columns: head-major, as the model's H x D x N
    encoder_v = 1e-3 * torch.rand(D, H * N, generator=gen)
    dim = 0
    decoder[HUB[0][0], dim] = 1.0
    for _, j, _ in HUB:
        encoder[dim, j] = 1.0
    for i, j, w in CHAIN + CROSS:
        dim += 1
        decoder[i, dim], encoder[dim, j] = w, 1.0
    dim += 1
    i, j, w = VALUE_EDGE
    decoder[i, dim], encoder_v[dim, j] = w, 1.0
    with torch.no_grad():
        model.decoder.copy_(decoder)
        model.encoder.copy_(encoder.reshape(D, H, N).permute(1, 0, 2))
        model.encoder_v.copy_(encoder_v.reshape(D, H, N).permute(1, 0, 2))
    return model.eval()


def local(edges, head: int) -> set[tuple[int, int]]:
    return {(i - head * N, j - head * N) for i, j, _ in edges if i // N == head and j // N == head}


def test_head_graph_reads_head_h_rows_in_blocks_not_decoder_h_strided():
    """Catches decoder[h::H]: head h's G is rows h*N .. (h+1)*N - 1 of the decoder."""
    model = planted_graph_model()
    for head, planted in ((0, local(HUB, 0)), (1, local(CHAIN, 1))):
        src, dst, _ = thresholded_edges(*head_graph(model, head), edges=len(planted))
        assert set(zip(src.tolist(), dst.tolist())) == planted


def test_out_and_in_degree_not_swapped_by_a_transposed_graph():
    """Catches G = encoder.T @ decoder.T (or src/dst swapped): h0:5 sends ten edges and receives none."""
    model = planted_graph_model()
    report = graph_report(model, GraphOptions(hubs=1, seeds=1), edges_per_head=[len(HUB), len(CHAIN)])
    assert report["out_degree"]["hubs"] == [{"neuron": "h0:5", "degree": 10}]
    assert report["out_degree"]["max"] == 10 and report["in_degree"]["max"] == 1
    src, dst, _ = thresholded_edges(*head_graph(model, 0), edges=len(HUB))
    d_in, d_out = degrees(src, dst, N)
    assert d_out[5] == 10 and d_in[5] == 0 and d_in[10:20].tolist() == [1] * 10


def test_whole_graph_finds_cross_head_edges_per_head_view_cannot():
    model = planted_graph_model()
    planted = HUB + CHAIN + CROSS
    whole = whole_graph_report(model, GraphOptions(seeds=1), edges=len(planted), null=False)
    src, dst = whole["_edges"]
    assert set(zip(src.tolist(), dst.tolist())) == {(i, j) for i, j, _ in planted}
    assert whole["cross_head_share"] == pytest.approx(len(CROSS) / len(planted))
    assert whole["cross_head_max"] == pytest.approx(2.0, abs=1e-4)  # beats every within-head entry
    assert whole["within_head_max"] == pytest.approx(1.0, abs=1e-4)
    order = whole["_order"]
    assert sorted(order.tolist()) == list(range(H * N))  # the heatmap's order is a permutation


def test_encoder_v_path_is_its_own_graph():
    model = planted_graph_model()
    value = whole_graph_report(model, GraphOptions(seeds=1), path="encoder_v", edges=1, null=False)
    src, dst = value["_edges"]
    assert (int(src[0]), int(dst[0])) == VALUE_EDGE[:2]


def test_tail_verdicts_power_law_versus_exponential():
    rng = np.random.default_rng(0)
    heavy = fit_power_law(np.minimum(rng.zipf(2.5, size=20000), 19999))
    assert abs(heavy["alpha"] - 2.5) < 0.2 and heavy["vs_exponential"]["lr"] > 0
    assert heavy["vs_exponential"]["p"] < 0.01 and heavy["verdict"] in (
        "power-law tail",
        "heavy tail (power law or lognormal)",
    )
    for light in (rng.geometric(0.1, size=20000), rng.poisson(5, size=20000)):  # exponential-like tails
        fit = fit_power_law(light)
        assert fit["vs_exponential"]["lr"] < 0 and fit["vs_exponential"]["p"] < 0.01
        assert fit["verdict"].startswith("no heavy tail"), fit
    lognormal = fit_power_law(np.random.default_rng(5).lognormal(1, 1, size=5000).astype(int) + 1)
    assert lognormal["vs_lognormal"]["lr"] < 0 and "power-law tail" not in lognormal["verdict"]


def test_loss_correlation_sign_is_spearmans_not_flipped():
    """Catches a flipped sign: active fraction that rises with the loss gives rho > 0, as scipy's."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    loss = rng.random((20, 50))
    active = np.stack([loss + 0.3 * rng.random((20, 50)), -loss, rng.random((20, 50))])
    result = loss_correlation(torch.from_numpy(active), torch.from_numpy(loss), draws=300)
    expected = spearmanr(active[0].ravel(), loss.ravel()).statistic
    assert result["active_vs_loss"]["a"]["spearman"] == pytest.approx(expected, abs=1e-12) and expected > 0.5
    assert result["active_vs_loss"]["b"]["spearman"] == pytest.approx(-1.0)
    assert result["active_vs_loss"]["a"]["p"] < 0.01 and result["active_vs_loss"]["b"]["p"] < 0.01
    assert spearman(active[0].ravel(), loss.ravel()) == pytest.approx(expected, abs=1e-12)


def test_window_bootstrap_p_is_not_fooled_by_a_shared_window_effect():
    """Active fraction and loss each carry a per-window offset, independent of each other: no true
    correlation. Positions treated as independent call it significant nearly always; the window
    bootstrap rarely (counted over 30 such draws)."""
    independent, bootstrap = 0, 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        loss = rng.normal(size=(6, 1)) + 0.1 * rng.random((6, 80))
        active = rng.normal(size=(6, 1)) + 0.1 * rng.random((6, 80))
        result = loss_correlation(torch.from_numpy(np.stack([active] * 3)), torch.from_numpy(loss), draws=200)
        independent += result["active_vs_loss"]["a"]["p_independent"] < 0.05
        bootstrap += result["active_vs_loss"]["a"]["p"] < 0.05
    assert independent >= 20 and bootstrap <= 9, (independent, bootstrap)


def test_multiple_comparison_corrections_match_their_definitions():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # Holm: sorted p times (m - rank), running maximum, capped at 1.
    assert holm(p).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    # Benjamini-Hochberg: sorted p times m / rank, running minimum from the top.
    assert benjamini_hochberg(p).tolist() == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])


def planted_probe(monkeypatch, shift: float, neurons: int = 200, sentences: int = 30, seed: int = 0):
    """probe_report on per-sentence values drawn here: neuron 7 of head 1 is `shift` standard deviations
    higher on the concept sentences; every other neuron is the same on both."""
    import bdh_lightning.insight.probes as probes

    rng = np.random.default_rng(seed)
    values = {"concept": rng.normal(size=(sentences, neurons)), "control": rng.normal(size=(sentences, neurons))}
    values["concept"][:, neurons // 2 + 7] += shift
    monkeypatch.setattr(probes, "sentence_values", lambda model, s, signal: torch.from_numpy(values[s[0]]))
    model = BDH(BDHConfig(n_layer=1, n_embd=10, n_head=2, mlp_internal_dim_multiplier=20, dropout=0.0))
    return probe_report(model, ["concept"], ["control"], "ab", top=3, permutations=400)


def test_probe_finds_a_neuron_of_known_effect_and_names_the_concept_side(monkeypatch):
    report = planted_probe(monkeypatch, shift=2.0)
    best = report["neurons"][0]
    assert best["neuron"] == "h1:7" and best["index"] == 107 and best["concept_mean"] > best["control_mean"]
    assert best["rank_biserial"] > 0.7 and best["p_holm"] < 0.01 and best["p_permutation"] < 0.01
    assert best["p_holm"] == pytest.approx(min(1.0, best["p"] * 200))  # the smallest p: Holm = Bonferroni
    assert report["significant"]["holm"] == 1 and report["tested"] == 200


def test_probe_false_positives_on_nulls_are_held_at_the_level(monkeypatch):
    """No neuron differs: raw p finds about 5% of 200 neurons; Holm, BH and the permutation test find a
    neuron in at most 3 of 20 null draws (nominal 1 in 20)."""
    raw, corrected = [], 0
    for seed in range(20):
        report = planted_probe(monkeypatch, shift=0.0, seed=seed)
        raw.append(report["significant"]["raw"])
        significant = report["significant"]
        corrected += max(significant["holm"], significant["bh"], significant["permutation"]) > 0
    assert 4 <= np.mean(raw) <= 16 and corrected <= 3, (raw, corrected)


def test_permutation_null_is_the_largest_centred_u_over_neurons():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    null = permutation_null(x, y, draws=50, seed=0)
    assert null.shape == (50,) and (null <= 6 * 5 / 2).all()
    observed = np.abs(mannwhitneyu(x, y, axis=0).statistic - 15).max()
    # Relabelling with the true labels is one of the possible draws: the null reaches the observed value's scale.
    assert null.max() >= 0 and observed <= 15


def test_context_selectivity_divides_by_the_shuffled_strength():
    """Catches selectivity without its division: neuron 0 is strong everywhere (10 on text and on shuffled
    text), neuron 1 weaker but four times stronger on text than on shuffled text: neuron 1 ranks first."""

    class Sample:
        offsets, block_size = np.arange(4), 25

        def context(self, offset, width):
            return {"before": "", "byte": "x", "after": ""}

    top = TopValues(2, 2)
    top.add(torch.tensor([[10.0, 4.0], [10.0, 4.0], [0.0, 0.0]]), torch.tensor([0, 1, 2]))
    shuffled = torch.tensor([[10.0, 1.0], [10.0, 1.0]])
    mean, nonzero = torch.tensor([5.0, 1.0]), torch.tensor([50, 50])
    options = NeuronOptions(top=2, contexts=2)
    report = selective_neurons(mean, nonzero, top, shuffled, Sample(), options, N=1)
    assert [n["neuron"] for n in report["neurons"]] == ["h1:0", "h0:0"]
    floor = 0.01 * 7  # 1% of the median strongest value (10 and 4): a silent shuffled neuron is not infinite
    expected = [(4 + floor) / (1 + floor), 1.0]
    assert [n["context_selectivity"] for n in report["neurons"]] == pytest.approx(expected)
    assert [n["selectivity"] for n in report["neurons"]] == [4.0, 2.0]  # top-k mean / mean, for comparison
    assert report["median_context_selectivity"] == pytest.approx(sum(expected) / 2)
    assert report["selectivity_ceiling"] == 50
    assert math.isclose(report["share_above_2"], 0.5)


def test_insight_imports_its_extra_only_inside_the_functions_that_use_it():
    """matplotlib, networkx and scipy are the [insight] extra: no module of the package imports them at load."""
    import ast
    from pathlib import Path

    import bdh_lightning.insight as insight

    for path in Path(insight.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & {"matplotlib", "networkx", "scipy"}, (path.name, names)


def test_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, capsys, tmp_path):
    import sys

    from bdh_lightning.errors import BDHError
    from bdh_lightning.insight import InsightMonitor
    from bdh_lightning.main import main

    monkeypatch.setitem(sys.modules, "networkx", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--ckpt_path", "nowhere.ckpt"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: inspect needs networkx: pip install 'bdh-lightning[insight]'"]
    with pytest.raises(BDHError, match=r"inspect.every_n_validations needs networkx: pip install"):
        InsightMonitor(every_n_validations=1)
    InsightMonitor(every_n_validations=0)  # off: nothing needed


@torch.no_grad()
def test_sentence_synapses_are_the_attention_state_of_the_spec_layer():
    """sigma[h, n, d] = sum over positions of a[n] x[d] / T, averaged over layers: recomputed head by head with
    the spec oracle's layer; head-major flattening (h, n, d)."""
    from spec_oracle import oracle_layer, oracle_layer_norm

    from bdh_lightning.insight.activations import sentence_synapses

    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0)).eval()
    text = b"a sentence of bytes"
    x = oracle_layer_norm(model.embed.weight[torch.tensor(list(text))])[None]
    expected = 0
    for _ in range(2):
        expected = expected + torch.stack([torch.relu(x[0] @ model.encoder[h]).T @ x[0] for h in range(2)])
        x = oracle_layer(x, model.encoder, model.encoder_v, model.decoder)
    got = sentence_synapses(model, [text])[0]
    assert torch.allclose(got, (expected / (2 * len(text))).flatten(), atol=1e-5)


def test_synapse_probe_names_the_planted_synapse(monkeypatch):
    import bdh_lightning.insight.probes as probes

    model = BDH(BDHConfig(n_layer=1, n_embd=8, n_head=2, mlp_internal_dim_multiplier=2, dropout=0.0))
    H, N, D = 2, 8, 8
    rng = np.random.default_rng(0)
    values = {"concept": rng.normal(size=(25, H * N * D)), "control": rng.normal(size=(25, H * N * D))}
    values["concept"][:, (1 * N + 3) * D + 5] += 3.0  # head 1, neuron 3, residual dimension 5
    monkeypatch.setattr(probes, "sentence_synapses", lambda model, s: torch.from_numpy(values[s[0]]))
    report = probes.synapse_report(model, ["concept"], ["control"], top=2, permutations=200)
    assert report["synapses"][0]["synapse"] == "h1:3~x5" and report["synapses"][0]["p_holm"] < 0.01
    assert report["tested"] == H * N * D and report["significant"]["holm"] == 1


def test_probe_report_every_field_against_scipy(monkeypatch):
    """Unequal group sizes, a constant (all-tied) neuron, a neuron lower on the concept side: each field of the
    report equals scipy's Mann-Whitney U and p, the corrections, and a permutation p recomputed here."""
    from scipy.stats import mannwhitneyu

    import bdh_lightning.insight.probes as probes

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(9, 6)), rng.normal(size=(13, 6))
    x[:, 2] += 2.5
    x[:, 4] -= 2.5
    x[:, 5], y[:, 5] = 1.0, 1.0  # all tied: U = n1 n2 / 2, p = 1
    values = {"concept": x, "control": y}
    monkeypatch.setattr(probes, "sentence_values", lambda model, s, signal: torch.from_numpy(values[s[0]]))
    model = BDH(BDHConfig(n_layer=1, n_embd=6, n_head=3, mlp_internal_dim_multiplier=1, dropout=0.0))  # N = 2
    report = probe_report(model, ["concept"], ["control"], "b", top=6, permutations=150)
    U, p = mannwhitneyu(x, y, alternative="two-sided", axis=0)
    p = np.nan_to_num(p, nan=1.0)
    null = permutation_null(x, y, 150)
    assert report["signal"] == "b" and report["permutations"] == 150 and report["tested"] == 6
    assert (report["concept_sentences"], report["control_sentences"], report["pairs"]) == (9, 13, 117)
    by_index = {n["index"]: n for n in report["neurons"]}
    assert [n["index"] for n in report["neurons"]][:1] == [2] and len(by_index) == 6
    for i, n in by_index.items():
        assert n["neuron"] == f"h{i // 2}:{i % 2}" and n["U"] == U[i] and n["p"] == pytest.approx(p[i])
        assert n["p_bh"] == pytest.approx(benjamini_hochberg(p)[i]) and n["p_holm"] == pytest.approx(holm(p)[i])
        assert n["p_permutation"] == (1 + (null >= abs(U[i] - 58.5) - 1e-9).sum()) / 151
        assert n["rank_biserial"] == pytest.approx(2 * U[i] / 117 - 1)
        assert n["concept_mean"] == pytest.approx(x[:, i].mean()) and n["control_mean"] == pytest.approx(y[:, i].mean())
    assert by_index[5]["U"] == 58.5 and by_index[5]["p"] == 1.0
    assert by_index[4]["U"] < 10  # lower on the concept side: a small U, last but for ties
    assert report["best_p_holm"] == pytest.approx(holm(p).min())
    assert report["best_p_permutation"] == min(n["p_permutation"] for n in report["neurons"])
    significant = report["significant"]
    assert significant == {"raw": int((p < 0.05).sum()), "bh": int((benjamini_hochberg(p) < 0.05).sum()),
                           "holm": int((holm(p) < 0.05).sum()),
                           "permutation": sum(n["p_permutation"] < 0.05 for n in report["neurons"])}  # fmt: skip
    none = probe_report(model, ["concept"], ["control"], "ab", top=2)  # no permutations by default
    assert none["significant"]["permutation"] is None and none["neurons"][0]["p_permutation"] is None
    assert none["best_p_permutation"] is None and none["permutations"] == 0 and len(none["neurons"]) == 2


def test_permutation_null_is_the_largest_u_of_each_relabelling():
    """Recomputed draw by draw with scipy, over two chunks (150 draws, 100 per chunk) and unequal groups."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(8, 3))
    null = permutation_null(x, y, draws=150, seed=2)
    pooled = np.concatenate([x, y])
    draws = np.random.default_rng(2)
    expected = []
    for size in (100, 50):
        for row in np.argsort(draws.random((size, 13)), axis=1)[:, :5]:
            rest = np.setdiff1d(np.arange(13), row)
            U = mannwhitneyu(pooled[row], pooled[rest], axis=0).statistic
            expected.append(np.abs(U - 20).max())
    assert null == pytest.approx(np.array(expected))
    assert permutation_null(x, y, draws=0).shape == (0,)


def test_corrections_are_capped_at_one():
    p = np.array([0.3, 0.6, 0.9])
    assert holm(p).tolist() == pytest.approx([0.9, 1.0, 1.0]) and holm(p)[1:].tolist() == [1.0, 1.0]
    assert benjamini_hochberg(np.array([0.5, 0.9, 0.95])).tolist() == pytest.approx([0.95, 0.95, 0.95])
    assert benjamini_hochberg(np.array([0.6, 0.7])).tolist() == [0.7, 0.7]
    assert benjamini_hochberg(np.array([0.9, 0.99])).max() <= 1.0 and holm(np.array([0.9, 0.99])).max() == 1.0


def test_read_sentences_keeps_non_empty_lines_cut_to_1024_bytes(tmp_path):
    from bdh_lightning.errors import DataError, UsageError
    from bdh_lightning.insight.probes import read_sentences

    path = tmp_path / "s.txt"
    path.write_bytes(b"  first line \n\n   \n" + b"x" * 2000 + b"\nlast")
    assert read_sentences(str(path), "probe.concept") == [b"first line", b"x" * 1024, b"last"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"^probe.control .*blank.txt holds no sentences; write one sentence per line$"):
        read_sentences(str(tmp_path / "blank.txt"), "probe.control")
    with pytest.raises(UsageError, match=r"^probe.concept .*nowhere.txt: cannot read it \(.*\); give a text file"):
        read_sentences(str(tmp_path / "nowhere.txt"), "probe.concept")


def test_synapse_report_fields_and_its_size_limit(monkeypatch):
    import bdh_lightning.insight.probes as probes

    model = BDH(BDHConfig(n_layer=1, n_embd=4, n_head=2, mlp_internal_dim_multiplier=1, dropout=0.0))  # N = 2
    rng = np.random.default_rng(1)
    values = {"concept": rng.normal(size=(7, 16)), "control": rng.normal(size=(6, 16))}
    monkeypatch.setattr(probes, "sentence_synapses", lambda model, s: torch.from_numpy(values[s[0]]))
    report = probes.synapse_report(model, ["concept"], ["control"], top=16, permutations=20)
    names = sorted(n["synapse"] for n in report["synapses"])
    assert names == sorted(f"h{h}:{n}~x{d}" for h in range(2) for n in range(2) for d in range(4))
    assert all(
        n["synapse"] == f"h{n['index'] // 8}:{n['index'] // 4 % 2}~x{n['index'] % 4}" for n in report["synapses"]
    )
    assert report["tested"] == 16 and report["pairs"] == 42 and report["permutations"] == 20
    monkeypatch.setattr(probes, "SYNAPSE_BUDGET", 15)
    assert probes.synapse_report(model, ["concept"], ["control"], top=2) == {
        "skipped": "16 synapses per sentence, more than the 15 handled"
    }
    monkeypatch.setattr(probes, "SYNAPSE_BUDGET", 16)
    assert "synapses" in probes.synapse_report(model, ["concept"], ["control"], top=2)


def test_probe_ties_in_u_are_ordered_by_the_larger_mean_difference(monkeypatch):
    """Three neurons separate the groups perfectly (U = 12 each); the one with the largest concept-minus-control
    gap comes first, whatever the control means' scale."""
    import bdh_lightning.insight.probes as probes

    x = np.array([[3.0, 10.0, 6.0, 0.0]] * 4) + np.arange(4)[:, None] * 0.01
    y = np.array([[1.0, 9.5, 1.5, 0.0]] * 3) + np.arange(3)[:, None] * 0.01  # gaps 2, 0.5, 4.5
    values = {"concept": x, "control": y}
    monkeypatch.setattr(probes, "sentence_values", lambda model, s, signal: torch.from_numpy(values[s[0]]))
    model = BDH(BDHConfig(n_layer=1, n_embd=4, n_head=2, mlp_internal_dim_multiplier=1, dropout=0.0))  # N = 2
    report = probe_report(model, ["concept"], ["control"], "ab", top=3)
    assert [n["index"] for n in report["neurons"]] == [2, 0, 1] and {n["U"] for n in report["neurons"]} == {12.0}
    assert report["correction"] == "Benjamini-Hochberg (p_bh) and Holm (p_holm) over all tested"


@torch.no_grad()
def test_synapse_report_on_a_model_reads_its_synapses():
    from bdh_lightning.insight.activations import sentence_synapses
    from bdh_lightning.insight.probes import synapse_report

    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=1, n_embd=4, n_head=2, mlp_internal_dim_multiplier=1, dropout=0.0)).eval()
    concept, control = [b"king", b"kingdom", b"kings"], [b"dog", b"cat", b"cow", b"ant"]
    report = synapse_report(model, concept, control, top=2)
    best = report["synapses"][0]
    assert len(report["synapses"]) == 2 and report["permutations"] == 0 and best["p_permutation"] is None
    x = sentence_synapses(model, concept)[:, best["index"]]
    assert best["concept_mean"] == pytest.approx(float(x.mean()))


def test_read_sentences_names_the_reason_it_cannot_read(tmp_path):
    from bdh_lightning.errors import UsageError
    from bdh_lightning.insight.probes import read_sentences

    with pytest.raises(UsageError, match=r"nowhere.txt: cannot read it \(No such file or directory\); give"):
        read_sentences(str(tmp_path / "nowhere.txt"), "probe.concept")


def test_permutation_p_counts_relabellings_as_extreme_as_the_labels(monkeypatch):
    """Two against two sentences, one neuron separating them: of the 6 relabellings, 2 are as extreme as the true
    one (itself and its mirror), so ties with the observed |U| count; with 19 shuffles and none as extreme the
    p-value is exactly 1/20 = 0.05, not significant (p < 0.05 is)."""
    import bdh_lightning.insight.probes as probes

    x, y = np.array([[5.0, 1.0], [6.0, 2.0]]), np.array([[1.0, 1.5], [2.0, 2.5]])
    null = probes.permutation_null(x, y, 60)
    assert set(null.tolist()) <= {0.0, 1.0, 2.0} and (null == 2.0).sum() > 5
    result = probes.ranking(x, y, 2, 60, str)
    assert result["ranked"][0]["p_permutation"] == (1 + (null == 2.0).sum()) / 61
    monkeypatch.setattr(probes, "permutation_null", lambda x, y, draws: np.zeros(draws))
    result = probes.ranking(x, y, 2, 19, str)
    assert result["ranked"][0]["p_permutation"] == 0.05 and result["significant"]["permutation"] == 0


def test_graph_report_every_field_on_the_planted_model():
    from bdh_lightning.insight.graph import degree_matched_null, louvain_modularity

    model = planted_graph_model()
    options = GraphOptions(hubs=3, seeds=2, seed=4)
    report = graph_report(model, options, edges_per_head=[len(HUB), len(CHAIN)])
    for head, planted in ((0, HUB), (1, CHAIN)):
        src, dst, threshold = thresholded_edges(*head_graph(model, head), edges=len(planted))
        runs = [louvain_modularity(src, dst, N, seed) for seed in (4, 5)]
        nulls = [louvain_modularity(*degree_matched_null(src, dst, seed), N, seed)[0] for seed in (4, 5)]
        sizes = sorted((len(c) for c in runs[0][1]), reverse=True)
        h = report["heads"][head]
        assert (h["head"], h["edges"], h["threshold"]) == (head, len(planted), threshold) and 0.99 < threshold < 1.01
        assert h["seeds"] == [m for m, _ in runs] and h["modularity"] == pytest.approx(np.mean(h["seeds"]))
        assert h["modularity_sd"] == pytest.approx(np.std(h["seeds"]))
        assert h["null_draws"] == nulls and h["null_modularity"] == pytest.approx(np.mean(nulls))
        assert h["null_modularity_sd"] == pytest.approx(np.std(nulls))
        assert h["community_sizes"] == sizes and h["communities"] == sum(s >= 2 for s in sizes)
        assert h["isolated"] == N - len(set(src.tolist()) | set(dst.tolist()))
    assert report["heads"][0]["isolated"] == N - 11 and report["heads"][1]["isolated"] == N - 15
    assert report["edges"] == 18 and report["mean_degree"] == 18 / (H * N)
    heads = report["heads"]
    for key in ("modularity", "modularity_sd", "null_modularity", "null_modularity_sd"):
        assert report[key] == pytest.approx(np.mean([h[key] for h in heads]))
    assert report["in_degree"]["max"] == 1 and report["in_degree"]["fit"] is None  # under 50 neurons with edges
    assert [x["neuron"] for x in report["out_degree"]["hubs"]] == ["h0:5", "h1:0", "h1:1"]
    assert report["_out"].shape == (H * N,) and report["_in"].sum() == 18
    without = graph_report(model, GraphOptions(seeds=1), edges_per_head=[len(HUB), len(CHAIN)], null=False)
    assert without["null_modularity"] is None and without["null_modularity_sd"] is None
    assert without["heads"][0]["null_modularity"] is None and "null_draws" not in without["heads"][0]


def test_whole_graph_report_every_field():
    from bdh_lightning.insight.graph import community_order, louvain_modularity

    model = planted_graph_model()
    planted = HUB + CHAIN + CROSS
    whole = whole_graph_report(model, GraphOptions(hubs=2, seeds=2, seed=1), edges=len(planted))
    src, dst = whole["_edges"]
    runs = [louvain_modularity(src, dst, H * N, seed)[0] for seed in (1, 2)]
    assert whole["path"] == "encoder" and whole["edges"] == 20 and 0.99 < whole["threshold"] < 1.01
    assert whole["seeds"] == runs and whole["modularity"] == pytest.approx(np.mean(runs))
    assert whole["random_cross_head_share"] == 0.5 and len(whole["null_draws"]) == 2
    assert whole["communities"] >= 3 and whole["out_degree"]["hubs"][0] == {"neuron": "h0:5", "degree": 10}
    assert whole["in_degree"]["max"] == 1 and len(whole["in_degree"]["hubs"]) == 2
    communities = louvain_modularity(src, dst, H * N, 1)[1]
    assert whole["_order"].tolist() == community_order(communities, H * N).tolist()
    # With a threshold instead of an edge count, and no random graphs.
    by_threshold = whole_graph_report(model, GraphOptions(threshold=1.9, seeds=1), null=False)
    assert by_threshold["edges"] == 1 and by_threshold["null_modularity"] is None


def test_community_order_is_the_communities_largest_first_then_the_rest():
    from bdh_lightning.insight.graph import community_order

    assert community_order([{5, 3, 9}, {1}], 10).tolist() == [3, 5, 9, 1, 0, 2, 4, 6, 7, 8]
    assert community_order([], 3).tolist() == [0, 1, 2]


def test_largest_entries_within_and_across_heads():
    from bdh_lightning.insight.graph import largest_entries

    decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # 2 heads of 2 neurons
    encoder = torch.tensor([[5.0, 1.0, 0.0, 4.0], [0.0, 0.5, 0.7, 0.0]])
    # G = decoder @ encoder; the diagonal is left out.
    G = decoder @ encoder
    assert largest_entries(decoder, encoder, 2, block_rows=3) == {
        "within_head_max": max(G[0, 1], G[1, 0], G[2, 3], G[3, 2]).item(),
        "cross_head_max": G[[0, 0, 1, 1, 2, 2, 3, 3], [2, 3, 2, 3, 0, 1, 0, 1]].max().item(),
    }
    assert largest_entries(decoder[:2], encoder[:, :2], 2)["cross_head_max"] is None  # one head: nothing crosses


def test_tail_verdict_in_words():
    from bdh_lightning.insight.graph import tail_verdict

    def fit(exp_lr, exp_p, logn_lr=0.0, logn_p=1.0, at_bound=False):
        return {"at_bound": at_bound, "vs_exponential": {"lr": exp_lr, "p": exp_p},
                "vs_lognormal": {"lr": logn_lr, "p": logn_p}}  # fmt: skip

    assert tail_verdict(fit(-5, 0.01)) == "no heavy tail (an exponential tail fits better)"
    assert tail_verdict(fit(5, 0.5, at_bound=True)) == "no heavy tail"
    assert tail_verdict(fit(-5, 0.09)) == "no heavy tail (an exponential tail fits better)"
    assert tail_verdict(fit(-5, 0.1)) == "undecided (power law and exponential fit alike)"
    assert tail_verdict(fit(5, 0.1)) == "undecided (power law and exponential fit alike)"
    assert tail_verdict(fit(5, 0.01, -3, 0.01)) == "heavy tail, lognormal rather than power law"
    assert tail_verdict(fit(5, 0.01, -3, 0.5)) == "heavy tail (power law or lognormal)"
    assert tail_verdict(fit(5, 0.01, 3, 0.1)) == "heavy tail (power law or lognormal)"
    assert tail_verdict(fit(5, 0.01, 3, 0.01)) == "power-law tail"


def test_compare_tails_log_likelihoods_by_hand():
    """The exponential side of Vuong's test written out: the geometric MLE on k - x_min and its log-likelihood."""
    from scipy.special import zeta
    from scipy.stats import norm

    from bdh_lightning.insight.graph import compare_tails

    tail = np.array([3, 3, 4, 5, 7, 9, 12, 20])
    alpha, xmin = 2.2, 3
    result = compare_tails(tail, alpha, xmin)
    power = -alpha * np.log(tail) - np.log(zeta(alpha, xmin))
    q = 1 / (1 + 1 / (tail - xmin).mean())  # P(K = k) = (1 - q) q^(k - xmin)
    exponential = np.log(1 - q) + (tail - xmin) * np.log(q)
    difference = power - exponential
    assert result["vs_exponential"]["lr"] == pytest.approx(difference.sum())
    expected_p = math.erfc(abs(difference.sum()) / (math.sqrt(2 * tail.size) * difference.std()))
    assert result["vs_exponential"]["p"] == pytest.approx(expected_p)
    # The lognormal side: its fitted discrete likelihood is at least that of the starting guess.
    logs = np.log(tail)
    mu, sigma = logs.mean(), logs.std()

    def lognormal_mass(k):
        return norm.cdf((np.log(k + 0.5) - mu) / sigma) - norm.cdf((np.log(k - 0.5) - mu) / sigma)

    start = np.log(lognormal_mass(tail)).sum() - tail.size * np.log(norm.sf((np.log(xmin - 0.5) - mu) / sigma))
    assert power.sum() - result["vs_lognormal"]["lr"] >= start - 1e-6


def test_tail_verdict_at_its_boundaries():
    from bdh_lightning.insight.graph import tail_verdict

    def fit(exp_lr, exp_p, logn_lr=0.0, logn_p=1.0, at_bound=False):
        return {"at_bound": at_bound, "vs_exponential": {"lr": exp_lr, "p": exp_p},
                "vs_lognormal": {"lr": logn_lr, "p": logn_p}}  # fmt: skip

    assert tail_verdict(fit(0.0, 0.01)) == "undecided (power law and exponential fit alike)"
    assert tail_verdict(fit(0.5, 0.01)) == "heavy tail (power law or lognormal)"
    assert tail_verdict(fit(0.5, 0.5, at_bound=True)) == tail_verdict(fit(0.0, 0.5, at_bound=True)) == "no heavy tail"
    assert tail_verdict(fit(5, 0.01, 0.0, 0.01)) == tail_verdict(fit(5, 0.01, 0.5, 0.01)) == "power-law tail"
    assert tail_verdict(fit(5, 0.01, -3, 0.1)) == "heavy tail (power law or lognormal)"


def test_modularity_edge_cases_match_networkx():
    import networkx as nx

    from bdh_lightning.insight.graph import louvain_modularity, modularity

    assert modularity(np.empty((0, 2), dtype=np.int64), np.zeros(3, dtype=np.int64)) == 0.0
    assert modularity(np.array([[0, 1]]), np.array([0, 1])) == pytest.approx(-0.5)
    pairs, labels = np.array([[0, 1], [1, 2]]), np.array([0, 0, 1])  # the last community has no inside edge
    graph = nx.Graph(pairs.tolist())
    assert modularity(pairs, labels) == pytest.approx(nx.community.modularity(graph, [{0, 1}, {2}]))
    empty = np.empty(0, dtype=np.int64)
    assert louvain_modularity(empty, empty, 5, seed=0) == (0.0, [])
    assert louvain_modularity(np.array([0]), np.array([1]), 3, seed=0) == (0.0, [{0, 1}])
    # Two cliques, the smaller first in node order: communities come largest first.
    small = [(i, j) for i in range(3) for j in range(3) if i < j]
    large = [(i, j) for i in range(3, 9) for j in range(3, 9) if i < j]
    src, dst = np.array([e[0] for e in small + large]), np.array([e[1] for e in small + large])
    _, communities = louvain_modularity(src, dst, 9, seed=0)
    assert [len(c) for c in communities] == [6, 3]


def test_modularity_spread_uses_seed_plus_i_for_louvain_and_the_random_graphs():
    from bdh_lightning.insight.graph import degree_matched_null, louvain_modularity, modularity_spread

    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 300, 1500), rng.integers(0, 300, 1500)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    spread = modularity_spread(src, dst, 300, seed=3, seeds=3, null=True)
    assert spread["seeds"] == [louvain_modularity(src, dst, 300, s)[0] for s in (3, 4, 5)]
    assert len(set(spread["seeds"])) > 1  # seeds matter on a random graph: the spread is real
    assert spread["null_draws"] == [louvain_modularity(*degree_matched_null(src, dst, s), 300, s)[0] for s in (3, 4, 5)]
    off = modularity_spread(src, dst, 300, seed=3, seeds=1, null=False)
    assert off["null_modularity"] is None and off["null_modularity_sd"] is None


def test_whole_graph_report_counts_communities_hubs_and_empty_graphs():
    from bdh_lightning.insight.graph import louvain_modularity

    model = planted_graph_model()
    planted = HUB + CHAIN + CROSS
    whole = whole_graph_report(model, GraphOptions(hubs=2, seeds=1), edges=len(planted), null=False)
    communities = louvain_modularity(*whole["_edges"], H * N, 0)[1]
    assert any(len(c) == 2 for c in communities)  # h0:20 -> h1:3 alone
    assert whole["communities"] == sum(1 for c in communities if len(c) >= 2)
    assert len(whole["out_degree"]["hubs"]) == len(whole["in_degree"]["hubs"]) == 2
    report = graph_report(model, GraphOptions(hubs=3, seeds=1), edges_per_head=[10, 8])
    assert len(report["in_degree"]["hubs"]) == 3
    assert whole_graph_report(model, GraphOptions(mean_degree=0.001, seeds=1), null=False)["edges"] == 1
    none = whole_graph_report(model, GraphOptions(threshold=100.0, seeds=1), null=False)
    assert none["edges"] == 0 and none["cross_head_share"] is None and none["modularity"] == 0.0
