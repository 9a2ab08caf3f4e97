"""The `inspect` command: a checkpoint beside the same architecture at initialisation, every look in
graph, activations and probes, written by report. `inspect_checkpoint` is the library call behind it."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import find_last, read_checkpoint
from ..data.corpus import TINYSHAKESPEARE, download_tinyshakespeare, read_corpus
from ..errors import DataError, UsageError, finite_float, is_int, non_negative_int, positive_int
from ..files import atomic_output, write_failure
from ..model import BDH, BDHConfig
from ..weights import load_model_from_checkpoint
from .activations import CorpusSample, sparsity_report, strongest_contexts
from .graph import graph_report, whole_graph_report
from .options import DataOptions, GraphOptions, NeuronOptions, ProbeOptions, require_extra
from .probes import probe_report, read_sentences, synapse_report
from .report import (
    plot_active_vs_loss,
    plot_degrees,
    plot_firing_rates,
    plot_graph_heatmap,
    plot_sparsity_layers,
    summary,
    write_report,
    write_trajectory,
)

PASS_FLOPS = 2e12  # the default corpus sample's size: about this many FLOPs per model
PATHS = ("encoder", "encoder_v")  # the whole graph's two inputs a neuron's output reaches


def run_settings(ckpt: Path) -> dict:
    """The run's config.yaml (LightningCLI writes it beside the checkpoints folder), or {}."""
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        return {}
    import yaml  # a dependency of jsonargparse

    try:
        settings = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, OSError):
        return {}
    return settings if isinstance(settings, dict) else {}


def model_at_init(config: BDHConfig, seed: int) -> BDH:
    """The architecture as `fit` initialises it: the global seed, then the weights drawn in BDH's order."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return BDH(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def check_output(output: Path) -> None:
    """An output folder must be new, empty, or hold an earlier report (which is replaced)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for the report")
    earlier = (output / "report.json").is_file() or (output / "trajectory.json").is_file()
    if output.is_dir() and any(output.iterdir()) and not earlier:
        raise UsageError(
            f"--output {output} holds other files; give a new or empty folder (an earlier report there is replaced)"
        )


def open_sample(data: DataOptions, settings: dict, model: BDH) -> tuple[CorpusSample, str]:
    run_data = settings.get("data") or {}
    path = data.path or run_data.get("path")
    if not path:
        raise UsageError("no corpus: the run's config.yaml names none; give --data.path FILE")
    corpus_path = download_tinyshakespeare() if path == TINYSHAKESPEARE else path
    try:
        corpus = read_corpus(str(corpus_path))
    except DataError as error:
        hint = "" if data.path else " (the run's data.path; give --data.path)"
        raise DataError(f"{error}{hint}") from None
    block = data.block_size or min(int(run_data.get("block_size") or 256), 256)
    if not is_int(block) or block < 2:
        raise UsageError(f"data.block_size must be an integer of at least 2 (bytes per window), got {block!r}")
    windows = data.windows
    if windows is None:
        c = model.config
        flops_per_window = 6 * c.n_head * c.n_embd * c.neurons_per_head * c.n_layer * block  # the N-wide products
        windows = min(16, max(2, round(PASS_FLOPS / flops_per_window)))
    positive_int("data.windows", windows, UsageError)
    fraction = data.val_fraction if data.val_fraction is not None else float(run_data.get("val_fraction") or 0.1)
    finite_float("data.val_fraction", fraction, 0.0, 1.0, low_open=True, error=UsageError)
    return CorpusSample(corpus, block, windows, fraction), str(path)


def check_options(graph: GraphOptions, neurons: NeuronOptions, probe: ProbeOptions) -> None:
    finite_float("graph.mean_degree", graph.mean_degree, 0.0, low_open=True, error=UsageError)
    if graph.threshold is not None:
        finite_float("graph.threshold", graph.threshold, error=UsageError)
    non_negative_int("graph.hubs", graph.hubs, UsageError)
    non_negative_int("probe.permutations", probe.permutations, UsageError)
    for name, value in (("neurons.top", neurons.top), ("neurons.contexts", neurons.contexts),
                        ("probe.top", probe.top), ("graph.seeds", graph.seeds)):  # fmt: skip
        positive_int(name, value, UsageError)
    non_negative_int("neurons.width", neurons.width, UsageError)
    if (probe.concept is None) != (probe.control is None):
        raise UsageError("give both --probe.concept and --probe.control (one sentence per line each), or neither")


def run_seed(seed: int | None, settings: dict) -> int:
    """The seed given, else the run's seed_everything, else 1337 (fit's default)."""
    chosen = settings.get("seed_everything") if seed is None else seed
    return chosen if is_int(chosen) else 1337


def inspect_models(model: BDH, init: BDH, sample: CorpusSample, graph: GraphOptions, neurons: NeuronOptions,
                   probe: ProbeOptions, sentences: tuple | None) -> dict:  # fmt: skip
    """Every look, on the trained model and at initialisation (the init graph keeps the trained edge counts)."""
    graph_trained = graph_report(model, graph)
    graph_init = graph_report(init, graph, edges_per_head=[h["edges"] for h in graph_trained["heads"]])
    whole = [whole_graph_report(model, graph, path) for path in PATHS]
    # The random model's whole graph is its own random baseline (per head, measured equal): no null draws there.
    whole_init = [whole_graph_report(init, graph, w["path"], edges=w["edges"], null=False) for w in whole]
    sparsity_trained, sparsity_init = sparsity_report(model, sample, neurons), sparsity_report(init, sample, neurons)
    probe_result, synapses = None, None
    if sentences:
        sides = (("trained", model), ("init", init))
        probe_result = {side: probe_report(m, *sentences, neurons.signal, probe.top, probe.permutations)
                        for side, m in sides}  # fmt: skip
        synapses = {side: synapse_report(m, *sentences, probe.top, probe.permutations) for side, m in sides}
        for neuron in probe_result["trained"]["neurons"]:
            neuron["contexts"] = strongest_contexts(sparsity_trained, sample, neuron["index"], neurons.width)
    return {"sparsity": {"trained": sparsity_trained, "init": sparsity_init},
            "graph": {"trained": graph_trained, "init": graph_init},
            "whole_graph": {"trained": whole, "init": whole_init}, "probe": probe_result,
            "synapses": synapses}  # fmt: skip


def figures(model: BDH, report: dict) -> dict:
    s, g = report["sparsity"], report["graph"]
    return {
        "degrees.png": plot_degrees(g["trained"], g["init"]),
        "firing_rates.png": plot_firing_rates(s["trained"], s["init"]),
        "sparsity_layers.png": plot_sparsity_layers(s["trained"], s["init"]),
        "active_vs_loss.png": plot_active_vs_loss(s["trained"]),
        "graph_heatmap.png": plot_graph_heatmap(model, report["whole_graph"]["trained"][0]),
    }


def inspect_command(
    ckpt_path: str = "last",
    output: str = "inspect",
    data: DataOptions = DataOptions(),
    graph: GraphOptions = GraphOptions(),
    neurons: NeuronOptions = NeuronOptions(),
    probe: ProbeOptions = ProbeOptions(),
    seed: int | None = None,
    logs: str = "lightning_logs",
) -> int:
    """See what a BDH run learned: the neuron graph, sparsity maps and monosemantic neurons.

    Writes OUTPUT/report.html (with PNG plots beside it) and OUTPUT/report.json (every number), and prints
    a summary. Every section compares the trained model with the same architecture at initialisation.

    Args:
        ckpt_path: A checkpoint written by fit, `last` (the newest run's last.ckpt under --logs), or a folder:
            every checkpoint under it, one report per step in OUTPUT/step_N and the trajectory
            (OUTPUT/trajectory.png and trajectory.json: sparsity, modularity, tail, significant neurons by step).
        output: Folder for the report: new, empty, or holding an earlier report (replaced).
        data: The corpus sample the activations are measured on.
        graph: The neuron graph G = decoder_h @ encoder_h per head, and across heads.
        neurons: The most selective neurons and their strongest contexts.
        probe: Concept-against-control sentences (both files, or neither).
        seed: Seed of the model at initialisation (default: the run's seed_everything, else 1337).
        logs: Where `last` is looked for.
    """
    started = time.perf_counter()
    require_extra()
    ckpt = find_last(logs) if ckpt_path == "last" else Path(ckpt_path)
    out = Path(output)
    check_output(out)
    check_options(graph, neurons, probe)
    sentences = None
    if probe.concept:
        sentences = (read_sentences(probe.concept, "probe.concept"), read_sentences(probe.control, "probe.control"))
    looks = (data, graph, neurons, probe, seed, sentences)
    try:  # the report is written whole or not at all: a full disk leaves the earlier report (or nothing)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure(f"--output {out}", error) from None
    with atomic_output(out, what=f"--output {out}", folder=True) as folder:
        lines = write_reports(ckpt, folder, out, looks, started)
    print("\n".join(lines))
    return 0


def write_reports(ckpt: Path, folder: Path, out: Path, looks: tuple, started: float) -> list[str]:
    """Write one checkpoint's report (or, for a run folder, one per step and the trajectory) into `folder`, which
    becomes `out`; the lines to print."""
    if not ckpt.is_dir():
        report = inspect_checkpoint(ckpt, folder, *looks)
        report["seconds"] = time.perf_counter() - started
        write_report(report, folder, figures(report.pop("_model"), report))
        return [summary(report, out)]
    reports, lines = [], []
    for step, path in run_checkpoints(ckpt):
        report = inspect_checkpoint(path, folder / f"step_{step}", *looks)
        write_report(report, folder / f"step_{step}", figures(report.pop("_model"), report))
        reports.append(report)
        lines.append(summary(report, out / f"step_{step}").splitlines()[1])
    write_trajectory(reports, folder)
    return [
        *lines,
        f"trajectory over {len(reports)} checkpoints -> {out / 'trajectory.png'}, {out / 'trajectory.json'}",
    ]


def inspect_checkpoint(ckpt: Path, out: Path, data, graph, neurons, probe, seed, sentences) -> dict:
    """One checkpoint beside its initialisation: the report (the trained model kept under _model for plots)."""
    model = load_model_from_checkpoint(ckpt)
    settings = run_settings(ckpt)
    sample, corpus_name = open_sample(data, settings, model)
    seed = run_seed(seed, settings)
    c = model.config
    return {
        "checkpoint": str(ckpt),
        "step": read_checkpoint(ckpt).get("global_step") if ckpt.suffix == ".ckpt" else None,  # weights: none
        "model": {**c.architecture(), "neurons_per_head": c.neurons_per_head},
        "seed": seed,
        "data": {
            "path": corpus_name,
            "windows": len(sample.offsets),
            "block_size": sample.block_size,
            "from_byte": sample.split_start,
            "corpus_bytes": len(sample.corpus),
        },  # fmt: skip
        "options": {"graph": asdict(graph), "neurons": asdict(neurons), "probe": asdict(probe)},
        **inspect_models(model, model_at_init(c, seed), sample, graph, neurons, probe, sentences),
        "seconds": 0.0,
        "_model": model,
    }


def run_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under `folder`, one per step (last.ckpt is usually another's copy)."""
    found = {}
    for path in sorted(folder.rglob("*.ckpt")):
        step = read_checkpoint(path).get("global_step")
        if is_int(step):
            found.setdefault(step, path)
    if not found:
        raise UsageError(f"--ckpt_path {folder} is a folder with no checkpoints (*.ckpt) in it; give a run's folder")
    return sorted(found.items())
