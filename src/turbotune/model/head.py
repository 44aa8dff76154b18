"""The LM head as turbotune's fused loss computes it: the weight and bias the model's output projection applies.

A plain `nn.Linear` gives its own. PEFT's `TrainableTokensWrapper` (LoraConfig's `trainable_token_indices`: the rows
of new tokens trained, e.g. a text-to-speech model's codec tokens) gives what PEFT's forward applies: with its
adapter active and not merged, the base weight with the trained rows put in (`get_merged_weights`, differentiable in
those rows) and no bias, as PEFT's `F.linear(x, W)`; otherwise the base layer's own weight and bias. Any other
head: None, and the caller keeps the stock forward.
"""
from __future__ import annotations

import torch


def output_projection(head) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    adapter = getattr(head, "token_adapter", None)
    base = getattr(adapter, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(adapter, "get_merged_weights"):
        return None
    active = adapter.active_adapters
    if adapter.disable_adapters or not active or adapter.merged:
        return base.weight, base.bias
    return adapter.get_merged_weights(active), None
