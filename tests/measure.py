"""Measurements and baselines shared by the tests and the benchmarks (not part of the package).

`measure_step` measures what `estimate.estimate_memory` predicts, on a real training step; `full_prefix_generate`
is the plain generator that the recurrent one is checked and timed against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def count_saved_bytes(step, leave_out=()) -> int:
    """Bytes autograd keeps for backward while `step()` runs its forward (distinct storages, parameters
    and the tensors in `leave_out` excluded). `step` returns the loss; nothing else is done with it."""
    storages: dict[int, int] = {}
    left_out: set[int] = {t.untyped_storage().data_ptr() for t in leave_out}  # and every parameter met

    def pack(tensor):
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter):
            storages[storage.data_ptr()] = storage.nbytes()
        else:
            left_out.add(storage.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(n for ptr, n in storages.items() if ptr not in left_out)


def measure_peak_bytes(step, device: torch.device, live_before: int) -> int:
    """Peak bytes allocated while `step()` runs. CUDA: `torch.cuda.max_memory_allocated` (it includes
    what was live before). CPU: `live_before` plus the highest running sum of the allocations and frees
    that the profiler records."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return live_before + peak


def measure_step(
    model, optimizer, idx: torch.Tensor, autocast_dtype: torch.dtype | None = None, states: list | None = None
) -> tuple[int, int]:
    """(bytes saved for backward, peak bytes) of one real training step of `model` (a `BDH`) on bytes
    `idx` (B, T+1): forward, cross-entropy, backward, AdamW step. Run one step before, so that the
    optimizer state exists, as it does for every step but the first. With `states` (each layer's carried
    state, as model.carry_state keeps them) the window continues a stream and `states` is replaced by the
    states it writes, as the module does."""
    written: list = []

    def forward():
        # As Lightning's mixed precision runs it: no cast cache, so each layer casts (and keeps) its own weights.
        with torch.autocast(idx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                            cache_enabled=False):  # fmt: skip
            if states is None:
                logits = model(idx[:, :-1])
            else:
                start = torch.full((idx.shape[0],), idx.shape[1] - 1)  # a window after the first of each stream
                logits, out = model.forward_stream(idx[:, :-1], start, states)
                written[:] = [state.detach() for state in out]
        return F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if states is not None:
            states[:] = written  # the incoming states go, as the module replaces them
            written.clear()

    optimizer.zero_grad(set_to_none=True)
    saved = count_saved_bytes(forward, leave_out=list(model.parameters()))  # views of them too (B = 1)
    written.clear()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    live_before = tensor_bytes(model.parameters()) + tensor_bytes(state) + tensor_bytes([idx, *(states or [])])
    return saved, measure_peak_bytes(step, idx.device, live_before)


def tensor_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def full_prefix_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation the plain way, re-running `BDH.forward` on the whole prefix for every byte.

    The baseline of `benchmarks/generate.py`: O(T) work per byte, O(n²) for n bytes. Returns (B, T + n).
    """
    idx = prompt
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            next_byte = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_byte), dim=1)
    return idx
