"""Padding removal for the batches Hugging Face trainers feed: [B, L] padded rows -> one packed row of real tokens.

A collator such as TRL's (with `packing=False`) pads every micro-batch to its longest sample and sends an
`attention_mask`; a third of the compute can be padding. `remove_padding` turns such a batch into one row
[1, T_b] that every training call can run instead, with the same numbers for every real token:

* each sample keeps its own positions (the padded batch's `position_ids`, i.e. 0..len-1 for right padding),
  and since positions restart at 0 for every sample, attention stays within each sample (packing.py explains
  how transformers builds that mask from `position_ids`);
* labels: the row is the samples' labels one after another, with the label of each sample's first token set
  to -100. In the padded batch that label is never scored (the loss scores position t against labels[t + 1]);
  in the packed row it would be scored by the previous sample's last token. So the targets, their count and
  the loss's denominator are unchanged;
* T real tokens are grown to a bucket length T_b (about four per octave, so at most 25% extra) by a tail
  segment of its own (positions 0.., labels -100): shapes repeat, and CUDA graphs can be replayed.

A row that comes packed already (TRL's packing or padding-free collator: position ids, no mask) is only grown to
its bucket. Only right-padded batches of the plain keys are rewritten (input_ids, attention_mask, labels,
position_ids); anything else (left padding, per-token extras such as token_type_ids, pre-shifted labels,
flash-attention's cu_seq_lens) is returned as it came. An all-ones `attention_mask` is simply dropped: no padding, and no mask lets attention take its causal
fast path. Deciding costs one host sync per call (the trainer's own metrics sync every micro-step anyway).
"""
from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
MIN_BUCKET = 256
_PLAIN_KEYS = {"input_ids", "attention_mask", "labels", "position_ids", "num_items_in_batch"}


def bucket_length(tokens: int, per_octave: int | None = None) -> int:
    """The smallest bucket >= tokens. Default (`per_octave` 2): halves of the octave below (256, 384, 512, 768,
    1024, 1536, ...); 4 (or TURBOTUNE_BUCKETS=4): quarters (256, 320, ..., 512, 640, ...), up to 25% padding
    instead of 50% but twice the lengths to capture. Halves measured +37% real tokens/s on mixed lengths (H100,
    ninth session, bench/NOTES.md): a capture costs more than the padded tokens."""
    if tokens <= MIN_BUCKET:
        return MIN_BUCKET
    if per_octave is None:
        per_octave = int(os.environ.get("TURBOTUNE_BUCKETS", "2"))
    step = 1 << max(0, (tokens - 1).bit_length() - 1 - max(0, per_octave.bit_length() - 1))
    return -(-tokens // step) * step


def remove_padding(batch: dict, pad_id: int = 0) -> dict:
    """The batch with its padding removed (see the module docstring), or unchanged where that does not apply."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None and ids is not None:
        return _grow_packed_row(batch, pad_id)
    if mask is None or ids is None or mask.dim() != 2 or ids.shape != mask.shape:
        return batch
    rows, length = mask.shape
    lengths = mask.sum(-1)
    prefix = torch.arange(length, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    all_ones, right_padded = torch.stack([(mask != 0).all(), ((mask != 0) == prefix).all()]).tolist()
    if all_ones:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    if not right_padded or set(batch) - _PLAIN_KEYS or "labels" not in batch:
        return batch
    return _pack(batch, prefix, lengths, pad_id)


def _grow_packed_row(batch: dict, pad_id: int) -> dict:
    """A row that is already packed (TRL's `packing=True` / `padding_free=True`: one row, `position_ids` restarting
    per sample, no mask) grown to its bucket length by a tail sample of its own, so its shape repeats."""
    if not _one_packed_row(batch) or set(batch) - _PLAIN_KEYS:
        return batch  # flash-attention's cu_seq_lens and other extras describe the row as it is: leave it
    total = batch["input_ids"].shape[1]
    tail = bucket_length(total) - total
    return _extended(batch, tail, pad_id) if tail else batch


def _one_packed_row(tensors: dict) -> bool:
    """input_ids, labels and position_ids present, all [1, T]."""
    ids, labels, positions = (tensors.get(k) for k in ("input_ids", "labels", "position_ids"))
    return (ids is not None and labels is not None and positions is not None and ids.dim() == 2
            and ids.shape[0] == 1 and labels.shape == ids.shape and positions.shape == ids.shape)


def _extended(tensors: dict, extra: int, pad_id: int) -> dict:
    """A packed row's tensors with `extra` more tokens: pad ids, no targets, positions 0.. (a sample of its own
    where positions mark the samples)."""
    out = dict(tensors)
    for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", None)):
        out[key] = torch.cat([tensors[key], _tail(tensors[key], extra, fill)], 1)
    return out


def _pack(batch: dict, keep: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> dict:
    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, length)
    first = torch.zeros_like(keep)
    first[:, 0] = True  # right padding: every sample starts its row
    where = keep.reshape(-1).nonzero().squeeze(1)  # the real tokens, found once (one wait for the device)
    total = where.numel()
    tail = bucket_length(total) - total
    packed_ids = _gather(ids, where, tail, pad_id)
    packed_labels = _gather(labels.masked_fill(first, IGNORE_INDEX), where, tail, IGNORE_INDEX)
    packed_pos = _gather(positions, where, tail, None)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
    out.update(input_ids=packed_ids.unsqueeze(0), labels=packed_labels.unsqueeze(0),
               position_ids=packed_pos.unsqueeze(0))
    out.update(_sequence_offsets(lengths, total + tail))
    return out


def _sequence_offsets(lengths: torch.Tensor, length: int) -> dict:
    """Unless TURBOTUNE_FLASH_VARLEN=0: the packed row's sample offsets as transformers' flash keywords
    (`cu_seq_lens_q/k`, `max_length_q/k`), a fixed size so graphs replay; turbotune's attention then runs
    FlashAttention's varlen kernel instead of the document mask (kernels/varlen_attention.py). Empty where the row
    holds more samples than the offsets have room for."""
    from turbotune.model.kernels.varlen_attention import MAX_SEQUENCES, sequence_offsets, varlen_enabled
    if not varlen_enabled() or lengths.numel() >= MAX_SEQUENCES:
        return {}
    offsets = sequence_offsets(lengths, length)
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": length, "max_length_k": length}


_GROWN_KEYS = {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "num_items_in_batch"}


def grow_packed(tensors: dict, others: dict, length: int, pad_id: int = 0) -> tuple[dict, dict] | None:
    """A packed row's call (remove_padding's output split into tensors and other arguments) grown to `length`
    tokens, so it can replay a longer graph (graphed_call's stand-in graphs); None where the call is not one
    packed row of the plain keys. The added tokens carry no targets (labels -100) and come after every real
    token, and attention is causal, so no real token's output, the loss or its gradients change: they extend the
    row's last sequence (its offsets' end moves from the old length to `length`; positions go on 0.. as in a
    bucket's tail)."""
    if not _one_packed_row(tensors) or set(tensors) - _GROWN_KEYS:
        return None
    old = tensors["input_ids"].shape[1]
    extra = length - old
    if extra <= 0:
        return None
    grown = _extended(tensors, extra, pad_id)
    for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if k in tensors:
            offsets = tensors[k]
            grown[k] = torch.where(offsets == old, torch.full_like(offsets, length), offsets)
    rest = dict(others)
    for k in ("max_length_q", "max_length_k"):
        if k in others:
            if others[k] != old:
                return None  # not the row-length bound _sequence_offsets sets
            rest[k] = length
    return grown, rest


def _gather(x: torch.Tensor, where: torch.Tensor, tail: int, fill) -> torch.Tensor:
    """x's real tokens, then `tail` more: `fill`, or positions 0.. (fill None) so the tail is a sample of its own."""
    out = x.reshape(-1).index_select(0, where)
    return torch.cat([out, _tail(x, tail, fill)[0]]) if tail else out


def _tail(like: torch.Tensor, n: int, fill) -> torch.Tensor:
    """[1, n] of like's dtype and device: `fill`, or positions 0.. (fill None)."""
    values = (torch.arange(n, dtype=like.dtype, device=like.device) if fill is None
              else torch.full((n,), fill, dtype=like.dtype, device=like.device))
    return values.unsqueeze(0)


def targets_in_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-target values of a packed row ([1, T - 1]: target i predicts packed token i + 1) back in the rows of
    the right-padded batch it came from ([B, L - 1]: target j of row r predicts its token j + 1), zero (False)
    where the padded batch has no target. Each sample's first token is never a target in either layout."""
    lengths = mask.ne(0).sum(-1)
    starts = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(mask.shape[1] - 1, device=mask.device)
    valid = (j + 1).unsqueeze(0) < lengths.unsqueeze(1)
    src = (starts.unsqueeze(1) + j).clamp(max=values.shape[-1] - 1)
    picked = values.reshape(-1)[src]
    return torch.where(valid, picked, torch.zeros((), dtype=values.dtype, device=values.device))
