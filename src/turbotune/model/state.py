"""One record per model of what turbotune knows about it and did to it: `turbo_state(model)`.

    state = turbo_state(model)     # a PeftModel or the transformers model under it: the same object
    state.quantized, state.toggles, state.checkpointing, state.fp32_adapter_backend, ...

The state lives on the transformers model (the one PEFT wraps), not on the PEFT wrapper: patching happens
before `get_peft_model`, and the wrapper must not hide what was recorded before it existed. It is created on
first use. Markers that belong to one submodule rather than to the model stay on that submodule (see
checkpointing.py's `_ORIGINAL` on each offloaded decoder layer, kernels/lora_parts.py's `_turbotune_part`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from turbotune._compat import unwrap_peft

if TYPE_CHECKING:
    from turbotune.model.checkpointing import OffloadedCheckpointing
    from turbotune.model.families.registry import Toggles

_KEY = "_turbotune_state"  # the one key turbotune puts in a model's __dict__


@dataclass
class AppliedPatch:
    """One forward turbotune replaced (models/registry.set_forward), with what undoing it needs."""
    attr: str            # "forward", or "_old_forward" under an accelerate device hook
    saved: Any           # what the instance's __dict__ held under `attr` (registry._MISSING: nothing)
    original: Callable   # the forward in place before: what a patched forward falls back to


@dataclass
class TurboState:
    # How the base weights are stored. Read from the weights once (bitsandbytes keeps it on each 4-bit weight's
    # quant_state), so a pre-quantised `*-bnb-4bit` folder counts as much as load_in_4bit.
    quant_bits: int | None = None        # 4, or None: 16/32-bit weights
    quant_type: str | None = None        # "nf4" / "fp4" (None: not quantised, or not readable)
    double_quant: bool | None = None     # the absmax scales are themselves quantised
    # The family patch (models/): its switches (None while unpatched) and every replaced forward, for undo.
    toggles: Toggles | None = None
    patches: dict[nn.Module, AppliedPatch] = field(default_factory=dict)
    # The family whose attention forward is patched in (None: unpatched, or the generic path's stock attention):
    # callers of the inner model (trainer_step's fused head) then prepare masks as the patched lm forward does.
    family: str | None = None
    # "auto" between get_peft_model(use_gradient_checkpointing="auto") and the plan, then the mode the plan
    # chose ("none" | "recompute" | "offload"); None: a fixed mode, read from the model's own switches.
    checkpointing: str | None = None
    offload: OffloadedCheckpointing | None = None  # the offloaded checkpointing applied to this model
    # How fp32 adapters read 16-bit activations (kernels/lora_parts.FP32_ADAPTER_BACKENDS).
    fp32_adapter_backend: str = "auto"

    @property
    def quantized(self) -> bool:
        return self.quant_bits is not None

    def original_forward(self, module: nn.Module) -> Callable:
        """The forward that was in place before turbotune patched `module` (for fallbacks inside patches)."""
        return self.patches[module].original


def turbo_state(model: nn.Module) -> TurboState:
    """The TurboState of `model` (a PEFT wrapper or the transformers model under it); created on first use."""
    base = unwrap_peft(model)
    state = base.__dict__.get(_KEY)
    if state is None:
        state = base.__dict__[_KEY] = TurboState(**_read_quantization(base))
    return state


def _read_quantization(base: nn.Module) -> dict:
    """The same test as quant.is_4bit_model (a 4-bit weight anywhere, or transformers' flag), plus how."""
    for module in base.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            return dict(quant_bits=4, quant_type=getattr(qs, "quant_type", None),
                        double_quant=bool(getattr(qs, "nested", False)))
    if getattr(base, "is_loaded_in_4bit", False):
        return dict(quant_bits=4)
    return {}
