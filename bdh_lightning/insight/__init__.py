"""What a BDH run learned (`inspect`; arXiv 2509.26507, sections 5 and 6), each look beside its control:
graph (the neuron graph G = decoder @ encoder), activations (sparsity, selective neurons), probes
(concept against control), report (PNG/HTML/JSON), command (`inspect`) and callback (TensorBoard during
fit). Needs the `[insight]` extra (matplotlib, networkx, scipy), imported only where used."""

from .callback import InsightMonitor
from .options import DataOptions, GraphOptions, NeuronOptions, ProbeOptions

__all__ = ["DataOptions", "GraphOptions", "InsightMonitor", "NeuronOptions", "ProbeOptions"]
