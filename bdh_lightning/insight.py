"""What a BDH run learned (`inspect`): the neuron graph, sparsity maps and monosemantic neurons.

Three looks at a checkpoint, each beside the same architecture at initialisation (the run's seed), so what
training produced is told apart from what random matrices give (arXiv 2509.26507, sections 5 and 6):

- The neuron graph. Per head, G = decoder_h @ encoder_h (N x N through the D bottleneck): G[i, j] is how
  much neuron i's output excites neuron j's input in the next layer. Thresholded blockwise with torch into
  a sparse edge list (never a dense N x N Python structure), then degrees, a power-law tail fit and
  Louvain communities (networkx).
- Sparsity. a = relu(x E), b = relu(y Ev) and a*b over corpus windows, read through
  `layer.neuron_activations` one head at a time, as the sparsity monitor does.
- Neurons. The layer's weights are shared by all layers, so neuron n of head h is the same neuron in every
  layer; its value at a position is its activation averaged over the layers. The most selective neurons
  with their strongest contexts, and concept-versus-control probes ranked by Mann-Whitney U.

`inspect_command` is the command; `InsightMonitor` puts the graph and firing rates in TensorBoard during fit.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from .checkpoints import find_last, read_checkpoint
from .data import TINYSHAKESPEARE, download_tinyshakespeare, read_corpus
from .errors import (
    ConfigError,
    DataError,
    UsageError,
    finite_float,
    is_int,
    non_negative_int,
    positive_int,
)
from .layer import decode, layer_output, neuron_activations, rope_cos_sin
from .model import BDH, BDHConfig
from .monitor import logged_step
from .weights import load_model_from_checkpoint

KINDS = ("a", "b", "ab")  # relu(x E), relu(y Ev), their product a*b (what the decoder reads)
ALWAYS_ON = 0.99  # a neuron firing at this share of positions or more counts as always on
MAX_EDGES_PER_NEURON = 100  # a --graph.threshold that keeps more edges than this per neuron is refused
ALPHA_MAX = 8.0  # the largest power-law exponent fitted
MAX_SENTENCE = 1024  # probe sentences are cut to this many bytes
PASS_FLOPS = 2e12  # the default corpus sample's size: about this many FLOPs per model
ELEMENT_BUDGET = 1 << 25  # float32 entries of one batch's (positions x H*N) buffer: 128 MB


# ---------------------------------------------------------------------------------------------------------
# Options (the command's option groups: --data.*, --graph.*, --neurons.*, --probe.*)


@dataclass(frozen=True)
class DataOptions:
    """The corpus sample the activations are measured on.

    Args:
        path: Corpus file, directory or glob (default: the run's data.path, from config.yaml beside the
            checkpoint's folder; `tinyshakespeare` is the cached download).
        windows: Windows read, evenly spaced over the held-out split (the last val_fraction of the corpus).
            Default: 16, fewer for large models so that one pass costs about 2 TFLOP (24gb: 5 windows of 256).
        block_size: Bytes per window (default: the run's data.block_size, at most 256).
        val_fraction: Share of the corpus, from its end, the windows come from (default: the run's, else 0.1);
            1 = the whole corpus.
    """

    path: str | None = None
    windows: int | None = None
    block_size: int | None = None
    val_fraction: float | None = None


@dataclass(frozen=True)
class GraphOptions:
    """The neuron graph G = decoder_h @ encoder_h per head.

    Args:
        threshold: Keep edges i -> j with G[i, j] above this (default: per head, the value that keeps
            mean_degree * N edges, the paper's sparse graph). The model at initialisation keeps as many
            edges as the trained one, for a like-for-like comparison.
        mean_degree: Edges per neuron kept when no threshold is given.
        hubs: How many highest-degree neurons to list.
        seed: Seed of Louvain and of the degree-matched random graph.
    """

    threshold: float | None = None
    mean_degree: float = 5.0
    hubs: int = 10
    seed: int = 0


@dataclass(frozen=True)
class NeuronOptions:
    """The most selective neurons and their strongest contexts.

    Args:
        top: How many of the most selective neurons to show (selectivity = mean of a neuron's `contexts`
            largest values / its mean over all positions, among neurons that fire at 2 * contexts
            positions or more).
        contexts: Strongest contexts shown per neuron.
        width: Bytes of text shown before each context's position (and a quarter of that after).
        signal: The neuron value used here and by the probe: a, b, or ab (a*b, the neuron's output).
    """

    top: int = 8
    contexts: int = 8
    width: int = 40
    signal: Literal["a", "b", "ab"] = "ab"


@dataclass(frozen=True)
class ProbeOptions:
    """Neurons that tell concept sentences from control sentences (the paper's monosemanticity test).

    Args:
        concept: Text file, one concept sentence per line (UTF-8; empty lines are skipped, long ones cut
            to 1,024 bytes).
        control: Text file, one control sentence per line. Needed with concept.
        top: How many neurons to report, ranked by Mann-Whitney U of their mean value per sentence
            (concept above control), with the two-sided p-value and the rank-biserial correlation.
    """

    concept: str | None = None
    control: str | None = None
    top: int = 10


# ---------------------------------------------------------------------------------------------------------
# The neuron graph


@torch.no_grad()
def head_graph(model: BDH, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_h: N x D, encoder_h: D x N) in float32, whose product is head `head`'s N x N graph G."""
    N = model.config.neurons_per_head
    return model.decoder[head * N : (head + 1) * N].float(), model.encoder[head].float()


@torch.no_grad()
def thresholded_edges(
    decoder_h: torch.Tensor, encoder_h: torch.Tensor, threshold: float | None = None, edges: int | None = None,
    block_rows: int = 1024,
) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """The sparse graph {i -> j : G[i, j] > threshold, i != j} of G = decoder_h @ encoder_h, computed by row blocks.

    Give `threshold`, or `edges` to keep the largest that many entries (the threshold is then the smallest
    kept value). Returns (src, dst) int64 arrays and the threshold. Only one block of G exists at a time.
    """
    N = decoder_h.shape[0]
    sources, targets = [], []
    device = decoder_h.device  # G's blocks are computed where the weights are (a GPU during fit)
    best_values = torch.empty(0, device=device)
    best_index = torch.empty(0, dtype=torch.long, device=device)
    kept = 0
    for start in range(0, N, block_rows):
        block = decoder_h[start : start + block_rows] @ encoder_h  # rows, N
        rows = torch.arange(block.shape[0], device=device)
        block[rows, rows + start] = -math.inf  # no self-loops
        if threshold is None:
            values, index = block.flatten().topk(min(edges, block.numel()))
            best_values = torch.cat([best_values, values])
            best_index = torch.cat([best_index, index + start * N])
            if best_values.numel() > edges:
                best_values, keep = best_values.topk(edges)
                best_index = best_index[keep]
        else:
            hits = (block > threshold).nonzero()
            kept += hits.shape[0]
            if kept > MAX_EDGES_PER_NEURON * N:
                raise UsageError(
                    f"graph.threshold {threshold:g} keeps more than {MAX_EDGES_PER_NEURON} edges per neuron; "
                    "raise it, or leave it out to keep graph.mean_degree edges per neuron"
                )
            sources.append((hits[:, 0] + start).cpu())
            targets.append(hits[:, 1].cpu())
    if threshold is None:
        best_index = best_index[best_values > -math.inf]  # never the diagonal, even when edges > N * (N - 1)
        best_values = best_values[best_values > -math.inf]
        order = best_index.sort().values.cpu()
        return (order // N).numpy(), (order % N).numpy(), float(best_values.min()) if best_values.numel() else math.inf
    src = torch.cat(sources) if sources else torch.empty(0, dtype=torch.long)
    dst = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return src.numpy(), dst.numpy(), float(threshold)


def degrees(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(in-degree, out-degree) of every node of the directed graph with edges src -> dst."""
    return np.bincount(dst, minlength=n), np.bincount(src, minlength=n)


def fit_power_law(values: np.ndarray, max_candidates: int = 60, min_tail: int = 50) -> dict | None:
    """Discrete power-law tail P(k) ~ k^-alpha for k >= x_min, by maximum likelihood (Clauset, Shalizi and
    Newman 2009): for each candidate x_min the likelihood's alpha, keeping the x_min whose tail is closest
    to the fit in Kolmogorov-Smirnov distance. alpha is searched in [1.01, ALPHA_MAX]; `at_bound` says the
    tail falls faster than any power law there (no heavy tail). None when fewer than `min_tail` positive
    values exist."""
    from scipy.optimize import minimize_scalar
    from scipy.special import zeta

    x = np.sort(np.asarray(values, dtype=np.int64))
    x = x[x > 0]
    if x.size < min_tail:
        return None
    candidates = np.unique(x)
    candidates = candidates[np.searchsorted(x, candidates) <= x.size - min_tail]  # a tail of min_tail or more
    if candidates.size > max_candidates:
        candidates = np.unique(candidates[np.linspace(0, candidates.size - 1, max_candidates).round().astype(int)])
    best = None
    for xmin in candidates:
        tail = x[x >= xmin]
        log_sum = np.log(tail).sum()

        def negative_log_likelihood(alpha, n=tail.size, xmin=xmin, log_sum=log_sum):
            return alpha * log_sum + n * math.log(zeta(alpha, xmin))

        alpha = float(minimize_scalar(negative_log_likelihood, bounds=(1.01, ALPHA_MAX), method="bounded").x)
        values_, counts = np.unique(tail, return_counts=True)
        empirical = 1.0 - np.concatenate([[0], np.cumsum(counts)[:-1]]) / tail.size  # P(K >= k), data
        model = zeta(alpha, values_) / zeta(alpha, xmin)  # P(K >= k), fit
        ks = float(np.abs(empirical - model).max())
        if best is None or ks < best["ks"]:
            best = {
                "alpha": alpha,
                "xmin": int(xmin),
                "tail": int(tail.size),
                "ks": ks,
                "at_bound": alpha > ALPHA_MAX - 0.01,
            }
    return best


def undirected_edges(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The distinct undirected pairs (u < v) of a directed edge list, as an (E, 2) array."""
    pairs = np.stack([np.minimum(src, dst), np.maximum(src, dst)], axis=1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def modularity(pairs: np.ndarray, labels: np.ndarray) -> float:
    """Newman modularity of an undirected simple graph (its (E, 2) pairs) split by node `labels`:
    the sum over communities of (edges inside) / E - (degree sum / 2E)^2."""
    m = len(pairs)
    if m == 0:
        return 0.0
    degree = np.bincount(pairs.ravel(), minlength=len(labels))
    inside = np.bincount(labels[pairs[labels[pairs[:, 0]] == labels[pairs[:, 1]], 0]], minlength=labels.max() + 1)
    total = np.bincount(labels, weights=degree, minlength=labels.max() + 1)
    return float((inside / m - (total / (2 * m)) ** 2).sum())


def louvain_modularity(src: np.ndarray, dst: np.ndarray, n: int, seed: int) -> tuple[float, list[set[int]]]:
    """Newman modularity of the Louvain communities of the undirected simple graph, and the communities
    (largest first; isolated neurons left out)."""
    import networkx as nx

    pairs = undirected_edges(src, dst)
    if len(pairs) == 0:
        return 0.0, []
    graph = nx.Graph()
    graph.add_edges_from(pairs.tolist())  # only neurons with an edge become nodes
    communities = sorted(nx.community.louvain_communities(graph, seed=seed), key=len, reverse=True)
    labels = np.zeros(n, dtype=np.int64)
    for label, community in enumerate(communities):
        labels[list(community)] = label
    return modularity(pairs, labels), communities


def degree_matched_null(src: np.ndarray, dst: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random graph with the same in- and out-degrees: the targets shuffled among the edges (self-loops dropped)."""
    shuffled = np.random.default_rng(seed).permutation(dst)
    keep = shuffled != src
    return src[keep], shuffled[keep]


def graph_report(
    model: BDH, options: GraphOptions = GraphOptions(), edges_per_head: list[int] | None = None, null: bool = True
) -> dict:
    """The neuron graph of every head: edges, threshold, Louvain modularity (and that of a degree-matched
    random graph), communities, in/out degrees pooled over heads with power-law tail fits, and hubs.

    `edges_per_head` keeps that many edges per head instead of using the options' threshold rule (used to
    give the model at initialisation the trained model's edge counts).
    """
    c = model.config
    N = c.neurons_per_head
    heads, in_degrees, out_degrees = [], [], []
    for h in range(c.n_head):
        decoder_h, encoder_h = head_graph(model, h)
        if edges_per_head is not None:
            src, dst, threshold = thresholded_edges(decoder_h, encoder_h, edges=edges_per_head[h])
        elif options.threshold is not None:
            src, dst, threshold = thresholded_edges(decoder_h, encoder_h, threshold=options.threshold)
        else:
            src, dst, threshold = thresholded_edges(decoder_h, encoder_h, edges=max(1, round(options.mean_degree * N)))
        head_modularity, communities = louvain_modularity(src, dst, N, options.seed)
        sizes = [len(community) for community in communities]
        null_modularity = None
        if null:
            null_modularity, _ = louvain_modularity(*degree_matched_null(src, dst, options.seed), N, options.seed)
        d_in, d_out = degrees(src, dst, N)
        in_degrees.append(d_in)
        out_degrees.append(d_out)
        heads.append({
            "head": h, "edges": int(src.size), "threshold": threshold, "modularity": head_modularity,
            "null_modularity": null_modularity, "communities": sum(1 for s in sizes if s >= 2),
            "community_sizes": sizes[:20], "isolated": int(((d_in + d_out) == 0).sum()),
        })  # fmt: skip
    d_in, d_out = np.concatenate(in_degrees), np.concatenate(out_degrees)

    def hubs(d: np.ndarray) -> list[dict]:
        top = np.argsort(-d, kind="stable")[: options.hubs]
        return [{"neuron": neuron_name(int(i) // N, int(i) % N), "degree": int(d[i])} for i in top]

    return {
        "heads": heads,
        "edges": sum(h["edges"] for h in heads),
        "mean_degree": sum(h["edges"] for h in heads) / (c.n_head * N),
        "modularity": float(np.mean([h["modularity"] for h in heads])),
        "null_modularity": float(np.mean([h["null_modularity"] for h in heads])) if null else None,
        "in_degree": {"max": int(d_in.max()), "fit": fit_power_law(d_in), "hubs": hubs(d_in)},
        "out_degree": {"max": int(d_out.max()), "fit": fit_power_law(d_out), "hubs": hubs(d_out)},
        "_in": d_in,  # raw degrees for the plots; dropped from report.json
        "_out": d_out,
    }


def neuron_name(head: int, neuron: int) -> str:
    return f"h{head}:{neuron}"


# ---------------------------------------------------------------------------------------------------------
# Activations: sparsity, firing rates, per-position loss, neuron values pooled over layers


@dataclass
class Activations:
    """What one pass over windows saw. Counts are of non-zero entries; `pooled` is (B, T, H, N) or None."""

    counts: torch.Tensor  # (n_layer, n_head, 3): non-zero a, b, a*b per layer and head
    fires: torch.Tensor  # (3, n_head, N): positions x layers where each neuron's a, b, a*b was non-zero
    position_active: torch.Tensor  # (3, B, T): non-zero a, b, a*b per position over layers, heads, neurons
    loss: torch.Tensor | None  # (B, T) next-byte cross-entropy, when targets were given
    pooled: torch.Tensor | None  # (B, T, H, N) the chosen signal averaged over layers, when asked


@torch.no_grad()
def activation_pass(
    model: BDH, idx: torch.Tensor, targets: torch.Tensor | None = None, signal: str | None = None
) -> Activations:
    """The model's forward without dropout, one head at a time (as `monitor.count_active`), recording the
    activations' statistics; with `signal` ("a", "b" or "ab") also that value per neuron, averaged over layers."""
    c = model.config
    B, T = idx.shape
    H, N, L = c.n_head, c.neurons_per_head, c.n_layer
    cos, sin = rope_cos_sin(torch.arange(T, device=idx.device), N)
    counts = torch.zeros(L, H, 3, dtype=torch.long)
    fires = torch.zeros(3, H, N, dtype=torch.long)
    position_active = torch.zeros(3, B, T, dtype=torch.long)
    pooled = torch.zeros(B, T, H, N) if signal else None
    x = model.embed_bytes(idx)
    for layer in range(L):
        u = 0
        for h in range(H):
            a, b = neuron_activations(x, model.encoder[h : h + 1], model.encoder_v[h : h + 1], cos, sin)
            ab = a * b
            for k, value in enumerate((a, b, ab)):
                active = (value[:, 0] > 0).float()  # B, T, N; float sums are exact here and faster than bool's
                per_position = active.sum(-1)  # at most N
                counts[layer, h, k] = per_position.double().sum().long().cpu()
                fires[k, h] += active.sum((0, 1)).long().cpu()  # at most B * T
                position_active[k] += per_position.long().cpu()
            if pooled is not None:
                pooled[:, :, h] += {"a": a, "b": b, "ab": ab}[signal][:, 0].float().cpu()
            u = u + decode(ab, model.decoder[h * N : (h + 1) * N])
        x = layer_output(x, u)
    loss = None
    if targets is not None:
        logits = model.logits(x).float()
        loss = (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            .view(B, T)
            .cpu()
        )
    if pooled is not None:
        pooled /= L
    return Activations(counts, fires, position_active, loss, pooled)


def windows_per_batch(model: BDH, block_size: int) -> int:
    """Windows per pass so that one (positions x H*N) float32 buffer stays near ELEMENT_BUDGET."""
    c = model.config
    return max(1, ELEMENT_BUDGET // (block_size * c.n_head * c.neurons_per_head))


class CorpusSample:
    """`windows` windows of block_size + 1 bytes, evenly spaced over [start, len(corpus))."""

    def __init__(self, corpus, block_size: int, windows: int, val_fraction: float):
        self.corpus, self.block_size = corpus, block_size
        size = len(corpus)
        if size < block_size + 1:
            raise DataError(
                f"the corpus has {size} bytes, fewer than one window of data.block_size + 1 = {block_size + 1}; "
                "use a smaller --data.block_size or more data"
            )
        start = min(int(size * (1.0 - val_fraction)), size - (block_size + 1))
        self.split_start = start
        self.offsets = np.unique(np.linspace(start, size - (block_size + 1), windows).round().astype(np.int64))

    def batches(self, per_batch: int):
        for i in range(0, len(self.offsets), per_batch):
            offsets = self.offsets[i : i + per_batch]
            w = self.corpus.windows(offsets, self.block_size + 1)
            yield offsets, w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def context(self, offset: int, width: int) -> dict:
        """The bytes around corpus position `offset` (the byte the neuron read at that position)."""
        before = self.corpus.read(max(0, offset - width), min(width, offset))
        after_length = min(max(1, width // 4), len(self.corpus) - offset - 1)
        after = self.corpus.read(offset + 1, after_length)
        return {
            "before": show_bytes(before),
            "byte": show_bytes(self.corpus.read(offset, 1)),
            "after": show_bytes(after),
        }


def show_bytes(data) -> str:
    """Bytes as readable text: UTF-8 with invalid bytes as \\xNN and newlines as the ↵ sign."""
    return bytes(data).decode("utf-8", errors="backslashreplace").replace("\n", "↵")


def sparsity_report(model: BDH, sample: CorpusSample, neurons: NeuronOptions | None = None) -> dict:
    """Active fractions per layer and head, firing-rate statistics, active fraction against loss per position;
    with `neurons`, also the most selective neurons and their strongest contexts."""
    from scipy.stats import spearmanr

    c = model.config
    H, N, L = c.n_head, c.neurons_per_head, c.n_layer
    k = neurons.contexts if neurons else 0
    counts, fires, positions = 0, 0, 0
    active_per_position, loss_per_position = [], []
    total = torch.zeros(H * N)  # the pooled signal summed over positions
    nonzero = torch.zeros(H * N, dtype=torch.long)
    top_values, top_offsets = torch.empty(0, H * N), torch.empty(0, H * N, dtype=torch.long)
    for offsets, idx, targets in sample.batches(windows_per_batch(model, sample.block_size)):
        seen = activation_pass(model, idx, targets, signal=neurons.signal if neurons else None)
        counts = counts + seen.counts
        fires = fires + seen.fires
        positions += idx.numel()
        # Position 0 is left out: with nothing before it to attend to, y = 0 and b = 0 there by construction.
        active_per_position.append(seen.position_active[:, :, 1:].reshape(3, -1))
        loss_per_position.append(seen.loss[:, 1:].reshape(-1))
        if neurons:
            values = seen.pooled.reshape(-1, H * N)  # positions, H*N
            total += values.sum(0)
            nonzero += (values > 0).sum(0)
            # Corpus offset of each position: the window's start plus the position in it.
            where = torch.from_numpy(offsets).repeat_interleave(idx.shape[1]) + torch.arange(idx.shape[1]).repeat(
                len(offsets)
            )
            batch_values, batch_index = values.topk(min(k, values.shape[0]), dim=0)
            top_values = torch.cat([top_values, batch_values])
            top_offsets = torch.cat([top_offsets, where[batch_index]])
            if top_values.shape[0] > k:
                top_values, keep = top_values.topk(k, dim=0)
                top_offsets = top_offsets.gather(0, keep)
    per_layer_head = (counts.double() / (positions * N)).tolist()  # fractions, [layer][head][kind]
    per_layer = (counts.sum(1).double() / (positions * H * N)).tolist()
    overall = (counts.sum((0, 1)).double() / (positions * H * N * L)).tolist()
    rates = fires.double() / (positions * L)  # 3, H, N
    active = torch.cat(active_per_position, dim=1).double() / (L * H * N)  # 3, positions
    loss = torch.cat(loss_per_position).double()
    correlation = {}
    for kind, fraction in zip(KINDS, active):
        rho, p = spearmanr(fraction.numpy(), loss.numpy())
        correlation[kind] = {"spearman": finite_or_none(rho), "p": finite_or_none(p)}
    report = {
        "positions": positions,
        "active": dict(zip(KINDS, overall)),
        "per_layer": [dict(zip(KINDS, row)) for row in per_layer],
        "per_layer_head": [[dict(zip(KINDS, cell)) for cell in row] for row in per_layer_head],
        "neurons": {
            kind: {
                "dead": int((rates[i] == 0).sum()),
                "always_on": int((rates[i] >= ALWAYS_ON).sum()),
                "median_rate": float(rates[i].median()),
            }
            for i, kind in enumerate(KINDS)
        },
        "loss": float(loss.mean()),
        "active_vs_loss": correlation,
        "_rates": rates.numpy(),  # for the plots
        "_active": active.numpy(),
        "_loss": loss.numpy(),
    }
    if neurons:
        report["_strongest"] = (top_values, top_offsets)  # per neuron: its largest values, where in the corpus
        report["selective"] = selective_neurons(total / positions, nonzero, top_values, top_offsets, sample, neurons, N)
    return report


def strongest_contexts(report: dict, sample: CorpusSample, neuron: int, width: int) -> list[dict]:
    """Where neuron `neuron` (h * N + n) fired strongest in the sample: the bytes around, its value."""
    values, offsets = report["_strongest"]
    return [
        {
            **sample.context(int(offsets[j, neuron]), width),
            "value": float(values[j, neuron]),
            "offset": int(offsets[j, neuron]),
        }
        for j in range(values.shape[0])
        if values[j, neuron] > 0
    ]


def selective_neurons(
    mean, nonzero, top_values, top_offsets, sample: CorpusSample, options: NeuronOptions, N: int
) -> dict:
    """The neurons whose strongest values stand farthest above their mean, with those contexts."""
    eligible = (nonzero >= 2 * options.contexts) & (mean > 0)
    selectivity = torch.where(eligible, top_values.mean(0) / mean.clamp_min(1e-30), torch.zeros_like(mean))
    chosen = [int(i) for i in selectivity.argsort(descending=True)[: options.top] if eligible[i]]
    shown = []
    for i in chosen:
        contexts = strongest_contexts({"_strongest": (top_values, top_offsets)}, sample, i, options.width)
        shown.append({
            "neuron": neuron_name(i // N, i % N), "selectivity": float(selectivity[i]), "mean": float(mean[i]),
            "fires": int(nonzero[i]), "contexts": contexts,
        })  # fmt: skip
    scores = selectivity[eligible]
    return {
        "measure": f"mean of the {options.contexts} largest {options.signal} values / mean over all positions "
        f"(value = {options.signal} averaged over layers; neurons firing at >= {2 * options.contexts} positions)",
        "eligible": int(eligible.sum()),
        "median_selectivity": float(scores.median()) if scores.numel() else None,
        "neurons": shown,
    }


def finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------
# Probes: concept against control sentences


def read_sentences(path: str, name: str) -> list[bytes]:
    """Non-empty lines of a UTF-8 text file, as bytes, each cut to its first MAX_SENTENCE bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(
            f"{name} {path}: cannot read it ({error.strerror or error}); give a text file, one sentence per line"
        ) from None
    sentences = [line.strip()[:MAX_SENTENCE] for line in data.split(b"\n")]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise DataError(f"{name} {path} holds no sentences; write one sentence per line")
    return sentences


@torch.no_grad()
def sentence_values(model: BDH, sentences: list[bytes], signal: str) -> torch.Tensor:
    """(sentences, H*N): each neuron's value averaged over the sentence's positions (each sentence read alone,
    from position 0; right padding cannot change earlier positions, attention being causal). Sentences are
    batched by length, so little is spent on padding."""
    c = model.config
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    values = torch.empty(len(sentences), c.n_head * c.neurons_per_head)
    start = 0
    while start < len(order):
        # As many of the next-shortest sentences as fit the buffer at the length of the longest of them.
        end = start + 1
        while (
            end < len(order)
            and (end - start + 1) * len(sentences[order[end]]) * c.n_head * c.neurons_per_head <= ELEMENT_BUDGET
        ):
            end += 1
        batch = [sentences[i] for i in order[start:end]]
        longest = len(batch[-1])
        idx = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest)
        for row, sentence in enumerate(batch):
            idx[row, : len(sentence)] = torch.frombuffer(bytearray(sentence), dtype=torch.uint8).long()
            mask[row, : len(sentence)] = 1
        pooled = activation_pass(model, idx, signal=signal).pooled.flatten(2)  # B, T, H*N
        values[order[start:end]] = (pooled * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        start = end
    return values


def probe_report(model: BDH, concept: list[bytes], control: list[bytes], signal: str, top: int) -> dict:
    """Neurons ranked by Mann-Whitney U of their per-sentence values, concept against control."""
    from scipy.stats import mannwhitneyu

    N = model.config.neurons_per_head
    x = sentence_values(model, concept, signal).numpy()
    y = sentence_values(model, control, signal).numpy()
    U, p = mannwhitneyu(x, y, alternative="two-sided", axis=0)
    U = np.nan_to_num(U, nan=x.shape[0] * y.shape[0] / 2)
    p = np.nan_to_num(p, nan=1.0)
    gap = x.mean(0) - y.mean(0)
    order = np.lexsort((-gap, -U))[:top]  # largest U first; equal U: the larger mean difference
    pairs = x.shape[0] * y.shape[0]
    return {
        "signal": signal, "concept_sentences": x.shape[0], "control_sentences": y.shape[0], "pairs": pairs,
        "neurons": [
            {"neuron": neuron_name(int(i) // N, int(i) % N), "index": int(i), "U": float(U[i]), "p": float(p[i]),
             "rank_biserial": float(2 * U[i] / pairs - 1), "concept_mean": float(x[:, i].mean()),
             "control_mean": float(y[:, i].mean())}
            for i in order
        ],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot: nothing global is touched)


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
            if fit and label == "trained":
                k = np.unique(d[d >= fit["xmin"]])
                share = (d >= fit["xmin"]).mean()
                axis.loglog(k, share * (k / fit["xmin"]) ** (1 - fit["alpha"]), ":", color="k",
                            label=f"tail fit α={fit['alpha']:.2f}, x_min={fit['xmin']}")  # fmt: skip
        axis.set(title=title, xlabel="degree k", ylabel="P(K ≥ k)")
        axis.legend(fontsize=8)
    return figure


def plot_firing_rates(trained: dict, init: dict | None):
    """Histogram of per-neuron firing rates (share of positions x layers where the neuron is non-zero)."""
    figure = new_figure()
    bins = np.concatenate([[0], np.logspace(-5, 0, 41)])
    for axis, k, kind in zip(figure.subplots(1, 3), range(3), ("a", "b", "a·b")):
        for report, label in ((trained, "trained"), (init, "initialisation")):
            if report is None:
                continue
            rates = report["_rates"][k].ravel()
            axis.hist(np.clip(rates, 1e-5, 1), bins=bins[1:], histtype="step", label=label)
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


# ---------------------------------------------------------------------------------------------------------
# The report


def strip_private(value):
    """The report without the raw arrays kept for plotting (keys starting with _)."""
    if isinstance(value, dict):
        return {k: strip_private(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [strip_private(v) for v in value]
    return value


def percent(x: float) -> str:
    return f"{100 * x:.2f}%"


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "pre{background:#f6f6f6;padding:4px;white-space:pre-wrap}mark{background:#fc6}"
)


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
    rows = []
    for label, rep in (("trained", s), ("initialisation", s0)):
        rows.append([f"{label}: active", *(percent(rep["active"][k]) for k in KINDS)])
        rows.append([f"{label}: dead / always-on neurons", *(
            f"{rep['neurons'][k]['dead']} / {rep['neurons'][k]['always_on']}" for k in KINDS)])  # fmt: skip
        rows.append([f"{label}: Spearman(active, loss)", *(fmt(rep["active_vs_loss"][k]["spearman"]) for k in KINDS)])
    parts += [
        "<h2>Sparsity</h2>",
        table(["", "a", "b", "a·b"], rows),
        f"<p>Mean loss on the sample: trained {s['loss']:.3f}, initialisation {s0['loss']:.3f} nats per byte.</p>",
        "<img src='sparsity_layers.png'><img src='firing_rates.png'><img src='active_vs_loss.png'>",
    ]
    g, g0 = r["graph"]["trained"], r["graph"]["init"]
    parts.append(
        f"<h2>Neuron graph</h2><p>G = decoder_h · encoder_h per head; {g['edges']} edges kept (mean degree "
        f"{g['mean_degree']:.2f}). Louvain modularity: trained {g['modularity']:.3f} (degree-matched random graph "
        f"{g['null_modularity']:.3f}); initialisation {g0['modularity']:.3f}.</p>"
    )
    header = ["head", "threshold", "edges", "modularity", "random", "communities", "largest", "init modularity"]
    rows = [
        [h["head"], f"{h['threshold']:.4g}", h["edges"], f"{h['modularity']:.3f}", f"{h['null_modularity']:.3f}",
         h["communities"], h["community_sizes"][:5], f"{h0['modularity']:.3f}"]
        for h, h0 in zip(g["heads"], g0["heads"])
    ]  # fmt: skip
    parts.append(table(header, rows))
    rows = []
    for label, rep in (("trained", g), ("initialisation", g0)):
        for key in ("out_degree", "in_degree"):
            fit = rep[key]["fit"] or {}
            hubs = ", ".join(f"{x['neuron']} ({x['degree']})" for x in rep[key]["hubs"][:5])
            rows.append([f"{label} {key.replace('_', '-')}", fmt(fit.get("alpha")), fit.get("xmin", ""),
                         fit.get("tail", ""), fmt(fit.get("ks")), rep[key]["max"], hubs])  # fmt: skip
    parts += [table(["", "tail α", "x_min", "tail size", "KS", "max", "hubs"], rows), "<img src='degrees.png'>"]
    sel = s.get("selective")
    if sel:
        parts.append(
            f"<h2>Selective neurons</h2><p>Selectivity = {e(sel['measure'])}. Median over {sel['eligible']} eligible "
            f"neurons: trained {fmt(sel['median_selectivity'])}, initialisation "
            f"{fmt(s0['selective']['median_selectivity'])}.</p>"
        )
        for n in sel["neurons"]:
            title = f"{n['neuron']}: selectivity {n['selectivity']:.1f}, fires at {n['fires']} positions"
            parts.append(contexts_block(title, n["contexts"]))
    probe = r.get("probe")
    if probe:
        t, t0 = probe["trained"], probe["init"]
        parts.append(
            f"<h2>Probe: concept against control</h2><p>{t['concept_sentences']} concept and "
            f"{t['control_sentences']} control sentences; a neuron's value is its {e(t['signal'])} averaged over the "
            f"sentence. Best U at initialisation: {t0['neurons'][0]['U']:.0f} of {t0['pairs']}.</p>"
        )
        rows = [
            [n["neuron"], f"{n['U']:.0f} / {t['pairs']}", f"{n['p']:.2g}", f"{n['rank_biserial']:.3f}",
             f"{n['concept_mean']:.4g}", f"{n['control_mean']:.4g}"]
            for n in t["neurons"]
        ]  # fmt: skip
        parts.append(table(["neuron", "U", "p", "rank-biserial", "concept mean", "control mean"], rows))
        for n in t["neurons"]:
            if n.get("contexts"):
                parts.append(contexts_block(f"{n['neuron']}: strongest contexts in the corpus sample", n["contexts"]))
    parts.append(f"<p>Took {r['seconds']:.0f} s.</p></body></html>")
    path.write_text("".join(parts), encoding="utf-8")


def fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The command


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
    if output.is_dir() and any(output.iterdir()) and not (output / "report.json").is_file():
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
        ckpt_path: A checkpoint written by fit, or `last` (the newest run's last.ckpt under --logs).
        output: Folder for the report: new, empty, or holding an earlier report (replaced).
        data: The corpus sample the activations are measured on.
        graph: The neuron graph G = decoder_h @ encoder_h per head.
        neurons: The most selective neurons and their strongest contexts.
        probe: Concept-against-control sentences (both files, or neither).
        seed: Seed of the model at initialisation (default: the run's seed_everything, else 1337).
        logs: Where `last` is looked for.
    """
    started = time.perf_counter()
    ckpt = find_last(logs) if ckpt_path == "last" else Path(ckpt_path)
    out = Path(output)
    check_output(out)
    finite_float("graph.mean_degree", graph.mean_degree, 0.0, low_open=True, error=UsageError)
    if graph.threshold is not None:
        finite_float("graph.threshold", graph.threshold, error=UsageError)
    non_negative_int("graph.hubs", graph.hubs, UsageError)
    for name, value in (("neurons.top", neurons.top), ("neurons.contexts", neurons.contexts), ("probe.top", probe.top)):
        positive_int(name, value, UsageError)
    non_negative_int("neurons.width", neurons.width, UsageError)
    if (probe.concept is None) != (probe.control is None):
        raise UsageError("give both --probe.concept and --probe.control (one sentence per line each), or neither")
    concept = read_sentences(probe.concept, "probe.concept") if probe.concept else None
    control = read_sentences(probe.control, "probe.control") if probe.control else None

    model = load_model_from_checkpoint(ckpt)
    step = read_checkpoint(ckpt).get("global_step") if ckpt.suffix == ".ckpt" else None  # exported weights: none
    settings = run_settings(ckpt)
    sample, corpus_name = open_sample(data, settings, model)
    run_seed = settings.get("seed_everything")
    seed = (
        seed
        if seed is not None
        else (run_seed if isinstance(run_seed, int) and not isinstance(run_seed, bool) else 1337)
    )
    init = model_at_init(model.config, seed)

    graph_trained = graph_report(model, graph)
    # Same edge count at init; no random-graph baseline there (a random model's graph is one: measured equal).
    graph_init = graph_report(init, graph, edges_per_head=[h["edges"] for h in graph_trained["heads"]], null=False)
    sparsity_trained = sparsity_report(model, sample, neurons)
    sparsity_init = sparsity_report(init, sample, neurons)
    probe_result = None
    if concept:
        signal = neurons.signal
        probe_result = {"trained": probe_report(model, concept, control, signal, probe.top),
                        "init": probe_report(init, concept, control, signal, probe.top)}  # fmt: skip
    if probe_result:
        for neuron in probe_result["trained"]["neurons"]:
            neuron["contexts"] = strongest_contexts(sparsity_trained, sample, neuron["index"], neurons.width)
    c = model.config
    report = {
        "checkpoint": str(ckpt),
        "step": step,
        "model": {**c.architecture(), "neurons_per_head": c.neurons_per_head},
        "seed": seed,
        "data": {
            "path": corpus_name,
            "windows": len(sample.offsets),
            "block_size": sample.block_size,
            "from_byte": sample.split_start,
            "corpus_bytes": len(sample.corpus),
        },
        "options": {"graph": asdict(graph), "neurons": asdict(neurons), "probe": asdict(probe)},
        "sparsity": {"trained": sparsity_trained, "init": sparsity_init},
        "graph": {"trained": graph_trained, "init": graph_init},
        "probe": probe_result,
    }
    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in (
        ("degrees.png", plot_degrees(graph_trained, graph_init)),
        ("firing_rates.png", plot_firing_rates(sparsity_trained, sparsity_init)),
        ("sparsity_layers.png", plot_sparsity_layers(sparsity_trained, sparsity_init)),
        ("active_vs_loss.png", plot_active_vs_loss(sparsity_trained)),
    ):
        save_png(figure, out / name)
    (out / "report.json").write_text(json.dumps(strip_private(report), indent=1), encoding="utf-8")
    write_html(report, out / "report.html")
    print(summary(report, out))
    return 0


def tail_words(fit: dict | None) -> str:
    if not fit:
        return "too short to fit"
    if fit["at_bound"]:
        return f"not heavy (falls faster than k^-{ALPHA_MAX:g} from k >= {fit['xmin']})"
    return f"alpha {fit['alpha']:.2f} from k >= {fit['xmin']} ({fit['tail']} neurons)"


def summary(report: dict, out: Path) -> str:
    s, s0 = report["sparsity"]["trained"], report["sparsity"]["init"]
    g, g0 = report["graph"]["trained"], report["graph"]["init"]
    fit = g["out_degree"]["fit"]
    lines = [
        f"inspect {report['checkpoint']} (step {report['step']}) -> {out / 'report.html'}",
        "sparsity: active a {} b {} a*b {} (initialisation {} {} {}); Spearman(active a*b, loss) {}".format(
            *(percent(s["active"][k]) for k in KINDS), *(percent(s0["active"][k]) for k in KINDS),
            fmt(s["active_vs_loss"]["ab"]["spearman"])),
        f"graph: {g['edges']} edges, Louvain modularity {g['modularity']:.3f} (degree-matched random "
        f"{g['null_modularity']:.3f}; initialisation {g0['modularity']:.3f}), out-degree tail "
        + tail_words(fit),
    ]  # fmt: skip
    sel = s.get("selective")
    if sel and sel["neurons"]:
        top = sel["neurons"][0]
        lines.append(f"most selective: {top['neuron']} ({top['selectivity']:.1f}x its mean), e.g. "
                     f"{top['contexts'][0]['before'][-20:]}[{top['contexts'][0]['byte']}]")  # fmt: skip
    if report["probe"]:
        best = report["probe"]["trained"]["neurons"][0]
        lines.append(
            f"probe: {best['neuron']} U = {best['U']:.0f} of {report['probe']['trained']['pairs']}, p = {best['p']:.2g}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# During fit: TensorBoard


class InsightMonitor(Callback):
    def __init__(self, every_n_validations: int = 0, mean_degree: float = 5.0, seed: int = 0):
        """The neuron graph and firing rates in TensorBoard every k-th validation (what `inspect` reports).

        Logs `insight/modularity` (Louvain, mean over heads), `insight/out_degree_alpha`, `insight/dead_ab` and
        `insight/always_on_ab` (shares of neurons), and the degree and firing-rate plots as images. Firing rates
        come from the first validation batch.

        Args:
            every_n_validations: Every this many validations (0 = off). Costs the graph of every head
                (an N x N product per head, in blocks) and one extra forward pass.
            mean_degree: Edges per neuron kept in the graph.
            seed: Seed of Louvain.
        """
        non_negative_int("inspect.every_n_validations", every_n_validations, ConfigError, zero="0 = off")
        finite_float("inspect.mean_degree", mean_degree, 0.0, low_open=True)
        self.every_n_validations, self.mean_degree, self.seed = every_n_validations, mean_degree, seed
        self.validations = 0
        self.batch = None

    def due(self, trainer) -> bool:
        return self.every_n_validations > 0 and not trainer.sanity_checking and trainer.is_global_zero

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.due(trainer) and batch_idx == 0:
            self.batch = batch

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        self.validations += 1
        if self.validations % self.every_n_validations or self.batch is None:
            return
        model = pl_module.model
        graph = graph_report(model, GraphOptions(mean_degree=self.mean_degree, seed=self.seed), null=False)
        idx, targets = self.batch
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            seen = activation_pass(model, idx, targets)
        rates = (seen.fires.double() / (idx.numel() * model.config.n_layer)).numpy()
        firing = {"_rates": rates}
        fit = graph["out_degree"]["fit"]
        scalars = {
            "insight/modularity": graph["modularity"],
            "insight/dead_ab": float((rates[2] == 0).mean()),
            "insight/always_on_ab": float((rates[2] >= ALWAYS_ON).mean()),
        }
        if fit:
            scalars["insight/out_degree_alpha"] = fit["alpha"]
        step = logged_step(trainer)  # the step of this validation's scalars
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_scalar"):
                for name, value in scalars.items():
                    experiment.add_scalar(name, value, global_step=step)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    "insight/degrees", figure_image(plot_degrees(graph, None)), step, dataformats="HWC"
                )
                experiment.add_image(
                    "insight/firing_rates", figure_image(plot_firing_rates(firing, None)), step, dataformats="HWC"
                )
        self.batch = None


__all__ = [
    "DataOptions", "GraphOptions", "InsightMonitor", "NeuronOptions", "ProbeOptions", "activation_pass",
    "fit_power_law", "graph_report", "inspect_command", "louvain_modularity", "probe_report", "sparsity_report",
    "thresholded_edges",
]  # fmt: skip
