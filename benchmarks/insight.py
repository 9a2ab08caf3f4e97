"""How long `inspect` takes at the guide's sizes, on CPU, with random-init weights of each config's shape.

For each config: the neuron graph of one model (every head: G = decoder_h @ encoder_h in row blocks, the
top mean_degree * N entries, Louvain on it and on degree-matched random graphs over graph.seeds seeds, the
degree fits with their Vuong tests), the whole graph across heads (one path), and the activation pass
(sparsity counts, per-neuron values pooled over layers, selectivity top-k on the text and on shuffled
windows, the window bootstrap) per 1,000 corpus positions; wall-clock and CPU time of this process (on a machine shared with other jobs, the
CPU time is what a quiet core would take). `inspect` does each twice (trained model and the model at
initialisation), plus the probe sentences if given.

    OMP_NUM_THREADS=2 python benchmarks/insight.py --configs 8gb 24gb
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from bdh_lightning.data.corpus import read_corpus
from bdh_lightning.insight import GraphOptions, NeuronOptions
from bdh_lightning.insight.activations import CorpusSample, sparsity_report
from bdh_lightning.insight.graph import graph_report, whole_graph_report
from bdh_lightning.model import BDH, BDHConfig

REPO = Path(__file__).resolve().parents[1]


def model_from_config(name: str) -> BDH:
    settings = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    fields = ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier")
    torch.manual_seed(1337)
    return BDH(BDHConfig(**{k: settings[k] for k in fields}, dropout=0.0)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["8gb", "24gb"])
    parser.add_argument("--windows", type=int, default=2, help="corpus windows for the activation pass")
    parser.add_argument("--block_size", type=int, default=256)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    corpus = read_corpus(str(REPO / "data" / "tinyshakespeare.txt"))
    for name in args.configs:
        model = model_from_config(name)
        c = model.config
        start, cpu = time.perf_counter(), time.process_time()
        graph = graph_report(model, GraphOptions())
        graph_seconds, graph_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        whole_graph_report(model, GraphOptions())
        whole_seconds, whole_cpu = time.perf_counter() - start, time.process_time() - cpu
        sample = CorpusSample(corpus, args.block_size, args.windows, 0.1)
        start, cpu = time.perf_counter(), time.process_time()
        sparsity_report(model, sample, NeuronOptions())
        pass_seconds, pass_cpu = time.perf_counter() - start, time.process_time() - cpu
        positions = len(sample.offsets) * args.block_size
        print(f"{name}: L{c.n_layer} D{c.n_embd} H{c.n_head} N={c.neurons_per_head}: graph {graph_seconds:.1f} s wall, "
              f"{graph_cpu:.1f} s CPU ({graph['edges']} edges, modularity {graph['modularity']:.3f}, random graph "
              f"{graph['null_modularity']:.3f}); whole graph {whole_seconds:.1f} s wall, {whole_cpu:.1f} s CPU; activations {pass_seconds / positions * 1000:.1f} s wall, "
              f"{pass_cpu / positions * 1000:.1f} s CPU per 1,000 positions ({positions} timed)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
