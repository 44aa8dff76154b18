"""The family registry: which forwards turbotune replaces, on which submodules, keyed by `config.model_type`.

Patching is per instance: `module.forward` is set on the loaded model's own submodules, never on a
transformers class, so two models in one process never affect each other, and `unpatch_model` puts every
original back (the record is the model's TurboState, state.py). A family module declares a `FamilySpec`;
`patch_model` walks the model and applies it.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field, fields

from torch import nn

from turbotune.model.state import AppliedPatch, turbo_state

_MISSING = object()


@dataclass
class Toggles:
    """One switch per optimisation. Everything is on by default; turn one off to compare or to debug."""
    rms_norm: bool = True      # fused RMSNorm kernel (saves only 1/rms)
    rope: bool = True          # in-place RoPE on q and k in one kernel
    act_mul: bool = True       # fused SwiGLU / GeGLU
    fused_lora: bool = True    # q/k/v, o and MLP LoRA with manual backward
    fused_ce: bool = True      # chunked linear + cross-entropy; no full logits in training
    mlp_tiling: bool = True    # fused LoRA MLP tiled over tokens when one [tokens, intermediate] tensor is huge
    # LoRA's rank-r products: "peft" in the adapters' dtype (fp32 adapters: PEFT's exact math), "input" in the
    # compute dtype (bf16 under a bf16 model, as Unsloth does: fewer casts and fp32 GEMMs, rounding differs)
    adapter_precision: str = "peft"

    @classmethod
    def from_kwargs(cls, **kw) -> "Toggles":
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"unknown patch toggles {sorted(unknown)}; known: {sorted(names)}")
        return cls(**kw)

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is True]


@dataclass
class FamilySpec:
    """How one architecture family is patched. The make_* functions take (spec, state), state being the model's
    TurboState (its toggles, its fp32-adapter backend, the originals to fall back to), and return a forward."""
    name: str
    model_types: tuple[str, ...]
    attention_cls_suffix: str = "Attention"
    mlp_cls_suffix: str = "MLP"
    norm_cls_suffix: str = "RMSNorm"
    rms_casting: str = "llama"
    rms_offset: float = 0.0
    act: str = "silu"
    # The decoder layer only adds the MLP's output to the residual stream (no norm or scale after it): the
    # recompute may then skip the down projection (recompute.py).
    mlp_output_only_to_residual: bool = False
    # Every layer uses config.sliding_window (Phi-3), rather than the window a layer sets for itself (Mistral,
    # Gemma, Qwen: the attribute `sliding_window` on the attention module).
    sliding_window_from_config: bool = False
    make_attention_forward: object = None
    make_mlp_forward: object = None
    make_norm_forward: object = None
    make_lm_forward: object = None
    notes: list[str] = field(default_factory=list)


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    for t in spec.model_types:
        FAMILIES[t] = spec
    return spec


@dataclass
class PatchReport:
    family: str | None
    model_type: str
    patched: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.patched:
            return f"model_type '{self.model_type}': nothing patched" + ("; " + "; ".join(self.notes) if self.notes else "")
        done = ", ".join(f"{k}×{v}" for k, v in self.patched.items())
        fam = f"family {self.family}" if self.family else f"unknown family '{self.model_type}' (generic path)"
        return f"{fam}: patched {done}" + ("; " + "; ".join(self.notes) if self.notes else "")


def set_forward(model: nn.Module, module: nn.Module, forward) -> None:
    """Replace one instance's forward and remember the original for undo (in the model's TurboState).

    accelerate's device hooks wrap `forward` and call `module._old_forward`; when such a hook is present we
    replace `_old_forward` so the hook keeps working. A module patched twice keeps its first record: undo
    then restores what was there before turbotune.
    """
    attr = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    patches = turbo_state(model).patches
    if module not in patches:
        patches[module] = AppliedPatch(attr, module.__dict__.get(attr, _MISSING), getattr(module, attr))
    setattr(module, attr, types.MethodType(forward, module))


def unpatch_model(model: nn.Module) -> int:
    """Put every original forward back. Returns how many were restored."""
    state = turbo_state(model)
    patches, state.patches, state.toggles, state.family = state.patches, {}, None, None
    for module, p in reversed(patches.items()):
        if p.saved is _MISSING:
            module.__dict__.pop(p.attr, None)
        else:
            setattr(module, p.attr, p.saved)
    return len(patches)


def is_patched(model: nn.Module) -> bool:
    return bool(turbo_state(model).patches)
