"""Concept against control sentences (the paper's monosemanticity test): each neuron ranked by Mann-Whitney U
of its per-sentence values, with p-values corrected over all neurons (Benjamini-Hochberg and Holm) and a
label-permutation test of the largest effect (max-|U| over neurons, family-wise); the same on synapses
(the attention state's entries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from ..model import BDH
from .activations import sentence_synapses, sentence_values
from .graph import neuron_name

MAX_SENTENCE = 1024  # probe sentences are cut to this many bytes
ALPHA = 0.05  # the level significant neurons are counted at
SYNAPSE_BUDGET = 1 << 22  # synapses per sentence (H*N*D) the synapse probe handles: 16 MB per sentence


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


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error)."""
    order = np.argsort(p)
    adjusted = np.maximum.accumulate((p.size - np.arange(p.size)) * p[order]).clip(max=1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values: false discovery rate)."""
    order = np.argsort(p)
    scaled = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]  # at most the largest p: never above 1
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def permutation_null(x: np.ndarray, y: np.ndarray, draws: int, seed: int = 0, chunk: int = 100) -> np.ndarray:
    """The largest |U - n1 n2 / 2| over neurons for `draws` random relabellings of the pooled sentences."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([x, y]), axis=0)  # sentences, neurons; ties get their mean rank
    n1, n = x.shape[0], ranks.shape[0]
    centre = n1 * (n - n1) / 2
    rng = np.random.default_rng(seed)
    largest = []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        chosen = np.argsort(rng.random((size, n)), axis=1)[:, :n1]
        labels = np.zeros((size, n))
        np.put_along_axis(labels, chosen, 1.0, axis=1)
        U = labels @ ranks - n1 * (n1 + 1) / 2
        largest.append(np.abs(U - centre).max(1))
    return np.concatenate(largest) if largest else np.empty(0)


def ranking(x: np.ndarray, y: np.ndarray, top: int, permutations: int, name) -> dict:
    """Mann-Whitney U of every column, concept rows x against control rows y: the counts significant at ALPHA
    (raw, Benjamini-Hochberg, Holm, permutation) and the `top` columns by U, named by `name(column)`."""
    from scipy.stats import mannwhitneyu

    U, p = mannwhitneyu(x, y, alternative="two-sided", axis=0)
    pairs = x.shape[0] * y.shape[0]
    U = np.nan_to_num(U, nan=pairs / 2)
    p = np.nan_to_num(p, nan=1.0)
    p_bh, p_holm = benjamini_hochberg(p), holm(p)
    null = permutation_null(x, y, permutations) if permutations else None
    effect = np.abs(U - pairs / 2)
    p_perm = (1 + (null[None, :] >= effect[:, None] - 1e-9).sum(1)) / (1 + null.size) if null is not None else None
    gap = x.mean(0) - y.mean(0)
    order = np.lexsort((-gap, -U))[:top]  # largest U first; equal U: the larger mean difference
    return {
        "concept_sentences": x.shape[0], "control_sentences": y.shape[0], "pairs": pairs, "tested": int(U.size),
        "correction": "Benjamini-Hochberg (p_bh) and Holm (p_holm) over all tested",
        "significant": {"raw": int((p < ALPHA).sum()), "bh": int((p_bh < ALPHA).sum()),
                        "holm": int((p_holm < ALPHA).sum()),
                        "permutation": int((p_perm < ALPHA).sum()) if p_perm is not None else None},
        "permutations": permutations, "best_p_holm": float(p_holm.min()),
        "best_p_permutation": float(p_perm.min()) if p_perm is not None else None,
        "ranked": [
            {"name": name(int(i)), "index": int(i), "U": float(U[i]), "p": float(p[i]),
             "p_bh": float(p_bh[i]), "p_holm": float(p_holm[i]),
             "p_permutation": float(p_perm[i]) if p_perm is not None else None,
             "rank_biserial": float(2 * U[i] / pairs - 1), "concept_mean": float(x[:, i].mean()),
             "control_mean": float(y[:, i].mean())}
            for i in order
        ],
    }  # fmt: skip


def probe_report(
    model: BDH, concept: list[bytes], control: list[bytes], signal: str, top: int, permutations: int = 0
) -> dict:
    """Neurons ranked by Mann-Whitney U of their per-sentence values, concept against control; p-values
    corrected over all H*N neurons; with `permutations`, the family-wise permutation p-value of each shown
    neuron's |U - n1 n2 / 2| against the largest over neurons under shuffled labels."""
    N = model.config.neurons_per_head
    x = sentence_values(model, concept, signal).numpy()
    y = sentence_values(model, control, signal).numpy()
    result = ranking(x, y, top, permutations, lambda i: neuron_name(i // N, i % N))
    for entry in result["ranked"]:
        entry["neuron"] = entry.pop("name")
    return {"signal": signal, **result, "neurons": result.pop("ranked")}


def synapse_report(model: BDH, concept: list[bytes], control: list[bytes], top: int, permutations: int = 0) -> dict:
    """The same test on synapses: the entries sigma[h, n, d] of the attention state each sentence leaves
    (`sentence_synapses`), named h{h}:{n}~x{d}. Skipped (with the reason) when H*N*D exceeds SYNAPSE_BUDGET."""
    c = model.config
    N, D = c.neurons_per_head, c.n_embd
    if c.n_head * N * D > SYNAPSE_BUDGET:
        return {"skipped": f"{c.n_head * N * D} synapses per sentence, more than the {SYNAPSE_BUDGET} handled"}
    x = sentence_synapses(model, concept).numpy()
    y = sentence_synapses(model, control).numpy()
    result = ranking(x, y, top, permutations, lambda i: f"{neuron_name(i // (N * D), i // D % N)}~x{i % D}")
    for entry in result["ranked"]:
        entry["synapse"] = entry.pop("name")
    return {**result, "synapses": result.pop("ranked")}
