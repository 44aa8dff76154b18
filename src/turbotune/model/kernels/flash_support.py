"""Whether one of PyTorch's FlashAttention entry points runs here, asked once per (kind, device, dtype, head size).

`aten::_flash_attention_forward` takes arguments SDPA does not expose (a sliding window, sequence offsets), but
it is missing from some builds and GPUs. The first call on a combination tries it and remembers the answer; an
untried combination inside a CUDA-graph capture takes the reference (a failing kernel must not break a capture),
and a failure warns once and falls back for good.
"""
from __future__ import annotations

import warnings

import torch
import torch.utils.checkpoint

FLASH_DTYPES = (torch.float16, torch.bfloat16)
_support: dict[tuple, bool] = {}


def flash_shapes_ok(q, k, v) -> bool:
    """q [.., Hq, D], k and v [.., Hkv, D] on a GPU, in a 16-bit dtype, a head size FlashAttention has, GQA."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in FLASH_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and d % 8 == 0 and d <= 256 and v.shape[-1] == d and q.shape[-2] % k.shape[-2] == 0
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def flash_forward(q, k, v, scale: float | None, window: int | None = None, offsets=None, max_length=None):
    """`aten::_flash_attention_forward`, causal, no dropout: q [B, L, Hq, D] (or one packed row [L, Hq, D] with its
    sample `offsets` and an upper bound `max_length` on their lengths), over the last `window` keys if given."""
    length = q.shape[-3] if max_length is None else max_length
    extra = {} if window is None else dict(window_size_left=window - 1, window_size_right=0)
    return torch.ops.aten._flash_attention_forward(
        q, k, v, offsets, offsets, length, length, 0.0, True, False, scale=scale, **extra)[0]


# torch.utils.checkpoint stops a recomputation early by raising this through the forward: it must pass.
_CHECKPOINT_SIGNALS = tuple(getattr(torch.utils.checkpoint, n) for n in ("_StopRecomputationError",)
                            if hasattr(torch.utils.checkpoint, n))


def _outside_checkpoint(probe) -> None:
    """Run a probe with its own saved tensors kept as they are. Inside a checkpointed layer's forward the
    checkpoint's hooks would count them, and the recomputation (which does not probe) would save fewer: torch
    raises "A different number of tensors was saved" (Gemma 2 on an H100, fourteenth session). Innermost hooks
    win, so plain pass-through hooks keep the probe's autograd graph its own."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        probe()


def run_flash_or_reference(kind: str, q, flash, reference, what: str, errors=(RuntimeError, TypeError),
                           first=None):
    """flash() where the kernel is known to run for (kind, q's device, dtype, head size), else reference();
    an untried combination outside a capture tries first() (a probe, if given) and flash() (`errors`: what counts
    as "does not run here"). The probe runs on that first try only: it may synchronise, which a capture forbids."""
    key = (kind, q.device.index, q.dtype, q.shape[-1])
    ok = _support.get(key)
    if ok is None and not torch.cuda.is_current_stream_capturing():  # q is on a GPU here
        try:
            if first is not None:
                _outside_checkpoint(first)
            out = flash()
            _support[key] = True
            return out
        except _CHECKPOINT_SIGNALS:  # the checkpoint's own control flow, not a kernel failing
            raise
        except errors as exc:  # an older PyTorch, a GPU its kernel does not cover, a tile that does not fit
            _support[key] = False
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            warnings.warn(f"turbotune: {what} unavailable here ({reason}); using the reference", stacklevel=3)
    return flash() if ok else reference()
