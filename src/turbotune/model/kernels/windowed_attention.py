"""Causal attention with a sliding window, without a [L, L] mask.

transformers gives SDPA an explicit mask as soon as a layer's window is shorter than the sequence (Phi-3's 2,047
at 2,048 tokens, Gemma 3's 1,024-token local layers, Mistral past 4,096). With a mask, SDPA cannot run its flash
kernel: it falls back to the memory-efficient kernel, which visits every tile of the mask (no causal skipping)
and costs a [B, 1, L, L] mask per call. FlashAttention itself takes a window (`window_size_left`), and PyTorch
exposes it through `aten::_flash_attention_forward`, which has its own autograd formula. So, for a batch of
whole sequences (no padding, no packing):

    key j is visible to query i  iff  j <= i  and  i - j < window        (transformers' sliding-window mask)

which is FlashAttention's causal window with `window_size_left = window - 1`. Where that kernel can't run (CPU,
fp32, a head size it lacks, a PyTorch without the window arguments), `windowed_attention_reference` builds the
mask and calls SDPA: the same function, and what the tests compare against.

Layout: q [B, L, Hq, D], k and v [B, L, Hkv, D] (Hq a multiple of Hkv), the layout the attention projections
produce before any transpose; the output is [B, L, Hq, D].
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_support: dict[tuple, bool] = {}   # (device index, dtype, head dim) -> whether the flash call worked there


def window_mask(length: int, window: int, device=None) -> torch.Tensor:
    """[L, L] bool, True where query i may attend key j."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    return (j <= i) & (i - j < window)


def windowed_attention_reference(q, k, v, window: int, scale: float | None = None, dropout: float = 0.0):
    """SDPA with the explicit window mask (plain PyTorch; any device and dtype)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=window_mask(q.shape[1], window, q.device),
                                         dropout_p=dropout, scale=scale, enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


def flash_window_enabled() -> bool:
    """On unless TURBOTUNE_FLASH_WINDOW=0 (an off switch for comparisons; off, windowed layers run the masked
    reference, as fast as transformers' own mask). On by default since its GPU tests passed on an H100 (tenth
    session: tests/gpu/test_windowed_attention_gpu.py and the family tests, 289 passed)."""
    return os.environ.get("TURBOTUNE_FLASH_WINDOW", "1") != "0"


def _flash_possible(q, k, v) -> bool:
    d = q.shape[-1]
    return (flash_window_enabled() and q.is_cuda and q.dtype in _FLASH_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and d % 8 == 0 and d <= 256 and v.shape[-1] == d and q.shape[2] % k.shape[2] == 0
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def _flash(q, k, v, window: int, scale: float | None):
    length = q.shape[1]
    return torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, length, length, 0.0, True, False, scale=scale,
        window_size_left=window - 1, window_size_right=0)[0]


def windowed_attention(q, k, v, window: int, scale: float | None = None, dropout: float = 0.0):
    """Causal attention over the last `window` keys (see the module docstring): FlashAttention's window on a GPU,
    the masked reference elsewhere. The first call on a (device, dtype, head size) tries the flash kernel and
    remembers whether it ran; inside a CUDA-graph capture an untried combination takes the reference."""
    if dropout or window >= q.shape[1] or not _flash_possible(q, k, v):
        return windowed_attention_reference(q, k, v, window, scale, dropout)
    key = (q.device.index, q.dtype, q.shape[-1])
    ok = _support.get(key)
    if ok is None and not torch.cuda.is_current_stream_capturing():  # q is on a GPU here
        try:
            out = _flash(q, k, v, window, scale)
            _support[key] = True
            return out
        except (RuntimeError, TypeError) as exc:  # an older PyTorch, or a GPU its flash kernel does not cover
            _support[key] = False
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            warnings.warn(f"turbotune: FlashAttention's sliding window unavailable here ({reason}); windowed "
                          "layers use SDPA with a mask", stacklevel=2)
    if ok:
        return _flash(q, k, v, window, scale)
    return windowed_attention_reference(q, k, v, window, scale, dropout)
