"""CUDA graphs of a trainer's no-grad forward calls: DPO's and KTO's reference pass, GRPO's old and reference
log-probabilities (TRL asks for them with `fused_lm_head=True` under `torch.no_grad()`; trainer_step serves them
with turbotune's head).

Those calls ran eagerly while the training call around them replayed from graphs, and a no-grad forward of a
small model is bound by the host: on an H100, DPO on qwen2-1.5b kept the GPU busy 62% of a step, the four eager
reference forwards issuing ~90 ms of kernels each for ~50 ms of GPU work (bench/NOTES.md, eleventh session). Here
each input shape (and adapter state: the reference runs with the adapters disabled, or under TRL's "ref"
adapter) is captured once after one eager call and replayed: the batch is copied into the captured inputs and the
outputs are copied out. Forward only: nothing is kept for a backward.

The graphs have a memory pool of their own, apart from the training graphs' (those hold activations between a
forward and its backward, and a reference call comes between the two). The outputs are cloned, so a caller may
keep them across the next replay.
"""
from __future__ import annotations

import torch

from turbotune.training.graphed_call import capture_failed, capture_into, capturing, graph_key

MAX_GRAPHS = 8  # shapes captured at most (DPO: one per padded length the collator produces)


def no_grad_graphs_enabled() -> bool:
    """On unless TURBOTUNE_NO_GRAD_GRAPHS=0 (its GPU test and the DPO bench ran on an H200 in the twelfth
    session: replays equal the eager passes; bench/NOTES.md)."""
    import os
    return os.environ.get("TURBOTUNE_NO_GRAD_GRAPHS", "1") == "1"


class ForwardGraphs:
    """`fn(**tensors, **others)` per distinct (state, shape): one eager call, then a captured graph replayed."""

    def __init__(self, fn, warmup: int = 1, max_graphs: int = MAX_GRAPHS):
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self.disabled_reason = None
        self.replays = self.captures = self.eager_calls = 0
        self.reset()

    def reset(self) -> None:
        self._entries: dict = {}
        self._seen: dict = {}
        self._pool = None

    def __call__(self, tensors: dict, others: dict, state):
        key = None if self.disabled_reason is not None or capturing() else graph_key(tensors, others)
        key = None if key is None else (state, key)
        entry = self._entries.get(key) if key is not None else None
        if entry is None and key is not None:
            seen = self._seen.get(key, 0)
            if seen >= self.warmup and len(self._entries) < self.max_graphs:
                entry = self._capture(key, tensors, others)
            else:
                self._seen[key] = seen + 1
        if entry is None:
            self.eager_calls += 1
            return self.fn(**tensors, **others)
        for k, buf in entry.inputs.items():
            buf.copy_(tensors[k], non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.cls(**{name: out.clone() for name, out in zip(entry.names, entry.outputs)})

    def _capture(self, key, tensors, others):
        from turbotune.training.cuda_graphs import one_sequence_per_row
        inputs = {k: v.clone() for k, v in tensors.items()}
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            torch.cuda.synchronize()
            with capture_into(graph, self._pool), one_sequence_per_row(inputs):
                out = self.fn(**inputs, **others)
        except Exception as exc:  # noqa: BLE001 - eager from now on, said once
            return capture_failed(self, exc, "for no-grad calls")
        entry = _Entry(out, inputs, graph)
        self._entries[key] = entry
        self.captures += 1
        return entry


class _Entry:
    def __init__(self, out, inputs, graph):
        self.inputs, self.graph, self.cls = inputs, graph, type(out)
        self.names = [k for k, v in out.items() if torch.is_tensor(v)]
        self.outputs = [out[k] for k in self.names]
