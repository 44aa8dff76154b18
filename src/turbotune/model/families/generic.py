"""The generic path for families turbotune has no module for: stock forwards, plus the parts that don't
depend on the architecture — fused LoRA on each PEFT linear and the chunked linear + cross-entropy head."""
from __future__ import annotations

from turbotune.model.kernels.fused_lora import lora_linear
from turbotune.model.kernels.lora_parts import cached_lora_part


def make_lora_linear_forward(state):
    toggles = state.toggles

    def forward(self, x, *args, **kwargs):
        part = None if args or kwargs or not toggles.fused_lora else cached_lora_part(self, state.fp32_adapter_backend)
        if part is None:
            return state.original_forward(self)(x, *args, **kwargs)
        return lora_linear(x, part, toggles.adapter_precision)

    return forward
