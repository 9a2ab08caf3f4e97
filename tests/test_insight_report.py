"""insight/report.py in-process: report.html, report.json, the printed summary and the trajectory word for word from a
hand-made report, and what each plot draws (data, labels, scales), read back from matplotlib's figures."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="the insight extra (matplotlib) is part of the test extra")

import matplotlib  # noqa: E402
from matplotlib.image import imread  # noqa: E402
from matplotlib.layout_engine import ConstrainedLayoutEngine  # noqa: E402

from bdh_lightning.insight import report as r  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def fit(verdict="power-law tail", at_bound=False, alpha=2.4567, xmin=3):
    return {"verdict": verdict, "alpha": alpha, "xmin": xmin, "at_bound": at_bound, "tail": 41,
            "vs_exponential": {"lr": 3.21, "p": 0.0123}, "vs_lognormal": {"lr": -0.456, "p": 0.61}}  # fmt: skip


def sparsity(scale: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rates = rng.random((3, 2, 16)) ** 4
    rates[0, 0, :3] = 0  # dead neurons: drawn at 1e-5
    return {
        "loss": 2.3456 * scale,
        "active": {"a": 0.1234 * scale, "b": 0.2345 * scale, "ab": 0.0345 * scale},
        "neurons": {
            "a": {"dead": 3, "always_on": 1},
            "b": {"dead": 0, "always_on": 2},
            "ab": {"dead": 5, "always_on": 0},
        },  # fmt: skip
        "active_vs_loss": {
            "a": {"spearman": 0.1234, "p": 0.0456},
            "b": {"spearman": -0.25, "p": None},
            "ab": {"spearman": 0.3456 * scale, "p": 0.001234},
        },  # fmt: skip
        "per_layer": [{"a": 0.1 * scale, "b": 0.2, "ab": 0.03}, {"a": 0.15, "b": 0.25 * scale, "ab": 0.05}],
        "per_layer_head": [[{"ab": 0.01}, {"ab": 0.02}, {"ab": 0.03}], [{"ab": 0.04}, {"ab": 0.05}, {"ab": 0.06}]],
        "_rates": rates,
        "_loss": rng.random(20) * 5,
        "_active": rng.random((3, 20)),
    }


def selective(median: float) -> dict:
    contexts = [{"value": 1.5, "before": "the <cat", "byte": "s", "after": " & sat"},
                {"value": -0.25, "before": "a dog's long tail", "byte": "\\x00", "after": ""}]  # fmt: skip
    return {"measure": "mean of the 2 largest a·b values <on the text>", "eligible": 40,
            "median_context_selectivity": median, "share_above_2": 0.125, "median_selectivity": 3.456,
            "selectivity_ceiling": 32.4, "neurons": [
                {"neuron": "h1:7", "context_selectivity": 4.567, "selectivity": 12.34, "fires": 9, "contexts": contexts},
                {"neuron": "h0:2", "context_selectivity": 2.5, "selectivity": 8.0, "fires": 4, "contexts": []}]}  # fmt: skip


def degree_side(fit_value, offset: int) -> dict:
    hubs = [{"neuron": f"h0:{i}", "degree": 20 - i} for i in range(6)]
    return {"fit": fit_value, "hubs": hubs, "max": 20 + offset}


def graph_side(trained: bool) -> dict:
    rng = np.random.default_rng(3 if trained else 4)
    heads = [{"head": h, "threshold": 0.012345 * (h + 1), "edges": 600 + h, "modularity": 0.4321 + h,
              "modularity_sd": 0.0123, "null_modularity": 0.2109, "null_modularity_sd": 0.0045, "communities": 7 + h,
              "community_sizes": [30, 20, 10, 5, 3, 2]} for h in range(2)]  # fmt: skip
    return {
        "edges": 1234, "mean_degree": 4.5678, "heads": heads,
        "modularity": 0.4321 if trained else 0.1111, "modularity_sd": 0.0123 if trained else 0.0222,
        "null_modularity": 0.2109 if trained else 0.1567, "null_modularity_sd": 0.0045 if trained else 0.0066,
        "out_degree": degree_side(fit() if trained else None, 0),
        "in_degree": degree_side(fit("no heavy tail", at_bound=True) if trained else fit("undecided"), 1),
        "_out": rng.integers(0, 30, 64), "_in": rng.integers(0, 30, 64),
    }  # fmt: skip


def whole_side(trained: bool) -> list[dict]:
    return [{"path": path, "edges": 900 + i, "cross_head_share": (0.4567 if trained else 0.5) + i / 10, "within_head_max": 1.25,
             "cross_head_max": None if i else 0.875, "modularity": 0.3333, "modularity_sd": 0.0111,
             "null_modularity": 0.2222 if trained else None, "null_modularity_sd": 0.0101 if trained else None,
             "out_degree": {"fit": fit() if i == 0 else None}, "random_cross_head_share": 0.5,
             "_order": np.array([3, 0, 2, 1])} for i, path in enumerate(("encoder", "encoder_v"))]  # fmt: skip


def probe_side(bh: int) -> dict:
    neurons = [{"neuron": "h0:3", "U": 21.0, "p": 0.0123, "p_bh": 0.0456, "p_holm": 0.0789, "p_permutation": 0.05,
                "rank_biserial": 0.8, "concept_mean": 0.012345, "control_mean": 0.00123,
                "contexts": [{"value": 2.0, "before": "<b>", "byte": "c", "after": "at"}]},
               {"neuron": "h1:0", "U": 3.4, "p": 0.5, "p_bh": 0.75, "p_holm": 1.0, "p_permutation": None,
                "rank_biserial": -0.1, "concept_mean": 1.5, "control_mean": 2.0}]  # fmt: skip
    return {"concept_sentences": 3, "control_sentences": 7, "signal": "a·b", "tested": 256,
            "correction": "Benjamini-Hochberg & Holm", "permutations": 100, "pairs": 21, "neurons": neurons,
            "significant": {"raw": 5, "bh": bh, "holm": 1, "permutation": 0}, "best_p_holm": 0.0789,
            "best_p_permutation": 0.05}  # fmt: skip


def synapse_side(bh: int) -> dict:
    synapses = [{"synapse": "h0:3~x5", "U": 20.0, "p": 0.00123, "p_bh": 0.0234, "p_holm": 0.0341,
                 "p_permutation": 0.02, "rank_biserial": 0.905}]  # fmt: skip
    return {"tested": 512, "pairs": 21, "synapses": synapses, "significant": {"raw": 4, "bh": bh, "holm": 0,
            "permutation": None}, "best_p_holm": 0.0341, "best_p_permutation": None}  # fmt: skip


def make_report(probe=True) -> dict:
    s, s0 = sparsity(1.0, 1), sparsity(0.5, 2)
    s["selective"], s0["selective"] = selective(1.234), selective(0.987)
    return {
        "checkpoint": "runs/<a&b>/last.ckpt", "step": 6, "model": {"n_layer": 2, "name": "<x>"}, "seed": 3,
        "data": {"windows": 2, "block_size": 32, "path": "corpus <1>.txt", "from_byte": 18000, "corpus_bytes": 20000},
        "sparsity": {"trained": s, "init": s0},
        "graph": {"trained": graph_side(True), "init": graph_side(False)},
        "whole_graph": {"trained": whole_side(True), "init": whole_side(False)},
        "probe": {"trained": probe_side(2), "init": probe_side(0)} if probe else None,
        "synapses": {"trained": synapse_side(1), "init": synapse_side(0)} if probe else None,
        "seconds": 12.6,
    }  # fmt: skip


def test_the_small_formatters():
    assert r.percent(0.1234) == "12.34%" and r.percent(1) == "100.00%"
    assert r.fmt(None) == "" and r.fmt(0.001234) == "0.00123" and r.fmt(3) == "3" and r.fmt(1234.5) == "1.23e+03"
    assert r.spread(None, 0.1) == "n/a" and r.spread(0.4321, 0.0123) == "0.432 ± 0.012"
    assert r.table(["<h>", 1], [[1, "a&b"], [None, 2.5]]) == (
        "<table><tr><th>&lt;h&gt;</th><th>1</th></tr><tr><td>1</td><td>a&amp;b</td></tr>"
        "<tr><td>None</td><td>2.5</td></tr></table>"
    )
    contexts = selective(1.0)["neurons"][0]["contexts"]
    assert r.contexts_block("h1:7 <x>", contexts) == (
        "<h3>h1:7 &lt;x&gt;</h3><pre>   1.500  the &lt;cat<mark>s</mark> &amp; sat\n"
        "  -0.250  a dog&#x27;s long tail<mark>\\x00</mark>\n</pre>"
    )
    private = {"a": [{"_x": 1, "y": {"_z": 2, "w": (1, 2)}}], "_b": 3, "c": None}
    assert r.strip_private(private) == {"a": [{"y": {"w": (1, 2)}}], "c": None}


def test_tail_words_name_the_verdict_then_the_exponent_only_for_a_possible_heavy_tail():
    assert r.tail_words(None) == r.tail_words({}) == "too short to fit"
    vs = "Vuong LR vs exponential 3.2 (p 0.012)"
    assert r.tail_words(fit()) == f"power-law tail: alpha 2.46 from k >= 3 (41 neurons); {vs}"
    assert r.tail_words(fit("no heavy tail", at_bound=True)) == (
        f"no heavy tail: falls faster than any power law fitted from k >= 3; {vs}"
    )
    assert r.tail_words(fit("no heavy tail (an exponential tail fits better)")) == (
        f"no heavy tail (an exponential tail fits better) from k >= 3 (41 neurons); {vs}"
    )


def row(*cells) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def test_the_sparsity_section_word_for_word():
    report = make_report()
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    assert r.html_sparsity(s, s0) == [
        "<h2>Sparsity</h2>",
        "<table><tr><th></th><th>a</th><th>b</th><th>a·b</th></tr>"
        + row("trained: active", "12.34%", "23.45%", "3.45%")
        + row("trained: dead / always-on neurons", "3 / 1", "0 / 2", "5 / 0")
        + row("trained: Spearman(active, loss) [window-bootstrap p]", "0.123 [0.0456]", "-0.25 []", "0.346 [0.00123]")
        + row("initialisation: active", "6.17%", "11.72%", "1.73%")
        + row("initialisation: dead / always-on neurons", "3 / 1", "0 / 2", "5 / 0")
        + row(
            "initialisation: Spearman(active, loss) [window-bootstrap p]",
            "0.123 [0.0456]",
            "-0.25 []",
            "0.173 [0.00123]",
        )  # fmt: skip
        + "</table>",
        "<p>Mean loss on the sample: trained 2.346, initialisation 1.173 nats per byte. The p-value of Spearman's ρ "
        "resamples whole windows (positions inside a window are not independent).</p>",
        "<img src='sparsity_layers.png'><img src='firing_rates.png'><img src='active_vs_loss.png'>",
    ]


def test_the_graph_sections_word_for_word():
    report = make_report()
    g, g0 = report["graph"]["trained"], report["graph"]["init"]
    parts = r.html_graph(g, g0)
    assert parts[0] == (
        "<h2>Neuron graph per head</h2><p>G = decoder_h · encoder_h per head; 1234 edges kept (mean degree 4.57). "
        "Louvain modularity, mean ± SD over seeds: trained 0.432 ± 0.012 (degree-matched random graphs 0.211 ± "
        "0.004); initialisation 0.111 ± 0.022 (its random graphs 0.157 ± 0.007).</p>"
    )
    assert parts[1] == (
        "<table><tr><th>head</th><th>threshold</th><th>edges</th><th>modularity</th><th>random</th>"
        "<th>communities</th><th>largest</th><th>init modularity</th></tr>"
        + row(0, "0.01235", 600, "0.432 ± 0.012", "0.211 ± 0.004", 7, "[30, 20, 10, 5, 3]", "0.432 ± 0.012")
        + row(1, "0.02469", 601, "1.432 ± 0.012", "0.211 ± 0.004", 8, "[30, 20, 10, 5, 3]", "1.432 ± 0.012")
        + "</table>"
    )
    hubs = "h0:0 (20), h0:1 (19), h0:2 (18), h0:3 (17), h0:4 (16)"
    assert parts[2] == (
        "<table><tr><th></th><th>tail</th><th>α</th><th>x_min</th><th>LR vs exp</th><th>LR vs lognormal</th>"
        "<th>max</th><th>hubs</th></tr>"
        + row("trained out-degree", "power-law tail", "2.46", 3, "3.21", "-0.456", 20, hubs)
        + row("trained in-degree", "no heavy tail", "", 3, "3.21", "-0.456", 21, hubs)
        + row("initialisation out-degree", "too short", "", "", "", "", 20, hubs)
        + row("initialisation in-degree", "undecided", "2.46", 3, "3.21", "-0.456", 21, hubs)
        + "</table>"
    )
    assert parts[3:] == ["<img src='degrees.png'>"]
    whole = r.html_whole(report["whole_graph"]["trained"], report["whole_graph"]["init"])
    assert whole == [
        "<h2>The whole neuron graph</h2><p>G = decoder · encoder across all heads (the residual stream is shared), "
        "and decoder · encoder_v (how a neuron's output drives the value side b). A random choice of edges would "
        "cross heads with share 0.5.</p>",
        "<table><tr><th>graph</th><th>edges</th><th>cross-head share</th><th>max within</th><th>max across</th>"
        "<th>modularity</th><th>random</th><th>out tail</th></tr>"
        + row("trained encoder", 900, "0.457", "1.25", "0.875", "0.333 ± 0.011", "0.222 ± 0.010", "power-law tail")
        + row("trained encoder_v", 901, "0.557", "1.25", "", "0.333 ± 0.011", "0.222 ± 0.010", "too short")
        + row("initialisation encoder", 900, "0.5", "1.25", "0.875", "0.333 ± 0.011", "n/a", "power-law tail")
        + row("initialisation encoder_v", 901, "0.6", "1.25", "", "0.333 ± 0.011", "n/a", "too short")
        + "</table>",
        "<img src='graph_heatmap.png'>",
    ]


def test_the_selective_probe_and_synapse_sections_word_for_word():
    report = make_report()
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    parts = r.html_selective(s["selective"], s0["selective"])
    assert parts[0] == (
        "<h2>Selective neurons</h2><p>Context selectivity = mean of the 2 largest a·b values &lt;on the text&gt;. "
        "Median over 40 eligible neurons: trained 1.23 (share above 2: 0.125), initialisation 0.987 (share above 2: "
        "0.125). The older ratio top-k mean / mean (capped at 32): trained 3.46, initialisation 3.46.</p>"
    )
    sel = s["selective"]["neurons"]
    assert parts[1:] == [
        r.contexts_block(
            "h1:7: context selectivity 4.57 (top-k / mean 12.3), fires at 9 positions", sel[0]["contexts"]
        ),
        r.contexts_block("h0:2: context selectivity 2.50 (top-k / mean 8.0), fires at 4 positions", []),
    ]
    significance = (
        "<table><tr><th></th><th>raw p</th><th>BH</th><th>Holm</th><th>permutation</th><th>best U</th>"
        "<th>best Holm p</th><th>best permutation p</th></tr>{}</table>"
    )
    probe = r.html_probe(report["probe"])
    assert probe[0] == (
        "<h2>Probe: concept against control</h2><p>3 concept and 7 control sentences; a neuron's value is its a·b "
        "averaged over the sentence; 256 neurons tested; Benjamini-Hochberg &amp; Holm; permutation: 100 label "
        "shuffles, max |U| over neurons. Neurons significant at 0.05:</p>"
    )
    assert probe[1] == significance.format(
        row("trained", 5, 2, 1, "0", "21 / 21", "0.079", "0.05") + row("initialisation", 5, 0, 1, "0", "21 / 21", "0.079", "0.05")
    )  # fmt: skip
    assert probe[2] == (
        "<table><tr><th>neuron</th><th>U</th><th>p</th><th>p BH</th><th>p Holm</th><th>p perm</th>"
        "<th>rank-biserial</th><th>concept</th><th>control</th></tr>"
        + row("h0:3", "21 / 21", "0.012", "0.046", "0.079", "0.05", "0.800", "0.01235", "0.00123")
        + row("h1:0", "3 / 21", "0.5", "0.75", "1", "", "-0.100", "1.5", "2")
        + "</table>"
    )
    assert probe[3:] == [  # only the neurons with contexts get a block
        "<h3>h0:3: strongest contexts in the corpus sample</h3><pre>   2.000  &lt;b&gt;<mark>c</mark>at\n</pre>"
    ]
    synapses = r.html_synapses(report["synapses"])
    assert synapses == [
        "<h2>Probe on synapses</h2><p>The attention state each sentence leaves, σ[h, n, d] = Σ a[n]·x[d] over its "
        "positions / its length, averaged over layers (512 synapses h{h}:{n}~x{d}), concept against control, "
        "corrected as the neurons are. Significant at 0.05:</p>",
        significance.format(row("trained", 4, 1, 0, "", "20 / 21", "0.034", "") + row("initialisation", 4, 0, 0, "", "20 / 21", "0.034", "")),
        "<table><tr><th>synapse</th><th>U</th><th>p</th><th>p BH</th><th>p Holm</th><th>p perm</th>"
        "<th>rank-biserial</th></tr>" + row("h0:3~x5", "20 / 21", "0.0012", "0.023", "0.034", "0.02", "0.905") + "</table>",
    ]  # fmt: skip
    skipped = {"trained": {"skipped": "fewer than 2 <sentences>"}, "init": {"skipped": "fewer than 2 <sentences>"}}
    assert r.html_synapses(skipped) == ["<h2>Probe on synapses</h2><p>Skipped: fewer than 2 &lt;sentences&gt;.</p>"]


def test_report_html_is_its_header_and_the_sections_in_order(tmp_path):
    report = make_report()
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    r.write_html(report, tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    sections = [
        *r.html_sparsity(s, s0),
        *r.html_graph(report["graph"]["trained"], report["graph"]["init"]),
        *r.html_whole(report["whole_graph"]["trained"], report["whole_graph"]["init"]),
        *r.html_selective(s["selective"], s0["selective"]),
        *r.html_probe(report["probe"]),
        *r.html_synapses(report["synapses"]),
    ]
    assert text == (
        "<!doctype html><html><head><meta charset='utf-8'><title>BDH inspect</title>"
        f"<style>{r.STYLE}</style></head><body>"
        "<h1>BDH inspect</h1><p>Checkpoint <code>runs/&lt;a&amp;b&gt;/last.ckpt</code>, step 6, "
        "{&quot;n_layer&quot;: 2, &quot;name&quot;: &quot;&lt;x&gt;&quot;}; beside the same architecture at "
        "initialisation (seed 3).</p><p>Corpus sample: 2 windows of 32 bytes from <code>corpus &lt;1&gt;.txt</code>, "
        "from byte 18000 of 20000.</p>" + "".join(sections) + "<p>Took 13 s.</p></body></html>"
    )
    assert "mark{background:#fc6}" in r.STYLE and r.STYLE.startswith("body{font-family:sans-serif;max-width:1100px")
    # Without neurons, probe and synapses, their sections are left out.
    report = make_report(probe=False)
    del report["sparsity"]["trained"]["selective"]
    r.write_html(report, tmp_path / "short.html")
    short = (tmp_path / "short.html").read_text(encoding="utf-8")
    assert "<h2>The whole neuron graph</h2>" in short and "<img src='graph_heatmap.png'><p>Took 13 s." in short
    assert "Selective" not in short and "Probe" not in short


def test_the_printed_summary_word_for_word(tmp_path):
    report = make_report()
    assert r.summary(report, tmp_path).splitlines() == [
        f"inspect runs/<a&b>/last.ckpt (step 6) -> {tmp_path / 'report.html'}",
        "sparsity: active a 12.34% b 23.45% a*b 3.45% (initialisation 6.17% 11.72% 1.73%); Spearman(active a*b, loss) "
        "0.346 (window-bootstrap p 0.00123)",
        "graph: 1234 edges, Louvain modularity 0.432 ± 0.012 (degree-matched random 0.211 ± 0.004; initialisation "
        "0.111 ± 0.022), out-degree tail power-law tail: alpha 2.46 from k >= 3 (41 neurons); Vuong LR vs exponential "
        "3.2 (p 0.012)",
        "most selective: h1:7 (4.57x its shuffled-text value; median 1.23, initialisation 0.987), e.g. the <cat[s]",
        "probe: h0:3 U = 21 of 21, p = 0.012 (Holm 0.079); significant at BH 0.05: 2 neurons, initialisation 0",
        "synapses: h0:3~x5 U = 20 of 21 (Holm 0.034); significant at BH 0.05: 1 of 512, initialisation 0",
    ]
    report["sparsity"]["trained"]["selective"]["neurons"][0]["contexts"][0]["before"] = (
        "xyz " + "abcdefghijklmnopqrstuvwxyz"
    )
    assert "e.g. ghijklmnopqrstuvwxyz[s]" in r.summary(report, tmp_path)
    report["synapses"]["trained"] = {"skipped": "no sentences"}
    assert len(r.summary(report, tmp_path).splitlines()) == 5
    for gone in ("synapses", "probe"):
        report[gone] = None
    report["sparsity"]["trained"]["selective"]["neurons"] = []
    assert len(r.summary(report, tmp_path).splitlines()) == 3
    del report["sparsity"]["trained"]["selective"]
    assert len(r.summary(report, tmp_path).splitlines()) == 3


def test_write_report_writes_the_pngs_json_without_arrays_and_html(tmp_path):
    report = make_report()
    figures = {"one.png": r.new_figure(), "two.png": r.new_figure(2, 1)}
    out = tmp_path / "new" / "report"
    r.write_report(report, out, figures)
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "report.html", "report.json", "two.png"]
    assert imread(out / "one.png").shape == (288, 720, 4) and imread(out / "two.png").shape == (80, 160, 4)
    assert (out / "report.json").read_text(encoding="utf-8") == json.dumps(r.strip_private(report), indent=1)
    r.write_html(report, tmp_path / "expected.html")
    assert (out / "report.html").read_text(encoding="utf-8") == (tmp_path / "expected.html").read_text("utf-8")
    r.write_report(report, out, {})  # an existing folder is fine
    assert (out / "report.json").is_file()


NO_LEGEND = "ignore:No artists with labels found to put in legend"  # a panel with nothing to draw


@pytest.mark.filterwarnings(NO_LEGEND)
def test_the_trajectory_row_is_each_headline_beside_its_control(tmp_path):
    report = make_report()
    assert r.trajectory_row(report) == {
        "step": 6, "loss": 2.3456, "active_ab": 0.0345, "init_active_ab": 0.01725, "modularity": 0.4321,
        "modularity_sd": 0.0123, "null_modularity": 0.2109, "init_modularity": 0.1111, "out_tail": "power-law tail",
        "out_tail_lr_vs_exponential": 3.21, "cross_head_share": 0.4567, "context_selective_share": 0.125,
        "init_context_selective_share": 0.125, "probe_bh": 2, "init_probe_bh": 0, "synapse_bh": 1, "init_synapse_bh": 0,
    }  # fmt: skip
    bare = make_report(probe=False)
    bare["graph"]["trained"]["out_degree"]["fit"] = None
    del bare["sparsity"]["trained"]["selective"], bare["sparsity"]["init"]["selective"]
    row = r.trajectory_row(bare)
    assert {k: v for k, v in row.items() if v is None} == dict.fromkeys(
        ["out_tail", "out_tail_lr_vs_exponential", "context_selective_share", "init_context_selective_share",
         "probe_bh", "init_probe_bh", "synapse_bh", "init_synapse_bh"]
    )  # fmt: skip
    bare["synapses"] = {"trained": {"skipped": "none"}, "init": {"significant": {"bh": 3}}}
    assert (r.trajectory_row(bare)["synapse_bh"], r.trajectory_row(bare)["init_synapse_bh"]) == (None, 3)
    rows = [row, {**row, "step": 9, "probe_bh": 4, "active_ab": 0.5}]
    r.write_trajectory([bare, {**bare, "step": 9}], tmp_path)
    assert json.loads((tmp_path / "trajectory.json").read_text()) == [
        r.trajectory_row(bare),
        {**r.trajectory_row(bare), "step": 9},
    ]
    assert (tmp_path / "trajectory.json").read_text() == json.dumps(
        [r.trajectory_row(bare), {**r.trajectory_row(bare), "step": 9}], indent=1
    )
    assert imread(tmp_path / "trajectory.png").shape == (480, 960, 4)
    figure = r.plot_trajectory(rows)
    assert tuple(figure.get_size_inches()) == (12, 6)
    axes = figure.axes
    assert [a.get_title() for a in axes] == [
        "a·b active fraction", "Louvain modularity", "out-degree LR vs exponential (> 0: heavier)",
        "probe: neurons significant (BH 0.05)", "probe: synapses significant (BH 0.05)",
        "share of neurons 2x stronger on text than shuffled"]  # fmt: skip
    assert all(a.get_xlabel() == "step" for a in axes)
    lines = {(a.get_title(), line.get_label()): line for a in axes for line in a.get_lines()}
    assert list(lines[("a·b active fraction", "trained")].get_xdata()) == [6, 9]
    assert list(lines[("a·b active fraction", "trained")].get_ydata()) == [0.0345, 0.5]
    assert list(lines[("a·b active fraction", "initialisation")].get_ydata()) == [0.01725, 0.01725]
    probe = lines[("probe: neurons significant (BH 0.05)", "trained")].get_ydata()
    assert np.isnan(probe[0]) and probe[1] == 4  # a step without a value is a gap
    assert ("probe: neurons significant (BH 0.05)", "initialisation") not in lines  # no value at all: no line
    assert [k[1] for k in lines if k[0] == "Louvain modularity"] == ["trained", "random graph", "initialisation"]
    assert lines[("Louvain modularity", "trained")].get_marker() == "o"
    assert lines[("Louvain modularity", "trained")].get_linestyle() == "-"
    legend = axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["trained", "random graph", "initialisation"]
    # A panel with nothing to plot says so, with no legend (matplotlib warns of an empty one).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = r.plot_trajectory([r.trajectory_row(bare)] * 2).axes
    assert [[t.get_text() for t in a.texts] for a in empty] == [[], [], *[["not measured"]] * 2, [], ["not measured"]]
    assert [a.get_legend() is None for a in empty] == [False, False, True, True, False, True]
    assert empty[2].texts[0].get_position() == (0.5, 0.5) and empty[2].texts[0].get_transform() == empty[2].transAxes
    assert (empty[2].texts[0].get_ha(), empty[2].texts[0].get_va()) == ("center", "center")
    assert legend.get_texts()[0].get_fontsize() == 7
    # Every series of a full report, each under its panel's title.
    full = r.plot_trajectory([r.trajectory_row(make_report())] * 2)
    assert [[line.get_label() for line in a.get_lines()] for a in full.axes] == [
        ["trained", "initialisation"], ["trained", "random graph", "initialisation"], ["trained"],
        ["trained", "initialisation"], ["trained", "initialisation"], ["trained", "initialisation"]]  # fmt: skip
    assert [[list(line.get_ydata()) for line in a.get_lines()] for a in full.axes] == [
        [[0.0345] * 2, [0.01725] * 2], [[0.4321] * 2, [0.2109] * 2, [0.1111] * 2], [[3.21] * 2],
        [[2] * 2, [0] * 2], [[1] * 2, [0] * 2], [[0.125] * 2, [0.125] * 2]]  # fmt: skip


def test_a_figure_image_is_its_rgb_pixels(tmp_path):
    figure = r.new_figure(2, 1)
    assert tuple(figure.get_size_inches()) == (2, 1) and figure.dpi == 80
    assert isinstance(figure.get_layout_engine(), ConstrainedLayoutEngine)
    figure.patch.set_facecolor((1.0, 0.0, 0.5))
    image = r.figure_image(figure)
    assert image.shape == (80, 160, 3) and image.dtype == np.uint8
    assert (image == np.array([255, 0, 128], dtype=np.uint8)).all()
    r.save_png(figure, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG
    assert np.allclose(imread(tmp_path / "f.png")[..., :3], image / 255, atol=1 / 255)
    assert tuple(r.new_figure().get_size_inches()) == (9, 3.6)


@pytest.mark.filterwarnings(NO_LEGEND)
def test_the_degree_plot_draws_each_ccdf_and_the_trained_tail_fit():
    report = make_report()
    g, g0 = report["graph"]["trained"], report["graph"]["init"]
    figure = r.plot_degrees(g, g0)
    out_axis, in_axis = figure.axes
    assert [a.get_subplotspec().get_geometry() for a in figure.axes] == [(1, 2, 0, 0), (1, 2, 1, 1)]  # side by side
    for axis, key, title in ((out_axis, "_out", "out-degree\ntrained: power-law tail"),
                             (in_axis, "_in", "in-degree\ntrained: no heavy tail")):  # fmt: skip
        assert axis.get_title() == title and axis.title.get_fontsize() == 8
        assert axis.get_xscale() == axis.get_yscale() == "log"
        assert (axis.get_xlabel(), axis.get_ylabel()) == ("degree k", "P(K ≥ k)")
        lines = {line.get_label(): line for line in axis.get_lines()}
        for side, label, style in ((g, "trained", "-"), (g0, "initialisation", "--")):
            d = np.sort(side[key][side[key] > 0])
            assert np.array_equal(lines[label].get_xdata(), d), label
            assert np.allclose(lines[label].get_ydata(), 1 - np.arange(d.size) / d.size)  # P(K >= k) of k sorted
            assert lines[label].get_linestyle() == style
        legend = axis.get_legend()
        assert legend.get_texts()[0].get_fontsize() == 8
    # The out-degree fit: P(K >= k) = share of degrees >= x_min times (k / x_min)^(1 - alpha), from x_min on.
    fitted = [line for line in out_axis.get_lines() if line.get_label().startswith("power-law")]
    assert [line.get_label() for line in fitted] == ["power-law fit α=2.46, x_min=3"]
    d = np.sort(g["_out"][g["_out"] > 0])
    k = np.unique(d[d >= 3])
    assert np.array_equal(fitted[0].get_xdata(), k)
    assert np.allclose(fitted[0].get_ydata(), (d >= 3).mean() * (k / 3) ** (1 - 2.4567))
    assert fitted[0].get_linestyle() == ":" and fitted[0].get_color() == "k"
    assert [line.get_label() for line in in_axis.get_lines()] == ["trained", "initialisation"]  # no heavy tail: no fit
    # Without the model at initialisation, or with no positive degree: only what there is.
    g["_in"] = np.zeros(5, dtype=int)
    g["out_degree"]["fit"] = None
    out_axis, in_axis = r.plot_degrees(g, None).axes
    assert [line.get_label() for line in out_axis.get_lines()] == ["trained"] and out_axis.get_title() == "out-degree"
    assert in_axis.get_lines() == []
    # A trained side with no positive degree still shows the initialisation's.
    assert [line.get_label() for line in r.plot_degrees(g, g0).axes[1].get_lines()] == ["initialisation"]


def test_the_firing_rate_histograms_count_each_neuron_once_with_dead_ones_at_1e_5():
    report = make_report()
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    figure = r.plot_firing_rates(s, s0)
    assert [a.get_subplotspec().get_geometry() for a in figure.axes] == [(1, 3, k, k) for k in range(3)]
    edges = np.logspace(-5, 0, 41)
    for k, (axis, kind) in enumerate(zip(figure.axes, ("a", "b", "a·b"))):
        assert axis.get_title() == f"{kind}: firing rate per neuron" and axis.get_xscale() == "log"
        assert (axis.get_xlabel(), axis.get_ylabel()) == ("rate (dead shown at 1e-5)", "neurons")
        assert [t.get_text() for t in axis.get_legend().get_texts()] == ["trained", "initialisation"]
        assert axis.get_legend().get_texts()[0].get_fontsize() == 8
        for patch, side in zip(axis.patches, (s, s0)):
            counts = np.histogram(np.clip(side["_rates"][k].ravel(), 1e-5, 1), bins=edges)[0]
            xy = patch.get_xy()
            assert np.allclose(np.unique(xy[:, 0]), edges)  # the step outline over the 40 log bins
            assert np.array_equal(xy[1:-1:2, 1][: counts.size], counts), kind
            assert counts.sum() == 32
    assert len(r.plot_firing_rates(s, None).axes[0].patches) == 1


def test_the_layer_plot_draws_each_kinds_fraction_per_layer_and_the_head_grid():
    report = make_report()
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    with matplotlib.rc_context({"image.cmap": "gray"}):  # a user's matplotlibrc: the grid stays viridis
        figure = r.plot_sparsity_layers(s, s0)
    lines_axis, grid_axis = figure.axes[:2]
    assert len(figure.axes) == 3  # and the colour bar
    assert [a.get_subplotspec().get_geometry() for a in figure.axes[:2]] == [(1, 2, 0, 0), (1, 2, 1, 1)]
    lines = {line.get_label(): line for line in lines_axis.get_lines()}
    assert list(lines) == ["a trained", "b trained", "ab trained", "a initialisation", "b initialisation",
                           "ab initialisation"]  # fmt: skip
    for kind, color in zip(("a", "b", "ab"), ("C0", "C1", "C2")):
        assert list(lines[f"{kind} trained"].get_ydata()) == [row[kind] for row in s["per_layer"]]
        assert list(lines[f"{kind} initialisation"].get_ydata()) == [row[kind] for row in s0["per_layer"]]
        assert lines[f"{kind} trained"].get_color() == lines[f"{kind} initialisation"].get_color() == color
        assert (lines[f"{kind} trained"].get_marker(), lines[f"{kind} trained"].get_linestyle()) == ("o", "-")
        assert (lines[f"{kind} initialisation"].get_marker(), lines[f"{kind} initialisation"].get_linestyle()) == (
            "x", "--")  # fmt: skip
    assert lines_axis.get_yscale() == "log" and list(lines_axis.get_xticks()) == [0, 1]
    assert (lines_axis.get_xlabel(), lines_axis.get_ylabel(), lines_axis.get_title()) == (
        "layer", "active fraction", "active fraction per layer")  # fmt: skip
    assert lines_axis.get_legend().get_texts()[0].get_fontsize() == 7
    image = grid_axis.get_images()[0]
    assert np.array_equal(image.get_array(), [[0.01, 0.04], [0.02, 0.05], [0.03, 0.06]])  # heads down, layers across
    assert image.get_cmap().name == "viridis" and grid_axis.get_aspect() == "auto"
    assert image.colorbar.mappable is image  # the colour bar is the grid's scale
    assert (grid_axis.get_xlabel(), grid_axis.get_ylabel(), grid_axis.get_title()) == (
        "layer", "head", "trained: a·b active fraction")  # fmt: skip
    assert list(grid_axis.get_xticks()) == [0, 1] and list(grid_axis.get_yticks()) == [0, 1, 2]
    assert len(r.plot_sparsity_layers(s, None).axes[0].get_lines()) == 3


def test_the_loss_scatter_is_each_positions_loss_and_ab_activity():
    s = make_report()["sparsity"]["trained"]
    figure = r.plot_active_vs_loss(s)
    assert tuple(figure.get_size_inches()) == (5.5, 4)
    (axis,) = figure.axes
    points = axis.collections[0]
    assert np.array_equal(points.get_offsets(), np.stack([s["_loss"], s["_active"][2]], axis=1))
    assert list(points.get_sizes()) == [3] and points.get_alpha() == 0.3
    assert (axis.get_xlabel(), axis.get_ylabel(), axis.get_title()) == (
        "next-byte loss (nats)", "a·b active fraction at the position", "trained: Spearman ρ = 0.35")  # fmt: skip
    s["active_vs_loss"]["ab"]["spearman"] = None
    assert r.plot_active_vs_loss(s).axes[0].get_title() == "trained"


def test_the_heatmap_is_g_across_heads_in_community_order_up_to_the_limit():
    H, D, N = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    model = SimpleNamespace(decoder=torch.randn(H * N, D, generator=gen), encoder=torch.randn(H, D, N, generator=gen),
                            encoder_v=torch.randn(H, D, N, generator=gen))  # fmt: skip
    order = np.array([5, 0, 7, 2, 1, 3, 6, 4])
    for path, weights in (("encoder", model.encoder), ("encoder_v", model.encoder_v)):
        G = (model.decoder @ weights.permute(1, 0, 2).reshape(D, H * N)).numpy()
        figure = r.plot_graph_heatmap(model, {"_order": order, "path": path}, limit=6)
        assert tuple(figure.get_size_inches()) == (6, 5.2)
        axis = figure.axes[0]
        image = axis.get_images()[0]
        assert np.allclose(image.get_array(), G[np.ix_(order[:6], order[:6])], atol=1e-6)
        scale = np.quantile(np.abs(G[np.ix_(order[:6], order[:6])]), 0.999)
        assert np.allclose(image.get_clim(), (-scale, scale))
        assert image.get_cmap().name == "RdBu_r" and image.get_interpolation() == "nearest"
        assert (axis.get_title(), axis.get_xlabel(), axis.get_ylabel()) == (
            f"G = decoder · {path}, neurons by community", "to neuron", "from neuron")  # fmt: skip
        assert len(figure.axes) == 2 and image.colorbar.mappable is image  # the colour bar is the image's scale
    default = r.plot_graph_heatmap(model, {"_order": order, "path": "encoder"})  # every neuron of a small model
    assert default.axes[0].get_images()[0].get_array().shape == (8, 8)
    # A large one: the first 512 neurons of the order.
    big = SimpleNamespace(decoder=torch.randn(600, D, generator=gen), encoder=torch.randn(2, D, 300, generator=gen))
    image = (
        r.plot_graph_heatmap(big, {"_order": np.arange(600)[::-1].copy(), "path": "encoder"}).axes[0].get_images()[0]
    )
    assert image.get_array().shape == (512, 512)


def test_report_html_is_utf_8_whatever_the_locale(tmp_path, monkeypatch):
    """A machine whose locale encoding is ASCII (pathlib asks io.text_encoding when no encoding is given)."""
    import io

    real = io.text_encoding
    monkeypatch.setattr(io, "text_encoding", lambda encoding, *args: real(encoding) if encoding else "ascii")
    r.write_html(make_report(), tmp_path / "report.html")
    assert "σ[h, n, d] = Σ a[n]·x[d]" in (tmp_path / "report.html").read_bytes().decode("utf-8")
