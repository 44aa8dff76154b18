"""TRL's GRPOTrainer on a turbotune model: what its calls need from the trainer hook (trainer_step.py).

GRPOTrainer alternates generation and training inside each training step:

* **generation**: `unwrap_model_for_generation` switches the model's checkpointing off, runs transformers'
  `generate` (adapter on, model left in training mode, no grad: the patched attention takes the stock forward
  whenever a KV cache is passed, so the cache works), and switches checkpointing back on. The hook stands in
  for the on switch (get_peft_model's mode stays), so without help that off switch would leave the model
  without checkpointing for the rest of the run. `pause_checkpointing` stands in for the off switch: it notes
  what it turned off, and `resume_checkpointing`, called by the on switch, puts that back. The same pair
  brackets GRPO's no-grad log-prob passes (old policy, reference).
* **log-probs with grad**: `model(input_ids, attention_mask, labels, fused_lm_head=True)` on rows that are a
  left-padded prompt followed by a right-padded completion. Served by turbotune's fused head (the sampling
  temperature folded into its logit scale: trainer_step.fused_head_refusal says where it can't be). The padding
  is removed: each row's real tokens are one span, so rotating every row left by its leading padding makes a
  right-padded batch that padding.remove_padding packs, and the per-token outputs go back in rows, rotated
  back (`rotate_left_padding`, `rotate_back`). Positions then start at 0 at each prompt's first real token, as
  in `generate`; the stock forward counts them from the row's first column, which RoPE's relative rotation
  makes the same attention (tests/training/test_grpo.py compares with the stock model).

The no-grad passes (old-policy log-probs when generation and optimizer steps are misaligned, the reference
model's with beta > 0) are not training calls: they run TRL's own fused head on the padded rows.
"""
from __future__ import annotations

import torch

from turbotune._compat import checkpointing_disable, is_checkpointing, unwrap_peft

_ROTATED = ("input_ids", "attention_mask", "labels", "position_ids")


def rotate_left_padding(tensors: dict) -> tuple[dict, torch.Tensor | None]:
    """(the batch with each row rotated left by its leading padding, the rotations); (tensors, None) where no
    row starts with padding. Costs one host sync."""
    mask, ids = tensors.get("attention_mask"), tensors.get("input_ids")
    if mask is None or ids is None or mask.dim() != 2 or ids.shape != mask.shape:
        return tensors, None
    lead = (mask == 0).int().cumprod(-1).sum(-1)  # each row's padding before its first real token
    if not bool(lead.any()):
        return tensors, None
    length = mask.shape[1]
    index = (torch.arange(length, device=mask.device) + lead.unsqueeze(1)) % length
    out = dict(tensors)
    for name in _ROTATED:
        if torch.is_tensor(out.get(name)) and out[name].shape == mask.shape:
            out[name] = out[name].gather(1, index)
    return out, lead


def rotate_back(values: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """Per-target values [B, L - 1] of rotated rows back in the unrotated rows. A row rotated by s is real from
    column s on, so its target j (predicting token j + 1) is the rotated row's j - s; the targets j < s wrap
    round to the rotated row's end, past its real tokens, where the values are zero (no target there either)."""
    n = values.shape[1]
    index = (torch.arange(n, device=values.device) - lead.to(values.device).unsqueeze(1)) % n
    return values.gather(1, index)


def pause_checkpointing(step) -> None:
    """Stands in for the model's `gradient_checkpointing_disable` (the name TRL calls) while the hook is on:
    switches transformers' checkpointing off, noting the layers it was on for ("auto" may checkpoint only some;
    "offload" never shows as transformers' checkpointing, and generation leaves it alone: it does nothing without
    grad). Only a model in training mode is paused (TRL generates from one), and the note lasts until the next
    on switch: the hook drops it at a training call (where the "auto" plan may switch checkpointing off for good)
    and at a change of train/eval mode."""
    base = unwrap_peft(step.peft_model)
    if not is_checkpointing(base):
        return
    if step.peft_model.training:
        step.paused_checkpointing = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    checkpointing_disable(base)


def resume_checkpointing(step) -> None:
    """Called by the hook's checkpointing on switch: what pause_checkpointing turned off comes back as
    get_peft_model (or the "auto" plan) set it up: recompute, its kernels told when they are being recomputed,
    on the same layers."""
    paused, step.paused_checkpointing = step.paused_checkpointing, None
    base = unwrap_peft(step.peft_model)
    if paused is None or is_checkpointing(base):
        return
    from turbotune.model.lora import enable_gradient_checkpointing
    enable_gradient_checkpointing(base, True)
    on = {id(m) for m in paused}
    for module in base.modules():
        if getattr(module, "gradient_checkpointing", False) and id(module) not in on:
            module.gradient_checkpointing = False
