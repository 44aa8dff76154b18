"""Whether a decoder layer's forward is running again for activation checkpointing's recompute.

A checkpointed decoder layer runs twice: once in the forward, and once more in the backward to rebuild the
tensors its backward needs. The second run's output is thrown away: autograd reads only the saved tensors it
rebuilt, and the gradient that flows into the layer's output comes from the layers above. So a fused block
whose output goes nowhere but into the residual sum can skip the matmul that makes that output while it
recomputes: for Llama-shaped layers the MLP's down projection, about a quarter of a layer's matmul work, and
for a 4-bit base its dequantisation too (models/llama_like.py, kernels/fused_lora.py).

    with recompute_scope(): ...        # what our offloaded checkpointing does around its recompute
    mark_recompute_in(model)           # transformers' checkpointing: the second call of each layer's function

The flag is per thread: autograd runs a CUDA backward (and with it the recompute) on its own thread.
"""
from __future__ import annotations

import contextlib
import threading

from turbotune._compat import checkpoint_func_attrs

_STATE = threading.local()
_MARK = "_turbotune_marks_recompute"


def recomputing() -> bool:
    """True inside a checkpointed layer's recompute (on this thread)."""
    return getattr(_STATE, "on", False)


def checkpoint_phase() -> str | None:
    """"recompute" inside a checkpointed layer's recompute, "forward" inside the first run of a layer under a
    checkpoint function marked by `marking_recompute` (whose saved tensors the checkpoint drops and rebuilds
    in the recompute), else None."""
    if recomputing():
        return "recompute"
    return "forward" if getattr(_STATE, "first", False) else None


@contextlib.contextmanager
def _first_run_scope():
    previous = getattr(_STATE, "first", False)
    _STATE.first = True
    try:
        yield
    finally:
        _STATE.first = previous


@contextlib.contextmanager
def recompute_scope(on: bool = True):
    previous = recomputing()
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = previous


def marking_recompute(checkpoint_func):
    """Wrap a checkpoint function `(fn, *args, **kwargs)` so that fn's first call runs as a plain forward and
    every later call (the recompute; torch.utils.checkpoint calls fn again in the backward) in recompute_scope."""
    if getattr(checkpoint_func, _MARK, False):
        return checkpoint_func

    def checkpoint(fn, *args, **kwargs):
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            with recompute_scope(calls[0] > 1), (_first_run_scope() if calls[0] == 1 else contextlib.nullcontext()):
                return fn(*a, **k)

        return checkpoint_func(run, *args, **kwargs)

    setattr(checkpoint, _MARK, True)
    checkpoint.__wrapped__ = checkpoint_func
    return checkpoint


def mark_recompute_in(model) -> int:
    """Wrap the checkpoint function transformers gave each of `model`'s layers; returns how many it wrapped."""
    count = 0
    for module in model.modules():
        for name in checkpoint_func_attrs():
            func = module.__dict__.get(name)
            if func is not None:
                setattr(module, name, marking_recompute(func))
                count += 1
    return count
