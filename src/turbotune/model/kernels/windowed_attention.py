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

import torch
import torch.nn.functional as F

from turbotune.model.kernels.flash_support import flash_forward, flash_shapes_ok, run_flash_or_reference


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
    return flash_window_enabled() and flash_shapes_ok(q, k, v)


def windowed_attention(q, k, v, window: int, scale: float | None = None, dropout: float = 0.0):
    """Causal attention over the last `window` keys (see the module docstring): FlashAttention's window on a GPU,
    the masked reference elsewhere (flash_support: the first call on a device, dtype and head size tries the
    kernel and remembers whether it ran; inside a CUDA-graph capture an untried combination takes the reference)."""
    if dropout or window >= q.shape[1] or not _flash_possible(q, k, v):
        return windowed_attention_reference(q, k, v, window, scale, dropout)
    return run_flash_or_reference("window", q, lambda: flash_forward(q, k, v, scale, window),
                                  lambda: windowed_attention_reference(q, k, v, window, scale),
                                  "FlashAttention's sliding window")
