"""The neuron graph G = decoder @ encoder: per head (G_h = decoder_h @ encoder_h) and whole (every neuron to
every neuron across heads through the shared residual stream, for the encoder and the encoder_v path).
Thresholded blockwise with torch into a sparse edge list; degrees with power-law tail fits compared to
exponential and lognormal tails; Louvain modularity over several seeds beside degree-matched random graphs."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UsageError
from ..model import BDH
from .options import GraphOptions

MAX_EDGES_PER_NEURON = 100  # a --graph.threshold that keeps more edges than this per neuron is refused
ALPHA_MAX = 8.0  # the largest power-law exponent fitted
SIGNIFICANT = 0.1  # the Vuong p-value below which one tail model is said to fit better


def neuron_name(head: int, neuron: int) -> str:
    return f"h{head}:{neuron}"


@torch.no_grad()
def head_graph(model: BDH, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_h: N x D, encoder_h: D x N) in float32, whose product is head `head`'s N x N graph G."""
    N = model.config.neurons_per_head
    return model.decoder[head * N : (head + 1) * N].float(), model.encoder[head].float()


@torch.no_grad()
def whole_graph(model: BDH, path: str = "encoder") -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder: H*N x D, encoder: D x H*N) whose product is the H*N x H*N graph across heads: neuron h*N + i's
    output drives neuron g*N + j's input (path "encoder": a = relu(x E)) or its value read (path "encoder_v")."""
    weights = getattr(model, path)  # H, D, N
    H, D, N = weights.shape
    return model.decoder.float(), weights.float().permute(1, 0, 2).reshape(D, H * N)


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


def fit_power_law(
    values: np.ndarray, max_candidates: int = 60, min_tail: int = 50, min_share: float = 0.1
) -> dict | None:
    """Discrete power-law tail P(k) ~ k^-alpha for k >= x_min, by maximum likelihood (Clauset, Shalizi and
    Newman 2009): for each candidate x_min the likelihood's alpha, keeping the x_min whose tail is closest
    to the fit in Kolmogorov-Smirnov distance; then the tail compared with an exponential and a lognormal
    (`compare_tails`) and a verdict. The tail keeps at least `min_tail` values and `min_share` of them: far
    out, a few dozen values fit a steep power law and an exponential alike, and the verdict would say nothing.
    None when fewer than `min_tail` positive values exist."""
    from scipy.optimize import minimize_scalar
    from scipy.special import zeta

    x = np.sort(np.asarray(values, dtype=np.int64))
    x = x[x > 0]
    if x.size < min_tail:
        return None
    candidates = np.unique(x)
    shortest = max(min_tail, math.ceil(min_share * x.size))
    candidates = candidates[np.searchsorted(x, candidates) <= x.size - shortest]
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
            best = {"alpha": alpha, "xmin": int(xmin), "tail": int(tail.size), "ks": ks,
                    "at_bound": alpha > ALPHA_MAX - 0.01}  # fmt: skip
    best.update(compare_tails(x[x >= best["xmin"]], best["alpha"], best["xmin"]))
    best["verdict"] = tail_verdict(best)
    return best


def compare_tails(tail: np.ndarray, alpha: float, xmin: int) -> dict:
    """Vuong's likelihood-ratio test of the power-law tail against a discrete exponential and a discrete
    lognormal fitted to the same tail (k >= xmin): LR = sum of the log-likelihood differences (> 0: the
    power law fits better) and its two-sided p-value (normal approximation)."""
    from scipy.optimize import minimize
    from scipy.special import zeta
    from scipy.stats import norm

    k = tail.astype(np.float64)
    power = -alpha * np.log(k) - math.log(zeta(alpha, xmin))
    rate = math.log1p(1.0 / max(k.mean() - xmin, 1e-12))  # geometric MLE on k - xmin
    exponential = math.log(-math.expm1(-rate)) - rate * (k - xmin)

    def lognormal(params):  # P(K = k) for k >= xmin: a lognormal's mass on [k - 1/2, k + 1/2), renormalised
        mu, log_sigma = params
        sigma = math.exp(log_sigma)
        upper = norm.logsf((np.log(k - 0.5) - mu) / sigma)
        lower = norm.logsf((np.log(k + 0.5) - mu) / sigma)
        mass = upper + np.log(-np.expm1(np.minimum(lower - upper, -1e-300)))
        return mass - norm.logsf((math.log(xmin - 0.5) - mu) / sigma)

    logs = np.log(k)
    start = [logs.mean(), math.log(max(logs.std(), 0.1))]
    fitted = minimize(lambda p: -lognormal(p).sum(), start, method="Nelder-Mead", options={"maxiter": 400})
    result = {}
    for name, other in (("exponential", exponential), ("lognormal", lognormal(fitted.x))):
        difference = power - other
        spread = difference.std()
        ratio = float(difference.sum())
        p = float(math.erfc(abs(ratio) / (math.sqrt(2 * k.size) * spread))) if spread > 0 else 1.0
        result[f"vs_{name}"] = {"lr": ratio, "p": p}
    return result


def tail_verdict(fit: dict) -> str:
    """In words: a power-law tail only when it is inside the searched range and beats the exponential
    (significantly) and is not beaten by the lognormal; otherwise which model fits better, or undecided."""
    exp, logn = fit["vs_exponential"], fit["vs_lognormal"]
    if fit["at_bound"] or (exp["lr"] < 0 and exp["p"] < SIGNIFICANT):
        return "no heavy tail (an exponential tail fits better)" if exp["lr"] < 0 else "no heavy tail"
    if exp["lr"] > 0 and exp["p"] < SIGNIFICANT:
        if logn["lr"] < 0 and logn["p"] < SIGNIFICANT:
            return "heavy tail, lognormal rather than power law"
        return "heavy tail (power law or lognormal)" if logn["p"] >= SIGNIFICANT else "power-law tail"
    return "undecided (power law and exponential fit alike)"


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


def modularity_spread(src, dst, n: int, seed: int, seeds: int, null: bool) -> dict:
    """Louvain modularity over seeds seed .. seed + seeds - 1 (mean, standard deviation, each), and with
    `null` the same over as many degree-matched random graphs (draw i clustered with seed i); the
    communities of the first seed."""
    runs = [louvain_modularity(src, dst, n, seed + i) for i in range(seeds)]
    values = [value for value, _ in runs]
    result = {"modularity": float(np.mean(values)), "modularity_sd": float(np.std(values)), "seeds": values,
              "_communities": runs[0][1]}  # fmt: skip
    if null:
        drawn = [louvain_modularity(*degree_matched_null(src, dst, seed + i), n, seed + i)[0] for i in range(seeds)]
        result.update(null_modularity=float(np.mean(drawn)), null_modularity_sd=float(np.std(drawn)), null_draws=drawn)
    else:
        result.update(null_modularity=None, null_modularity_sd=None)
    return result


def community_order(communities: list[set[int]], n: int) -> np.ndarray:
    """Node order for a heatmap: the communities largest first, each sorted, then the isolated nodes."""
    placed = [i for community in communities for i in sorted(community)]
    seen = set(placed)
    return np.array(placed + [i for i in range(n) if i not in seen], dtype=np.int64)


def degree_summary(d: np.ndarray, N: int, hubs: int) -> dict:
    top = np.argsort(-d, kind="stable")[:hubs]
    return {"max": int(d.max()), "fit": fit_power_law(d),
            "hubs": [{"neuron": neuron_name(int(i) // N, int(i) % N), "degree": int(d[i])} for i in top]}  # fmt: skip


def edges_of(decoder, encoder, options: GraphOptions, edges: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The kept edges: `edges` of them if given, else by the options' threshold, else mean_degree per neuron."""
    if edges is not None:
        return thresholded_edges(decoder, encoder, edges=edges)
    if options.threshold is not None:
        return thresholded_edges(decoder, encoder, threshold=options.threshold)
    return thresholded_edges(decoder, encoder, edges=max(1, round(options.mean_degree * decoder.shape[0])))


def graph_report(
    model: BDH, options: GraphOptions = GraphOptions(), edges_per_head: list[int] | None = None, null: bool = True
) -> dict:
    """The neuron graph of every head: edges, threshold, Louvain modularity over options.seeds seeds (and that
    of as many degree-matched random graphs), communities, in/out degrees pooled over heads with tail fits, hubs.

    `edges_per_head` keeps that many edges per head instead of using the options' threshold rule (used to
    give the model at initialisation the trained model's edge counts).
    """
    c = model.config
    N = c.neurons_per_head
    heads, in_degrees, out_degrees = [], [], []
    for h in range(c.n_head):
        src, dst, threshold = edges_of(*head_graph(model, h), options, edges_per_head[h] if edges_per_head else None)
        spread = modularity_spread(src, dst, N, options.seed, options.seeds, null)
        sizes = [len(community) for community in spread.pop("_communities")]
        d_in, d_out = degrees(src, dst, N)
        in_degrees.append(d_in)
        out_degrees.append(d_out)
        heads.append({"head": h, "edges": int(src.size), "threshold": threshold, **spread,
                      "communities": sum(1 for s in sizes if s >= 2), "community_sizes": sizes[:20],
                      "isolated": int(((d_in + d_out) == 0).sum())})  # fmt: skip
    d_in, d_out = np.concatenate(in_degrees), np.concatenate(out_degrees)
    return {
        "heads": heads,
        "edges": sum(h["edges"] for h in heads),
        "mean_degree": sum(h["edges"] for h in heads) / (c.n_head * N),
        "modularity": float(np.mean([h["modularity"] for h in heads])),
        "modularity_sd": float(np.mean([h["modularity_sd"] for h in heads])),
        "null_modularity": float(np.mean([h["null_modularity"] for h in heads])) if null else None,
        "null_modularity_sd": float(np.mean([h["null_modularity_sd"] for h in heads])) if null else None,
        "in_degree": degree_summary(d_in, N, options.hubs),
        "out_degree": degree_summary(d_out, N, options.hubs),
        "_in": d_in,  # raw degrees for the plots; dropped from report.json
        "_out": d_out,
    }


@torch.no_grad()
def largest_entries(decoder: torch.Tensor, encoder: torch.Tensor, N: int, block_rows: int = 1024) -> dict:
    """The largest off-diagonal entry of G = decoder @ encoder inside a head's N x N block, and across heads."""
    within, cross = -math.inf, -math.inf
    for start in range(0, decoder.shape[0], block_rows):
        block = decoder[start : start + block_rows] @ encoder
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -math.inf
        same = (rows[:, None] + start) // N == torch.arange(block.shape[1])[None] // N
        within = max(within, float(block[same].max()))
        if not same.all():
            cross = max(cross, float(block[~same].max()))
    return {"within_head_max": within, "cross_head_max": cross if cross > -math.inf else None}


def whole_graph_report(model: BDH, options: GraphOptions = GraphOptions(), path: str = "encoder",
                       edges: int | None = None, null: bool = True) -> dict:  # fmt: skip
    """The graph across heads (`whole_graph`): edges, the share of kept edges that cross heads (a random
    choice of edges would cross with share (H - 1) / H), the largest within- and cross-head entries,
    modularity over seeds beside random graphs, degree tails, and a node order by community for the heatmap."""
    c = model.config
    H, N = c.n_head, c.neurons_per_head
    decoder, encoder = whole_graph(model, path)
    src, dst, threshold = edges_of(decoder, encoder, options, edges)
    spread = modularity_spread(src, dst, H * N, options.seed, options.seeds, null)
    communities = spread.pop("_communities")
    d_in, d_out = degrees(src, dst, H * N)
    same = src // N == dst // N
    largest = largest_entries(decoder, encoder, N)
    return {"path": path, "edges": int(src.size), "threshold": threshold, **spread, **largest,
            "cross_head_share": float(1 - same.mean()) if src.size else None,
            "random_cross_head_share": (H - 1) / H, "communities": sum(1 for s in communities if len(s) >= 2),
            "in_degree": degree_summary(d_in, N, options.hubs), "out_degree": degree_summary(d_out, N, options.hubs),
            "_order": community_order(communities, H * N), "_edges": (src, dst)}  # fmt: skip
