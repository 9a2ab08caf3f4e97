"""Writing what `inspect` found: the PNG plots (matplotlib's Agg canvas, no pyplot: nothing global is
touched), report.html, report.json and the printed summary."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from .graph import whole_graph
from .options import KINDS


def new_figure(width: float = 9, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def save_png(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).print_png(str(path))


def figure_image(figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 image (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_degrees(trained: dict, init: dict | None):
    """Complementary cumulative degree distributions P(K >= k), log-log, with the power-law tail fits."""
    figure = new_figure()
    for axis, key, title in zip(figure.subplots(1, 2), ("_out", "_in"), ("out-degree", "in-degree")):
        for report, label, style in ((trained, "trained", "-"), (init, "initialisation", "--")):
            if report is None:
                continue
            d = np.sort(report[key][report[key] > 0])
            if d.size == 0:
                continue
            ccdf = 1.0 - np.arange(d.size) / d.size
            axis.loglog(d, ccdf, style, label=label)
            fit = report["out_degree" if key == "_out" else "in_degree"]["fit"]
            if fit and label == "trained" and not fit["verdict"].startswith("no heavy tail"):
                k = np.unique(d[d >= fit["xmin"]])
                share = (d >= fit["xmin"]).mean()
                axis.loglog(k, share * (k / fit["xmin"]) ** (1 - fit["alpha"]), ":", color="k",
                            label=f"power-law fit α={fit['alpha']:.2f}, x_min={fit['xmin']}")  # fmt: skip
        fit = trained["out_degree" if key == "_out" else "in_degree"]["fit"]
        verdict = f"\ntrained: {fit['verdict']}" if fit else ""
        axis.set(xlabel="degree k", ylabel="P(K ≥ k)")
        axis.set_title(title + verdict, fontsize=8)
        axis.legend(fontsize=8)
    return figure


def plot_firing_rates(trained: dict, init: dict | None):
    """Histogram of per-neuron firing rates (share of positions x layers where the neuron is non-zero)."""
    figure = new_figure()
    bins = np.logspace(-5, 0, 41)
    for axis, k, kind in zip(figure.subplots(1, 3), range(3), ("a", "b", "a·b")):
        for report, label in ((trained, "trained"), (init, "initialisation")):
            if report is None:
                continue
            rates = report["_rates"][k].ravel()
            axis.hist(np.clip(rates, 1e-5, 1), bins=bins, histtype="step", label=label)
        axis.set(
            xscale="log", title=f"{kind}: firing rate per neuron", xlabel="rate (dead shown at 1e-5)", ylabel="neurons"
        )
        axis.legend(fontsize=8)
    return figure


def plot_sparsity_layers(trained: dict, init: dict | None):
    figure = new_figure()
    axes = figure.subplots(1, 2)
    for report, label, style in ((trained, "trained", "-o"), (init, "initialisation", "--x")):
        if report is None:
            continue
        for kind, color in zip(KINDS, ("C0", "C1", "C2")):
            axes[0].plot([row[kind] for row in report["per_layer"]], style, color=color, label=f"{kind} {label}")
    layers = range(len(trained["per_layer"]))
    axes[0].set(
        yscale="log", xlabel="layer", ylabel="active fraction", title="active fraction per layer", xticks=layers
    )
    axes[0].legend(fontsize=7)
    grid = np.array([[cell["ab"] for cell in row] for row in trained["per_layer_head"]])
    image = axes[1].imshow(grid.T, aspect="auto", cmap="viridis")
    axes[1].set(xlabel="layer", ylabel="head", title="trained: a·b active fraction", xticks=layers,
                yticks=range(grid.shape[1]))  # fmt: skip
    figure.colorbar(image, ax=axes[1])
    return figure


def plot_active_vs_loss(trained: dict):
    figure = new_figure(5.5, 4)
    axis = figure.subplots()
    rho = trained["active_vs_loss"]["ab"]["spearman"]
    axis.scatter(trained["_loss"], trained["_active"][2], s=3, alpha=0.3)
    axis.set(xlabel="next-byte loss (nats)", ylabel="a·b active fraction at the position",
             title=f"trained: Spearman ρ = {rho:.2f}" if rho is not None else "trained")  # fmt: skip
    return figure


def plot_graph_heatmap(model, whole: dict, limit: int = 512):
    """G across heads with its neurons ordered by Louvain community (largest first); the first `limit`
    neurons of that order, so a large model's heatmap stays readable. Head borders are not drawn: the
    blocks that show are communities, wherever their heads are."""
    order = torch.from_numpy(whole["_order"][:limit])
    decoder, encoder = whole_graph(model, whole["path"])
    with torch.no_grad():
        G = (decoder[order] @ encoder[:, order]).numpy()
    figure = new_figure(6, 5.2)
    axis = figure.subplots()
    scale = np.quantile(np.abs(G), 0.999)
    image = axis.imshow(G, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    axis.set(title=f"G = decoder · {whole['path']}, neurons by community", xlabel="to neuron", ylabel="from neuron")
    figure.colorbar(image, ax=axis)
    return figure


def strip_private(value):
    """The report without the raw arrays kept for plotting (keys starting with _)."""
    if isinstance(value, dict):
        return {k: strip_private(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [strip_private(v) for v in value]
    return value


def percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def contexts_block(title: str, contexts: list[dict]) -> str:
    """A neuron's strongest contexts: value, the text before, the byte it fired at (marked), a little after."""
    e = html.escape
    lines = "".join(
        f"{c['value']:8.3f}  {e(c['before'])}<mark>{e(c['byte'])}</mark>{e(c['after'])}\n" for c in contexts
    )
    return f"<h3>{e(title)}</h3><pre>{lines}</pre>"


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "pre{background:#f6f6f6;padding:4px;white-space:pre-wrap}mark{background:#fc6}"
)


def fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"


def spread(mean, sd) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {sd:.3f}"


def tail_words(fit: dict | None) -> str:
    """The tail in words: the verdict first; a power-law exponent only when a heavy tail is not ruled out."""
    if not fit:
        return "too short to fit"
    vs = f"Vuong LR vs exponential {fit['vs_exponential']['lr']:.1f} (p {fit['vs_exponential']['p']:.2g})"
    if fit["at_bound"]:
        return f"{fit['verdict']}: falls faster than any power law fitted from k >= {fit['xmin']}; {vs}"
    if fit["verdict"].startswith("no heavy tail"):
        return f"{fit['verdict']} from k >= {fit['xmin']} ({fit['tail']} neurons); {vs}"
    return f"{fit['verdict']}: alpha {fit['alpha']:.2f} from k >= {fit['xmin']} ({fit['tail']} neurons); {vs}"


def html_sparsity(s: dict, s0: dict) -> list[str]:
    rows = []
    for label, rep in (("trained", s), ("initialisation", s0)):
        rows.append([f"{label}: active", *(percent(rep["active"][k]) for k in KINDS)])
        rows.append([f"{label}: dead / always-on neurons", *(
            f"{rep['neurons'][k]['dead']} / {rep['neurons'][k]['always_on']}" for k in KINDS)])  # fmt: skip
        rows.append(
            [
                f"{label}: Spearman(active, loss) [window-bootstrap p]",
                *(f"{fmt(rep['active_vs_loss'][k]['spearman'])} [{fmt(rep['active_vs_loss'][k]['p'])}]" for k in KINDS),
            ]
        )
    return [
        "<h2>Sparsity</h2>",
        table(["", "a", "b", "a·b"], rows),
        f"<p>Mean loss on the sample: trained {s['loss']:.3f}, initialisation {s0['loss']:.3f} nats per byte. "
        "The p-value of Spearman's ρ resamples whole windows (positions inside a window are not independent).</p>",
        "<img src='sparsity_layers.png'><img src='firing_rates.png'><img src='active_vs_loss.png'>",
    ]


def html_graph(g: dict, g0: dict) -> list[str]:
    parts = [
        f"<h2>Neuron graph per head</h2><p>G = decoder_h · encoder_h per head; {g['edges']} edges kept (mean degree "
        f"{g['mean_degree']:.2f}). Louvain modularity, mean ± SD over seeds: trained "
        f"{spread(g['modularity'], g['modularity_sd'])} (degree-matched random graphs "
        f"{spread(g['null_modularity'], g['null_modularity_sd'])}); initialisation "
        f"{spread(g0['modularity'], g0['modularity_sd'])} (its random graphs "
        f"{spread(g0['null_modularity'], g0['null_modularity_sd'])}).</p>"
    ]
    header = ["head", "threshold", "edges", "modularity", "random", "communities", "largest", "init modularity"]
    rows = [[h["head"], f"{h['threshold']:.4g}", h["edges"], spread(h["modularity"], h["modularity_sd"]),
             spread(h["null_modularity"], h["null_modularity_sd"]), h["communities"], h["community_sizes"][:5],
             spread(h0["modularity"], h0["modularity_sd"])] for h, h0 in zip(g["heads"], g0["heads"])]  # fmt: skip
    parts.append(table(header, rows))
    rows = []
    for label, rep in (("trained", g), ("initialisation", g0)):
        for key in ("out_degree", "in_degree"):
            fit = rep[key]["fit"] or {}
            hubs = ", ".join(f"{x['neuron']} ({x['degree']})" for x in rep[key]["hubs"][:5])
            alpha = "" if fit.get("at_bound", True) else fmt(fit.get("alpha"))
            rows.append([f"{label} {key.replace('_', '-')}", fit.get("verdict", "too short"), alpha,
                         fit.get("xmin", ""), fmt(fit.get("vs_exponential", {}).get("lr")),
                         fmt(fit.get("vs_lognormal", {}).get("lr")), rep[key]["max"], hubs])  # fmt: skip
    header = ["", "tail", "α", "x_min", "LR vs exp", "LR vs lognormal", "max", "hubs"]
    return [*parts, table(header, rows), "<img src='degrees.png'>"]


def html_whole(whole: dict, whole0: dict) -> list[str]:
    rows = []
    for label, rep in (("trained", whole), ("initialisation", whole0)):
        for w in rep:
            rows.append([f"{label} {w['path']}", w["edges"], fmt(w["cross_head_share"]), fmt(w["within_head_max"]),
                         fmt(w["cross_head_max"]), spread(w["modularity"], w["modularity_sd"]),
                         spread(w["null_modularity"], w["null_modularity_sd"]),
                         (w["out_degree"]["fit"] or {}).get("verdict", "too short")])  # fmt: skip
    header = ["graph", "edges", "cross-head share", "max within", "max across", "modularity", "random", "out tail"]
    return [
        "<h2>The whole neuron graph</h2><p>G = decoder · encoder across all heads (the residual stream is shared), "
        "and decoder · encoder_v (how a neuron's output drives the value side b). A random choice of edges "
        f"would cross heads with share {fmt(whole[0]['random_cross_head_share'])}.</p>",
        table(header, rows),
        "<img src='graph_heatmap.png'>",
    ]


def html_selective(sel: dict, sel0: dict) -> list[str]:
    parts = [
        f"<h2>Selective neurons</h2><p>Context selectivity = {html.escape(sel['measure'])}. Median over "
        f"{sel['eligible']} eligible neurons: trained {fmt(sel['median_context_selectivity'])} (share above 2: "
        f"{fmt(sel['share_above_2'])}), initialisation {fmt(sel0['median_context_selectivity'])} (share above 2: "
        f"{fmt(sel0['share_above_2'])}). The older ratio top-k mean / mean (capped at "
        f"{sel['selectivity_ceiling']:.0f}): trained {fmt(sel['median_selectivity'])}, initialisation "
        f"{fmt(sel0['median_selectivity'])}.</p>"
    ]
    for n in sel["neurons"]:
        title = (f"{n['neuron']}: context selectivity {n['context_selectivity']:.2f} (top-k / mean "
                 f"{n['selectivity']:.1f}), fires at {n['fires']} positions")  # fmt: skip
        parts.append(contexts_block(title, n["contexts"]))
    return parts


def significance_table(t: dict, t0: dict, key: str) -> str:
    """Counts significant at 0.05 (raw, BH, Holm, permutation) and the best U and p, trained beside init."""
    rows = [[label, side["significant"]["raw"], side["significant"]["bh"], side["significant"]["holm"],
             fmt(side["significant"]["permutation"]), f"{side[key][0]['U']:.0f} / {side['pairs']}",
             f"{side['best_p_holm']:.2g}", fmt(side["best_p_permutation"])]
            for label, side in (("trained", t), ("initialisation", t0))]  # fmt: skip
    return table(["", "raw p", "BH", "Holm", "permutation", "best U", "best Holm p", "best permutation p"], rows)


def html_synapses(synapses: dict) -> list[str]:
    t, t0 = synapses["trained"], synapses["init"]
    if "skipped" in t:
        return [f"<h2>Probe on synapses</h2><p>Skipped: {html.escape(t['skipped'])}.</p>"]
    rows = [[n["synapse"], f"{n['U']:.0f} / {t['pairs']}", f"{n['p']:.2g}", f"{n['p_bh']:.2g}", f"{n['p_holm']:.2g}",
             fmt(n["p_permutation"]), f"{n['rank_biserial']:.3f}"] for n in t["synapses"]]  # fmt: skip
    return [
        "<h2>Probe on synapses</h2><p>The attention state each sentence leaves, σ[h, n, d] = Σ a[n]·x[d] over "
        f"its positions / its length, averaged over layers ({t['tested']} synapses h{{h}}:{{n}}~x{{d}}), "
        "concept against control, corrected as the neurons are. Significant at 0.05:</p>",
        significance_table(t, t0, "synapses"),
        table(["synapse", "U", "p", "p BH", "p Holm", "p perm", "rank-biserial"], rows),
    ]


def html_probe(probe: dict) -> list[str]:
    t, t0 = probe["trained"], probe["init"]
    parts = [
        f"<h2>Probe: concept against control</h2><p>{t['concept_sentences']} concept and "
        f"{t['control_sentences']} control sentences; a neuron's value is its {html.escape(t['signal'])} averaged "
        f"over the sentence; {t['tested']} neurons tested; {html.escape(t['correction'])}; permutation: "
        f"{t['permutations']} label shuffles, max |U| over neurons. Neurons significant at 0.05:</p>",
        significance_table(t, t0, "neurons"),
    ]
    rows = [[n["neuron"], f"{n['U']:.0f} / {t['pairs']}", f"{n['p']:.2g}", f"{n['p_bh']:.2g}", f"{n['p_holm']:.2g}",
             fmt(n["p_permutation"]), f"{n['rank_biserial']:.3f}", f"{n['concept_mean']:.4g}",
             f"{n['control_mean']:.4g}"] for n in t["neurons"]]  # fmt: skip
    parts.append(table(["neuron", "U", "p", "p BH", "p Holm", "p perm", "rank-biserial", "concept", "control"], rows))
    for n in t["neurons"]:
        if n.get("contexts"):
            parts.append(contexts_block(f"{n['neuron']}: strongest contexts in the corpus sample", n["contexts"]))
    return parts


def write_html(report: dict, path: Path) -> None:
    e, r = html.escape, report
    data = r["data"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>BDH inspect</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>BDH inspect</h1><p>Checkpoint <code>{e(r['checkpoint'])}</code>, step {r['step']}, "
        f"{e(json.dumps(r['model']))}; beside the same architecture at initialisation (seed {r['seed']}).</p>",
        f"<p>Corpus sample: {data['windows']} windows of {data['block_size']} bytes from <code>{e(str(data['path']))}"
        f"</code>, from byte {data['from_byte']} of {data['corpus_bytes']}.</p>",
    ]
    s, s0 = r["sparsity"]["trained"], r["sparsity"]["init"]
    parts += html_sparsity(s, s0)
    parts += html_graph(r["graph"]["trained"], r["graph"]["init"])
    parts += html_whole(r["whole_graph"]["trained"], r["whole_graph"]["init"])
    if s.get("selective"):
        parts += html_selective(s["selective"], s0["selective"])
    if r.get("probe"):
        parts += html_probe(r["probe"])
    if r.get("synapses"):
        parts += html_synapses(r["synapses"])
    parts.append(f"<p>Took {r['seconds']:.0f} s.</p></body></html>")
    path.write_text("".join(parts), encoding="utf-8")


def summary(report: dict, out: Path) -> str:
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    g, g0 = report["graph"]["trained"], report["graph"]["init"]
    rho = s["active_vs_loss"]["ab"]
    lines = [
        f"inspect {report['checkpoint']} (step {report['step']}) -> {out / 'report.html'}",
        "sparsity: active a {} b {} a*b {} (initialisation {} {} {}); Spearman(active a*b, loss) {} "
        "(window-bootstrap p {})".format(*(percent(s["active"][k]) for k in KINDS),
                                         *(percent(s0["active"][k]) for k in KINDS), fmt(rho["spearman"]), fmt(rho["p"])),
        f"graph: {g['edges']} edges, Louvain modularity {spread(g['modularity'], g['modularity_sd'])} (degree-matched "
        f"random {spread(g['null_modularity'], g['null_modularity_sd'])}; initialisation "
        f"{spread(g0['modularity'], g0['modularity_sd'])}), out-degree tail " + tail_words(g["out_degree"]["fit"]),
    ]  # fmt: skip
    sel = s.get("selective")
    if sel and sel["neurons"]:
        top = sel["neurons"][0]
        lines.append(f"most selective: {top['neuron']} ({top['context_selectivity']:.2f}x its shuffled-text value; "
                     f"median {fmt(sel['median_context_selectivity'])}, initialisation "
                     f"{fmt(s0['selective']['median_context_selectivity'])}), e.g. "
                     f"{top['contexts'][0]['before'][-20:]}[{top['contexts'][0]['byte']}]")  # fmt: skip
    if report["probe"]:
        t, t0 = report["probe"]["trained"], report["probe"]["init"]
        best = t["neurons"][0]
        lines.append(
            f"probe: {best['neuron']} U = {best['U']:.0f} of {t['pairs']}, p = {best['p']:.2g} (Holm "
            f"{best['p_holm']:.2g}); significant at BH 0.05: {t['significant']['bh']} neurons, initialisation "
            f"{t0['significant']['bh']}"
        )
    synapses = report.get("synapses") or {}
    if synapses and "skipped" not in synapses["trained"]:
        t, t0 = synapses["trained"], synapses["init"]
        lines.append(
            f"synapses: {t['synapses'][0]['synapse']} U = {t['synapses'][0]['U']:.0f} of {t['pairs']} (Holm "
            f"{t['best_p_holm']:.2g}); significant at BH 0.05: {t['significant']['bh']} of {t['tested']}, "
            f"initialisation {t0['significant']['bh']}"
        )
    return "\n".join(lines)


def write_report(report: dict, out: Path, figures: dict) -> None:
    """report.json (every number; arrays kept for plots left out), the PNGs and report.html into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        save_png(figure, out / name)
    (out / "report.json").write_text(json.dumps(strip_private(report), indent=1), encoding="utf-8")
    write_html(report, out / "report.html")


def trajectory_row(report: dict) -> dict:
    """One checkpoint's headline numbers, each beside its control, for the trajectory."""
    s, g = report["sparsity"]["trained"], report["graph"]["trained"]
    fit = g["out_degree"]["fit"] or {}
    selective = s.get("selective") or {}
    probe, synapses = report.get("probe") or {}, report.get("synapses") or {}
    return {
        "step": report["step"], "loss": s["loss"], "active_ab": s["active"]["ab"],
        "init_active_ab": report["sparsity"]["init"]["active"]["ab"],
        "modularity": g["modularity"], "modularity_sd": g["modularity_sd"], "null_modularity": g["null_modularity"],
        "init_modularity": report["graph"]["init"]["modularity"],
        "out_tail": fit.get("verdict"), "out_tail_lr_vs_exponential": fit.get("vs_exponential", {}).get("lr"),
        "cross_head_share": report["whole_graph"]["trained"][0]["cross_head_share"],
        "context_selective_share": selective.get("share_above_2"),
        "init_context_selective_share": (report["sparsity"]["init"].get("selective") or {}).get("share_above_2"),
        "probe_bh": probe["trained"]["significant"]["bh"] if probe else None,
        "init_probe_bh": probe["init"]["significant"]["bh"] if probe else None,
        **{f"{prefix}synapse_bh": synapses[side]["significant"]["bh"] if "significant" in synapses.get(side, {})
           else None for prefix, side in (("", "trained"), ("init_", "init"))},
    }  # fmt: skip


def plot_trajectory(rows: list[dict]):
    figure = new_figure(12, 6)
    axes = figure.subplots(2, 3).ravel()
    steps = [r["step"] for r in rows]
    panels = (
        ("a·b active fraction", (("active_ab", "trained"), ("init_active_ab", "initialisation"))),
        ("Louvain modularity", (("modularity", "trained"), ("null_modularity", "random graph"),
                                ("init_modularity", "initialisation"))),
        ("out-degree LR vs exponential (> 0: heavier)", (("out_tail_lr_vs_exponential", "trained"),)),
        ("probe: neurons significant (BH 0.05)", (("probe_bh", "trained"), ("init_probe_bh", "initialisation"))),
        ("probe: synapses significant (BH 0.05)", (("synapse_bh", "trained"), ("init_synapse_bh", "initialisation"))),
        ("share of neurons 2x stronger on text than shuffled", (("context_selective_share", "trained"),
                                                                 ("init_context_selective_share", "initialisation"))),
    )  # fmt: skip
    for axis, (title, series) in zip(axes, panels):
        for key, label in series:
            values = [r[key] for r in rows]
            if any(v is not None for v in values):
                axis.plot(steps, [np.nan if v is None else v for v in values], "-o", label=label)
        axis.set(title=title, xlabel="step")
        if axis.get_lines():
            axis.legend(fontsize=7)
        else:  # not measured (no probe, no fitted tail): say so, where matplotlib would warn of an empty legend
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    return figure


def write_trajectory(reports: list[dict], out: Path) -> None:
    rows = [trajectory_row(report) for report in reports]
    (out / "trajectory.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    save_png(plot_trajectory(rows), out / "trajectory.png")
