"""Padding-free packing: several whole samples share one row, and none of them can see another.

    from turbotune.training.packing import PackingCollator, pack_samples, packing_stats
    rows = pack_samples(samples, max_seq_length=2048)          # list[PackedRow], in sample order
    collate = PackingCollator.for_model(model, tokenizer)      # picks how attention stays in each sample
    batch = collate(rows[:2])                                   # input_ids, labels, position_ids, ...
    num_tokens = batch.pop("num_tokens")                        # real tokens; not a model input
    out = model(**batch, use_cache=False, num_items_in_batch=n_targets)
    print(packing_stats(samples, rows, batch_size=8).line())

Why it gives the same numbers as padded batches
-----------------------------------------------
A packed row [a0 a1 a2 | b0 b1 | pad pad] must compute, for every real token, what the padded batch
computes. Three things make that so:

* Attention: token b1 may attend to b0 and b1 only. `packing_attention_mode(model)` says how that is
  arranged with the installed transformers (see there): from `position_ids` by transformers itself, by
  flash-attention's varlen kernel, or by a 4-D document mask that we build.
* Positions: `position_ids` restart at 0 for every sample (and for the padding tail), so RoPE rotates b0
  exactly as it would at the start of its own row; transformers computes cos/sin from `position_ids`.
* Labels, the boundary rule: transformers' causal-LM loss (and turbotune's fused one) scores the logits at
  position t against `labels[t + 1]`. In the row above the logits at a2 (last token of sample a) would be
  scored against labels[b0], i.e. "predict the first token of b from the end of a", which the padded batch
  never does: there a2 is followed by padding (label -100), and b0 is position 0 of its own row, a token
  nothing predicts. So the collator sets **the label of the first token of every sample to -100**. That is
  the same statement as "the position before a boundary predicts -100" (labels[b0] is what a2 predicts),
  and it drops nothing: the first label of a sample is never a target in the padded batch either
  (`data.tokenize_examples` already notes that position 0 is never a target). The count of target tokens,
  `(labels[:, 1:] != -100).sum()`, is therefore unchanged, and so is `num_items_in_batch`.

Packing strategy
----------------
`pack_samples` fills rows greedily in the given order ("next fit"): a sample goes into the open row when
it fits, otherwise the row is closed and a new one opened. Reading the rows left to right gives back the
input order exactly, so a run with packing sees the same samples in the same order as one without. With
`lookahead=k > 0`, when the next sample doesn't fit, the first of the following k samples that does fit
is pulled forward into the open row (first fit within a window): fuller rows, still deterministic, but
a sample may be pulled ahead of up to k others, so the order is no longer exactly the input's.
`turbotune train` packs its shuffled samples with `TRAIN_LOOKAHEAD`: on lengths drawn from 20 to 1,500
tokens, rows of 2,048 come out ~96% full with a window of 64 against ~76% with next fit (a quarter of the
compute was padding), and a sample still trains within a few rows of where the shuffle put it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

from turbotune._compat import (
    call_create_causal_mask, packed_mask_builder, transformers_mask_is_capture_safe, unwrap_peft,
)
from turbotune.model.kernels.varlen_attention import MAX_SEQUENCES, sequence_offsets, varlen_enabled

IGNORE_INDEX = -100
_OFFSET_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")  # fixed-size sequence offsets: fill_rows extends, never repeats
TRAIN_LOOKAHEAD = 64  # pack_samples' first-fit window in `turbotune train` (see "Packing strategy" above)

# What `packing_attention_mode` returns.
MODE_POSITION_IDS = "position_ids"  # transformers builds the block-diagonal causal mask from position_ids
MODE_FLASH_VARLEN = "flash_varlen"  # flash-attention varlen kernels, from cu_seq_lens_* (and position_ids)
MODE_MASK_4D = "mask_4d"            # we pass the 4-D document mask as attention_mask
MODES = (MODE_POSITION_IDS, MODE_FLASH_VARLEN, MODE_MASK_4D)

# The mask format in MODE_MASK_4D, per attention implementation.
MASK_BOOL = "bool"            # sdpa: True = may attend
MASK_ADDITIVE = "additive"    # eager: 0 = may attend, dtype minimum = may not (added to the scores)


class PackingError(ValueError):
    """A sample or setting packing can't handle; the message says which and what to do."""


# ---------------------------------------------------------------- rows

@dataclass(frozen=True)
class PackedRow:
    """Whole samples that share one row of at most `max_seq_length` tokens.

    `indices` are the samples' positions in the list given to `pack_samples`."""
    samples: tuple[dict, ...]
    indices: tuple[int, ...]
    max_seq_length: int

    @property
    def lengths(self) -> list[int]:
        return [len(s["input_ids"]) for s in self.samples]

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)


def _length(sample: dict, index: int, max_seq_length: int) -> int:
    n = len(sample["input_ids"])
    if n == 0:
        raise PackingError(f"{sample.get('where', f'sample {index}')}: empty sample (no input_ids)")
    if n > max_seq_length:
        raise PackingError(f"{sample.get('where', f'sample {index}')}: {n:,} tokens is more than "
                           f"max_seq_length={max_seq_length:,}; truncate upstream "
                           "(data.prepare_dataset(..., max_seq_length=...)) with the same max_seq_length")
    return n


def pack_samples(samples: Sequence[dict], max_seq_length: int, lookahead: int = 0) -> list[PackedRow]:
    """Pack whole samples into rows of at most `max_seq_length` tokens.

    lookahead=0 (default): next fit in order; concatenating the rows' samples gives `samples` back.
    lookahead=k: when the next sample doesn't fit the open row, the first of the k samples after it that
        fits is taken instead (deterministic; a sample is pulled ahead of at most k others).
    A sample is never split; each must already fit (data.prepare_dataset truncates to max_seq_length).
    """
    if max_seq_length < 1:
        raise PackingError(f"max_seq_length must be positive, got {max_seq_length}")
    if lookahead < 0:
        raise PackingError(f"lookahead must be >= 0, got {lookahead}")
    lengths = [_length(s, i, max_seq_length) for i, s in enumerate(samples)]
    rows: list[PackedRow] = []

    def close(idx: list[int]) -> None:
        rows.append(PackedRow(tuple(samples[i] for i in idx), tuple(idx), max_seq_length))

    if lookahead == 0:
        idx, used = [], 0
        for i, n in enumerate(lengths):
            if used + n > max_seq_length:
                close(idx)
                idx, used = [], 0
            idx.append(i)
            used += n
        if idx:
            close(idx)
        return rows

    taken = [False] * len(lengths)
    head = 0
    while head < len(lengths):
        idx, used = [], 0
        while True:
            # The first untaken sample among the next 1 + lookahead untaken ones that fits the open row.
            pick, seen, j = None, 0, head
            while j < len(lengths) and seen <= lookahead:
                if not taken[j]:
                    if used + lengths[j] <= max_seq_length:
                        pick = j
                        break
                    seen += 1
                j += 1
            if pick is None:
                break
            taken[pick] = True
            idx.append(pick)
            used += lengths[pick]
            while head < len(lengths) and taken[head]:
                head += 1
        close(idx)
    return rows


# ---------------------------------------------------------------- attention mode

@lru_cache(None)
def transformers_builds_packed_mask() -> bool:
    """Whether the installed transformers turns restarting `position_ids` (with no attention_mask and no
    cache) into a block-diagonal causal mask for sdpa/eager/flex.

    Checked by doing it, not by version: `masking_utils.create_causal_mask` is called on a 5-token row of
    two sequences (positions 0 1 2 0 1) and the mask it returns must be exactly the document mask. Mask
    construction is shared by sdpa, eager and flex in masking_utils (`_preprocess_mask_arguments` →
    `find_packed_sequence_indices` → an extra `packed_sequence_mask_function` and-ed into the causal one),
    so the sdpa probe stands for all three. Present in transformers 4.57 (only with torch >= 2.6), 5.17 and
    5.24; absent or broken anywhere else → False, and the caller builds the mask itself.
    """
    try:
        import torch
        from transformers import LlamaConfig

        create_causal_mask = packed_mask_builder()
        if create_causal_mask is None:
            return False
        cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1)
        cfg._attn_implementation = "sdpa"
        position_ids = torch.tensor([[0, 1, 2, 0, 1]])
        mask = call_create_causal_mask(create_causal_mask, cfg, torch.zeros(1, 5, 8), position_ids)
        expected = document_mask(torch.tensor([[0, 0, 0, 1, 1]]))[0, 0]
        return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
                and tuple(mask.shape[-2:]) == (5, 5) and bool((mask[0, 0] == expected).all()))
    except Exception:
        return False


def packing_attention_mode(model) -> str:
    """How a packed batch keeps attention inside each sample for this model, with the installed versions.

    * "flash_varlen" — attn_implementation flash_attention_2/3 (or a hub flash kernel). transformers'
      flash path calls the varlen kernel when given `cu_seq_lens_q/k` + `max_length_q/k` (any batch size;
      from `position_ids` alone it only does so for a batch of one row), so the collator adds them.
      Cheapest: no mask, no work on the padding between samples.
    * "position_ids" — sdpa, eager or flex_attention, and `transformers_builds_packed_mask()` holds:
      transformers derives the document mask from the restarting `position_ids` itself (this is the case
      with transformers 5.17 and 5.24; checked at run time). The batch carries no attention_mask. The
      detection is skipped when a KV cache exists, so call the model with `use_cache=False` (turbotune's
      loader already sets config.use_cache=False; a stock model has it True and would then silently
      attend across samples).
    * "mask_4d" — sdpa or eager where transformers does not do it (transformers 4.57 with torch < 2.6, or
      any version whose masking code changed): the collator passes the 4-D document mask as
      `attention_mask`, which transformers hands to attention unchanged: boolean for sdpa, additive
      (0 / dtype minimum) for eager. Always correct; SDPA then cannot use its flash kernel (neither can it
      in "position_ids" mode, where transformers materialises the same mask).

    Raises PackingError for flex_attention without transformers' own support (a tensor mask in its
    score_mod crashed torch 2.13 on the CPU; load with sdpa) and for attention that takes no mask (paged,
    custom kernels).
    """
    base = unwrap_peft(model)
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    if not isinstance(impl, str):
        raise PackingError(f"per-module attention implementations ({impl!r}) are not supported by packing")
    if "flash" in impl and "paged" not in impl:
        return MODE_FLASH_VARLEN
    if impl in ("sdpa", "eager", "flex_attention"):
        if transformers_builds_packed_mask():
            return MODE_POSITION_IDS
        if impl == "flex_attention":
            raise PackingError("this transformers does not build packed-sequence masks for flex_attention; "
                               "load the model with attn_implementation='sdpa' to use packing")
        return MODE_MASK_4D
    raise PackingError(f"packing needs sdpa, eager, flex_attention or flash_attention_2/3 attention; this model "
                       f"uses {impl!r}. Load it with attn_implementation='sdpa' or turn packing off.")


def has_sliding_window(config) -> bool:
    """Whether some layer attends within a sliding window (Mistral, Qwen2 with use_sliding_window, Gemma 2/3)."""
    if getattr(config, "sliding_window", None) in (None, 0):
        return False
    if getattr(config, "model_type", None) in ("qwen2", "qwen2_moe") and not getattr(config, "use_sliding_window",
                                                                                      False):
        return False
    types = getattr(config, "layer_types", None)
    return True if types is None else any("sliding" in str(t) for t in types)


def _mask_format(impl: str) -> str:
    return MASK_ADDITIVE if impl == "eager" else MASK_BOOL


# ---------------------------------------------------------------- collation

def document_mask(seq_ids):
    """[B, L] sample ids → [B, 1, L, L] boolean mask: True where query i may attend key j
    (same sample and j <= i)."""
    import torch

    L = seq_ids.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_ids.device).tril()
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    return (same & causal)[:, None]


class PackingCollator:
    """Packed rows → one micro-batch [B, L], L = the longest row (rounded up to `pad_to_multiple_of`).

    Every key is a model input except "num_tokens" (an int: real tokens, for tokens/s), which the caller
    pops before the forward:
      input_ids     [B, L] the rows' tokens, then `pad_id` after the last sample
      labels        [B, L] the samples' labels, with -100 on each sample's first token (see the module
                           docstring: no position predicts across a boundary) and on the padding
      position_ids  [B, L] 0..len-1 for each sample; the padding tail counts 0..k-1 as a sample of its own
                           (it sees only itself, no real token sees it, it has no labels)
    and by mode:
      "position_ids": nothing else, in particular no attention_mask
      "flash_varlen": cu_seq_lens_q/k (int32, boundaries over the flattened B*L tokens, the padding tails
                      included as segments) and max_length_q/k (ints)
      "mask_4d":      attention_mask, the document mask in `mask_format` (see MASK_*)

    Rows are PackedRow objects, or plain lists of samples (then each list must fit one row). Use
    `for_model` to pick mode and mask format from the model.
    """

    def __init__(self, tokenizer_or_pad_id: Any, mode: str = MODE_POSITION_IDS, mask_format: str = MASK_BOOL,
                 mask_dtype=None, pad_to_multiple_of: int | None = None):
        if mode not in MODES:
            raise PackingError(f"mode must be one of {MODES}, got {mode!r}")
        if mask_format not in (MASK_BOOL, MASK_ADDITIVE):
            raise PackingError(f"unknown mask_format {mask_format!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise PackingError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if isinstance(tokenizer_or_pad_id, int):
            pad_id = tokenizer_or_pad_id
        else:
            pad_id = getattr(tokenizer_or_pad_id, "pad_token_id", None)
            if pad_id is None:  # never attended to nor scored, so any id does
                pad_id = getattr(tokenizer_or_pad_id, "eos_token_id", None)
            if pad_id is None:
                raise PackingError("the tokenizer has neither a pad nor an eos token; pass a pad id")
        self.pad_id = int(pad_id)
        self.mode = mode
        self.mask_format = mask_format
        self.mask_dtype = mask_dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        # turbotune's patched attention takes the samples' offsets itself (for_model; TURBOTUNE_FLASH_VARLEN=0: not):
        # fixed-size cu_seq_lens over the flattened rows, beside the mode's own keys (which it then ignores)
        self.sequence_offsets = False

    @classmethod
    def for_model(cls, model, tokenizer_or_pad_id: Any, pad_to_multiple_of: int | None = None,
                  no_host_sync: bool = False) -> "PackingCollator":
        """The collator for this model: mode from `packing_attention_mode`, mask format from its attention.

        no_host_sync: the step will be captured in a CUDA graph (turbotune.training.cuda_graphs), where nothing may wait
        for the host. transformers' packed-sequence detection ("position_ids" mode) reads a GPU value on the
        host unless it knows a graph is being captured (`transformers_mask_is_capture_safe`: 5.17 and 5.24
        do). Where it doesn't, the collator builds the document mask itself ("mask_4d"), for sdpa and eager
        only: that mask has no sliding window, so models with one keep "position_ids" (their capture then
        fails and the run continues eagerly, with a warning), and flex_attention takes no tensor mask."""
        import torch

        mode = packing_attention_mode(model)
        if no_host_sync and mode == MODE_POSITION_IDS and not transformers_mask_is_capture_safe():
            base = unwrap_peft(model)
            impl = getattr(base.config, "_attn_implementation", None) or "eager"
            if impl in ("sdpa", "eager") and not has_sliding_window(base.config):
                mode = MODE_MASK_4D
        base = unwrap_peft(model)
        impl = getattr(base.config, "_attn_implementation", None) or "eager"
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            dtype = torch.float32
        collator = cls(tokenizer_or_pad_id, mode=mode, mask_format=_mask_format(impl), mask_dtype=dtype,
                       pad_to_multiple_of=pad_to_multiple_of)
        from turbotune.model.state import turbo_state
        collator.sequence_offsets = (mode != MODE_FLASH_VARLEN and varlen_enabled()
                                     and turbo_state(base).family is not None)
        return collator

    def __call__(self, rows: Iterable) -> dict:
        import torch

        rows = [r.samples if isinstance(r, PackedRow) else tuple(r) for r in rows]
        if not rows or any(len(r) == 0 for r in rows):
            raise PackingError("cannot collate an empty batch or an empty row")
        row_ids, row_labels, row_pos, row_seq, seg_lens = [], [], [], [], []
        for r in rows:
            ids, labels, pos, seq, lens = [], [], [], [], []
            for k, s in enumerate(r):
                x = [int(t) for t in s["input_ids"]]
                y = [int(t) for t in s["labels"]] if s.get("labels") is not None else list(x)
                if len(x) != len(y):
                    raise PackingError(f"{s.get('where', 'a sample')}: {len(x)} input_ids but {len(y)} labels")
                y[0] = IGNORE_INDEX  # the boundary rule: nothing predicts a sample's first token
                ids += x
                labels += y
                pos += range(len(x))
                seq += [k] * len(x)
                lens.append(len(x))
            row_ids.append(ids), row_labels.append(labels), row_pos.append(pos), row_seq.append(seq)
            seg_lens.append(lens)
        L = max(len(x) for x in row_ids)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        seq_ids = torch.zeros((B, L), dtype=torch.long)
        cu = [0]
        for b in range(B):
            n = len(row_ids[b])
            input_ids[b, :n] = torch.tensor(row_ids[b], dtype=torch.long)
            labels[b, :n] = torch.tensor(row_labels[b], dtype=torch.long)
            position_ids[b, :n] = torch.tensor(row_pos[b], dtype=torch.long)
            seq_ids[b, :n] = torch.tensor(row_seq[b], dtype=torch.long)
            tail = L - n
            lens = seg_lens[b] + ([tail] if tail else [])
            if tail:
                position_ids[b, n:] = torch.arange(tail)
                seq_ids[b, n:] = len(seg_lens[b])  # the padding tail is a sample of its own
            for m in lens:
                cu.append(cu[-1] + m)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "num_tokens": sum(len(x) for x in row_ids)}
        if self.mode == MODE_FLASH_VARLEN:
            cu_t = torch.tensor(cu, dtype=torch.int32)
            longest = int(max(b - a for a, b in zip(cu, cu[1:])))
            batch.update(cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t.clone(), max_length_q=longest, max_length_k=longest)
        elif self.sequence_offsets and len(cu) <= MAX_SEQUENCES + 1:  # else the mode's mask, as without
            offsets = sequence_offsets(torch.tensor([b - a for a, b in zip(cu, cu[1:])]), cu[-1])
            batch.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets.clone(), max_length_q=L, max_length_k=L)
        if self.mode == MODE_MASK_4D:
            mask = document_mask(seq_ids)
            if self.mask_format == MASK_ADDITIVE:
                dtype = self.mask_dtype or torch.float32
                mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
            batch["attention_mask"] = mask
        return batch


# ---------------------------------------------------------------- stats

def fill_rows(batch: dict, rows: int) -> dict:
    """A collated packed batch grown to `rows` rows by repeating its last row with every label -100: the loss,
    the gradients and `num_tokens` are unchanged, and the batch keeps the shape of the others (a CUDA graph
    replays only the shape it captured)."""
    import torch

    have = batch["input_ids"].shape[0]
    offsets = batch.get("cu_seq_lens_q")
    fixed = offsets is not None and offsets.numel() == MAX_SEQUENCES + 1  # the collator's fixed-size offsets
    if have >= rows or (offsets is not None and not fixed):  # flash varlen's own tables: leave them be
        return batch
    used = int((offsets < offsets[-1]).sum()) + 1 if fixed else 0  # 0, the boundaries, then the real rows' end
    if fixed and used + (rows - have) > MAX_SEQUENCES + 1:
        return batch  # no room for the new rows' segments
    out = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == have and key not in _OFFSET_KEYS:
            extra = value[-1:].expand(rows - have, *value.shape[1:])
            if key == "labels":
                extra = torch.full_like(extra, IGNORE_INDEX)
            out[key] = torch.cat([value, extra], dim=0)
    if fixed:  # each added row is one more sample of its own (label-free, seen by no real token)
        length = batch["input_ids"].shape[1]
        grown = offsets.clone()
        ends = torch.arange(have + 1, rows + 1, dtype=offsets.dtype, device=offsets.device) * length
        grown[used:used + len(ends)] = ends
        grown[used + len(ends):] = rows * length
        out["cu_seq_lens_q"], out["cu_seq_lens_k"] = grown, grown.clone()
    return out


def packing_efficiency(rows: Sequence[PackedRow], max_seq_length: int | None = None) -> float:
    """Real tokens / (rows × max_seq_length): the share of a full-length row budget that is real tokens."""
    if not rows:
        return 0.0
    L = max_seq_length or rows[0].max_seq_length
    return sum(r.n_tokens for r in rows) / (len(rows) * L)


def padded_efficiency(samples: Sequence[dict], batch_size: int, pad_to: int | None = None) -> float:
    """Real tokens / tokens computed when the same samples, in the same order, are padded in micro-batches
    of `batch_size` (data.DataCollator: each micro-batch padded to its longest sample). With `pad_to`
    (e.g. max_seq_length), every sample is padded to that length instead."""
    if not samples:
        return 0.0
    if batch_size < 1:
        raise PackingError(f"batch_size must be positive, got {batch_size}")
    lengths = [len(s["input_ids"]) for s in samples]
    if pad_to:
        return sum(lengths) / (len(lengths) * pad_to)
    computed = sum(len(chunk) * max(chunk) for chunk in
                   (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))
    return sum(lengths) / computed


@dataclass
class PackingStats:
    samples: int
    rows: int
    max_seq_length: int
    tokens: int
    packed: float          # packing_efficiency(rows)
    padded: float          # padded_efficiency(samples, batch_size)
    padded_full: float     # padded to max_seq_length
    batch_size: int

    def line(self) -> str:
        gain = self.packed / self.padded if self.padded else float("nan")
        return (f"packing: {self.samples:,} samples ({self.tokens:,} tokens) in {self.rows:,} rows of "
                f"{self.max_seq_length:,}: {self.packed:.1%} real tokens; padded batches of {self.batch_size}: "
                f"{self.padded:.1%} ({gain:.2f}× fewer tokens computed with packing), "
                f"padded to {self.max_seq_length:,}: {self.padded_full:.1%}")


def packing_stats(samples: Sequence[dict], rows: Sequence[PackedRow], batch_size: int) -> PackingStats:
    """The numbers for the report line (`.line()`): packed vs padded efficiency of the same samples."""
    L = rows[0].max_seq_length if rows else 0
    return PackingStats(samples=len(samples), rows=len(rows), max_seq_length=L,
                        tokens=sum(len(s["input_ids"]) for s in samples),
                        packed=packing_efficiency(rows), padded=padded_efficiency(samples, batch_size),
                        padded_full=padded_efficiency(samples, batch_size, pad_to=L) if L else 0.0,
                        batch_size=batch_size)
