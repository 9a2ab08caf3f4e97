"""Running the model over text to read its neurons: sparsity counts, firing rates, per-position loss, each
neuron's value pooled over layers (BDH shares one layer's weights, so neuron n of head h is the same neuron
at every depth), the strongest contexts, context selectivity against shuffled text, and per-sentence values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..layer import decode, layer_output, neuron_activations, rope_cos_sin
from ..model import BDH
from .graph import neuron_name
from .options import KINDS, NeuronOptions

ALWAYS_ON = 0.99  # a neuron firing at this share of positions or more counts as always on
ELEMENT_BUDGET = 1 << 25  # float32 entries of one batch's (positions x H*N) buffer: 128 MB
BOOTSTRAP = 1000  # window-bootstrap draws of the active-vs-loss correlation


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


class TopValues:
    """Each neuron's k largest values seen so far, and where in the corpus (offsets), over batches."""

    def __init__(self, k: int, width: int):
        self.k = k
        self.values, self.offsets = torch.empty(0, width), torch.empty(0, width, dtype=torch.long)

    def add(self, values: torch.Tensor, where: torch.Tensor) -> None:
        batch_values, batch_index = values.topk(min(self.k, values.shape[0]), dim=0)
        self.values = torch.cat([self.values, batch_values])
        self.offsets = torch.cat([self.offsets, where[batch_index]])
        if self.values.shape[0] > self.k:
            self.values, keep = self.values.topk(self.k, dim=0)
            self.offsets = self.offsets.gather(0, keep)


def shuffled_windows(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Each window's bytes in a random order: the same bytes, no context (the shuffled-position control)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(idx.shape, generator=generator).argsort(dim=1)
    return idx.gather(1, order)


def sparsity_report(model: BDH, sample: CorpusSample, neurons: NeuronOptions | None = None) -> dict:
    """Active fractions per layer and head, firing-rate statistics, active fraction against loss per position
    (Spearman with a window-bootstrap p-value); with `neurons`, also the most selective neurons, scored
    against the same windows with their bytes shuffled, and their strongest contexts."""
    c = model.config
    H, N = c.n_head, c.neurons_per_head
    k = neurons.contexts if neurons else 0
    counts, fires, positions = 0, 0, 0
    active_per_window, loss_per_window = [], []
    total, nonzero = torch.zeros(H * N), torch.zeros(H * N, dtype=torch.long)  # the pooled signal's sum, non-zeros
    top, top_shuffled = TopValues(k, H * N), TopValues(k, H * N)
    for batch, (offsets, idx, targets) in enumerate(sample.batches(windows_per_batch(model, sample.block_size))):
        seen = activation_pass(model, idx, targets, signal=neurons.signal if neurons else None)
        counts, fires, positions = counts + seen.counts, fires + seen.fires, positions + idx.numel()
        # Position 0 is left out: with nothing before it to attend to, y = 0 and b = 0 there by construction.
        active_per_window.append(seen.position_active[:, :, 1:])
        loss_per_window.append(seen.loss[:, 1:])
        if neurons:
            values = seen.pooled.reshape(-1, H * N)  # positions, H*N
            total, nonzero = total + values.sum(0), nonzero + (values > 0).sum(0)
            # Corpus offset of each position: the window's start plus the position in it.
            where = torch.from_numpy(offsets).repeat_interleave(idx.shape[1]) + torch.arange(idx.shape[1]).repeat(
                len(offsets)
            )
            top.add(values, where)
            shuffled = activation_pass(model, shuffled_windows(idx, batch), signal=neurons.signal).pooled
            top_shuffled.add(shuffled.reshape(-1, H * N), where)
    active = torch.cat(active_per_window, dim=1).double() / (c.n_layer * H * N)  # 3, windows, positions
    report = activation_summary(counts, fires, positions, N, c.n_layer)
    report.update(loss_correlation(active, torch.cat(loss_per_window).double()))
    if neurons:
        report["_strongest"] = (top.values, top.offsets)  # per neuron: its largest values, where in the corpus
        report["selective"] = selective_neurons(
            total / positions, nonzero, top, top_shuffled.values, sample, neurons, N
        )
    return report


def activation_summary(counts: torch.Tensor, fires: torch.Tensor, positions: int, N: int, L: int) -> dict:
    """Active fractions (overall, per layer, per layer and head) and dead / always-on neuron counts."""
    H = counts.shape[1]
    rates = fires.double() / (positions * L)  # 3, H, N
    return {
        "positions": positions,
        "active": dict(zip(KINDS, (counts.sum((0, 1)).double() / (positions * H * N * L)).tolist())),
        "per_layer": [dict(zip(KINDS, row)) for row in (counts.sum(1).double() / (positions * H * N)).tolist()],
        "per_layer_head": [
            [dict(zip(KINDS, cell)) for cell in row] for row in (counts.double() / (positions * N)).tolist()
        ],  # fmt: skip
        "neurons": {
            kind: {
                "dead": int((rates[i] == 0).sum()),
                "always_on": int((rates[i] >= ALWAYS_ON).sum()),
                "median_rate": float(rates[i].median()),
            }
            for i, kind in enumerate(KINDS)
        },  # fmt: skip
        "_rates": rates.numpy(),  # for the plots
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    denominator = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def loss_correlation(active: torch.Tensor, loss: torch.Tensor, draws: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Spearman's rho of each position's active fraction (3, windows, positions) against its loss (windows,
    positions), with a p-value that respects the dependence between neighbouring positions: windows are
    resampled with replacement (a cluster bootstrap); p = twice the share of draws on the far side of 0
    (counted as (k + 1) / (draws + 1), so never 0)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    windows = loss.shape[0]
    picks = rng.integers(0, windows, size=(draws, windows))
    correlation = {}
    for kind, fraction in zip(KINDS, active.numpy()):
        rho = spearman(fraction.ravel(), loss.numpy().ravel())
        boot = np.array([spearman(fraction[pick].ravel(), loss.numpy()[pick].ravel()) for pick in picks])
        boot = boot[np.isfinite(boot)]
        tail = min((boot <= 0).sum(), (boot >= 0).sum())
        p = min(1.0, 2 * (tail + 1) / (boot.size + 1)) if boot.size and windows > 1 else None
        correlation[kind] = {
            "spearman": finite_or_none(rho), "p": p, "p_independent": finite_or_none(spearmanr(
                fraction.ravel(), loss.numpy().ravel()).pvalue) if math.isfinite(rho) else None,
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))] if boot.size else None,
            "windows": windows,
        }  # fmt: skip
    flat = active.flatten(1)
    return {"loss": float(loss.mean()), "active_vs_loss": correlation, "_active": flat.numpy(),
            "_loss": loss.flatten().numpy()}  # fmt: skip


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
    mean, nonzero, top: TopValues, shuffled, sample: CorpusSample, options: NeuronOptions, N: int
) -> dict:
    """The neurons whose strongest values on the text stand farthest above their strongest values on the same
    windows with the bytes shuffled (context selectivity: no ceiling, 1 when context does not matter), with
    their contexts; beside it the old ratio top-k mean / mean, which is capped at positions / contexts."""
    eligible = (nonzero >= 2 * options.contexts) & (mean > 0)
    strongest = top.values.mean(0)
    # A pseudo-count of 1% of the typical strongest value: a neuron silent on shuffled text scores large, not infinite.
    floor = 0.01 * float(strongest[eligible].double().quantile(0.5)) if eligible.any() else 0.0
    context = torch.where(eligible, (strongest + floor) / (shuffled.mean(0) + floor).clamp_min(1e-30), 0.0)
    capped = torch.where(eligible, strongest / mean.clamp_min(1e-30), torch.zeros_like(mean))
    chosen = [int(i) for i in context.argsort(descending=True)[: options.top] if eligible[i]]
    shown = []
    for i in chosen:
        contexts = strongest_contexts({"_strongest": (top.values, top.offsets)}, sample, i, options.width)
        shown.append({
            "neuron": neuron_name(i // N, i % N), "context_selectivity": float(context[i]),
            "selectivity": float(capped[i]), "mean": float(mean[i]), "fires": int(nonzero[i]), "contexts": contexts,
        })  # fmt: skip
    scores, ratios = context[eligible], capped[eligible]
    return {
        "measure": f"mean of the {options.contexts} largest {options.signal} values on the text / the same on the "
        f"windows with their bytes shuffled (value = {options.signal} averaged over layers; neurons firing at >= "
        f"{2 * options.contexts} positions)",
        "eligible": int(eligible.sum()),
        "median_context_selectivity": float(scores.double().quantile(0.5)) if scores.numel() else None,
        "share_above_2": float((scores > 2).double().mean()) if scores.numel() else None,
        "median_selectivity": float(ratios.double().quantile(0.5)) if ratios.numel() else None,
        "selectivity_ceiling": sample_positions(sample) / options.contexts,
        "neurons": shown,
    }


def sample_positions(sample: CorpusSample) -> int:
    return len(sample.offsets) * sample.block_size


def finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


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


@torch.no_grad()
def sentence_synapses(model: BDH, sentences: list[bytes]) -> torch.Tensor:
    """(sentences, H*N*D): the attention state each sentence leaves, sigma[h, n, d] = the sum over its positions
    of a[n] * x[d] (neuron n's co-activation with residual dimension d, which the layer's attention reads;
    taken before RoPE's position phases), divided by the sentence's length and averaged over layers."""
    c = model.config
    H, N = c.n_head, c.neurons_per_head
    states = torch.empty(len(sentences), H * N * c.n_embd)
    for row, sentence in enumerate(sentences):
        idx = torch.frombuffer(bytearray(sentence), dtype=torch.uint8).long()[None]
        T = idx.shape[1]
        cos, sin = rope_cos_sin(torch.arange(T), N)
        x = model.embed_bytes(idx)  # 1, 1, T, D
        state = 0
        for _ in range(c.n_layer):
            a, b = neuron_activations(x, model.encoder, model.encoder_v, cos, sin)  # 1, H, T, N: all heads at once
            state = state + torch.einsum("htn,td->hnd", a[0].float(), x[0, 0].float())
            x = layer_output(x, decode(a * b, model.decoder))
        states[row] = (state / (T * c.n_layer)).flatten()
    return states
