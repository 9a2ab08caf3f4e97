"""The `inspect` command's option groups (--data.*, --graph.*, --neurons.*, --probe.*), its shared constants,
and the check that the `[insight]` extra (matplotlib, networkx, scipy) is installed."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from ..errors import BDHError

KINDS = ("a", "b", "ab")  # relu(x E), relu(y Ev), their product a*b (what the decoder reads)
INSIGHT_INSTALL = "pip install 'bdh-lightning[insight]'"
EXTRA = ("matplotlib", "networkx", "scipy")


class MissingExtra(BDHError):
    """An optional feature's dependencies are not installed; the message names the pip command."""


def require_extra(feature: str = "inspect") -> None:
    """Raise a one-line MissingExtra when matplotlib, networkx or scipy cannot be imported."""
    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"{feature} needs {', '.join(missing)}: {INSIGHT_INSTALL}")


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
        seed: First seed of Louvain and of the degree-matched random graphs.
        seeds: Louvain runs (seeds seed, seed+1, ...) and random-graph draws; modularity is their mean ± spread.
    """

    threshold: float | None = None
    mean_degree: float = 5.0
    hubs: int = 10
    seed: int = 0
    seeds: int = 5


@dataclass(frozen=True)
class NeuronOptions:
    """The most selective neurons and their strongest contexts.

    Args:
        top: How many of the most selective neurons to show: ranked by context selectivity = the mean of a
            neuron's `contexts` largest values on the text / the same on the text with each window's bytes
            shuffled (no ceiling; 1 = no need of context), among neurons that fire at 2 * contexts positions
            or more.
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
            (concept above control), with the two-sided p-value, its Benjamini-Hochberg and Holm corrections
            over all neurons, and the rank-biserial correlation.
        permutations: Label permutations for the family-wise p-value of the largest |U| (0 = none).
    """

    concept: str | None = None
    control: str | None = None
    top: int = 10
    permutations: int = 1000
