"""Causal attention within each sample of a packed row, from sequence offsets instead of a [L, L] mask.

A packed row (padding.remove_padding: a padded batch's samples one after another) needs attention to stay inside
each sample. transformers builds that as a dense [1, 1, L, L] document mask from the restarting positions, and SDPA
with a mask runs its memory-efficient kernel over every tile: ~L² / Σ lᵢ² times the work per-sample attention
needs (~8× for eight samples in a row), on a slower kernel. FlashAttention's varlen form takes the offsets of the
samples (`cu_seq_lens`: 0, l₀, l₀ + l₁, ..., L) and visits only each sample's causal tiles; PyTorch exposes it
through `aten::_flash_attention_forward` (cum_seq_q / cum_seq_k), which has its own autograd formula.

Under CUDA graphs every input has a fixed shape, so `cu_seq_lens` has a fixed MAX_SEQUENCES + 1 entries, the tail
repeating the row length (empty sequences), and the longest sequence is given as the row length (an upper bound:
it only sizes the grid). Where the kernel can't run (CPU, fp32, a head size it lacks), `varlen_attention_reference`
builds the document mask from the offsets and calls SDPA: the same function, and what the tests compare against.

On by default since its GPU tests passed on an H200 (twelfth session); TURBOTUNE_FLASH_VARLEN=0 keeps the
document mask.
Layout: q [L, Hq, D], k and v [L, Hkv, D] (one packed row, Hq a multiple of Hkv); the output is [L, Hq, D].
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from turbotune.model.kernels.flash_support import flash_forward, flash_shapes_ok, run_flash_or_reference
from turbotune.model.kernels.windowed_attention import window_mask

MAX_SEQUENCES = 64  # offsets per packed row; a row of more samples keeps the document mask (flash's grid grows
                    # with the count of sequences, empty ones included)


def varlen_enabled() -> bool:
    """Packed rows carry sequence offsets to the attention unless TURBOTUNE_FLASH_VARLEN=0 (the document mask)."""
    return os.environ.get("TURBOTUNE_FLASH_VARLEN", "1") == "1"


def sequence_offsets(lengths: torch.Tensor, total: int, slots: int = MAX_SEQUENCES) -> torch.Tensor:
    """int32 [slots + 1]: 0, then the running sum of `lengths` (the samples in row order, on the device; their sum
    may fall short of `total`, the row length: the rest is one more sequence), then `total` repeated (empty
    sequences). The caller makes sure len(lengths) + 1 <= slots. No host sync."""
    ends = torch.cumsum(lengths, 0, dtype=torch.int32)
    head = torch.zeros(1, dtype=torch.int32, device=lengths.device)
    rest = torch.full((slots - lengths.numel(),), total, dtype=torch.int32, device=lengths.device)
    return torch.cat([head, ends, rest])


def sample_starts(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """int32 [length]: for each token of the packed row, where its sample starts (from the offsets; no host sync)."""
    token = torch.arange(length, device=offsets.device)
    sample = torch.searchsorted(offsets[1:].to(torch.int64), token, right=True)
    return offsets.to(torch.int32)[sample]


def visible_keys(length: int, window: int | None = None, starts=None, device=None) -> torch.Tensor:
    """[L, L] bool, True where query i may attend key j: causal, within the last `window` keys if given, and not
    before the query's sample start (`starts`, sample_starts' [L]) in a packed row. The references' mask."""
    mask = window_mask(length, window or length, device)
    if starts is not None:
        mask &= torch.arange(length, device=device)[None, :] >= starts[:, None]
    return mask


def varlen_attention_reference(q, k, v, offsets, scale: float | None = None, window: int | None = None):
    """SDPA with the document mask the offsets describe, and the sliding window if one is given (plain PyTorch;
    any device and dtype)."""
    length = q.shape[0]
    mask = visible_keys(length, window, sample_starts(offsets, length), q.device)
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=kt.shape[1] != qt.shape[1])
    return out[0].transpose(0, 1)


def varlen_attention(q, k, v, offsets, max_length: int | None = None, scale: float | None = None,
                     window: int | None = None):
    """Causal attention inside each sequence of the packed row (see the module docstring), over the last `window`
    keys where a sliding window binds (as windowed_attention.py: FlashAttention's `window_size_left`):
    FlashAttention's varlen kernel on a GPU, the masked reference elsewhere."""
    max_length = q.shape[0] if max_length is None else int(max_length)
    if window is not None and window >= q.shape[0]:
        window = None
    if not flash_shapes_ok(q, k, v):
        return varlen_attention_reference(q, k, v, offsets, scale, window)
    return run_flash_or_reference("varlen" if window is None else "varlen-window", q,
                                  lambda: flash_forward(q, k, v, scale, window, offsets, max_length),
                                  lambda: varlen_attention_reference(q, k, v, offsets, scale, window),
                                  "FlashAttention's varlen kernel")
