"""Family patches, keyed by `config.model_type`. See registry.py for how patching and undo work."""
from __future__ import annotations

from torch import nn

from turbotune._compat import unwrap_peft
from turbotune.model.state import turbo_state
from turbotune.model.families import gemma, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (each registers its family)
from turbotune.model.families.generic import make_lora_linear_forward
from turbotune.model.families.llama_like import make_lm_forward
from turbotune.model.families.registry import (
    FAMILIES, FamilySpec, PatchReport, Toggles, is_patched, register_family, set_forward, unpatch_model,
)

__all__ = ["FAMILIES", "FamilySpec", "PatchReport", "Toggles", "patch_model", "unpatch_model", "is_patched",
           "register_family", "base_causal_lm"]


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM under a PEFT wrapper (or the model itself)."""
    return unwrap_peft(model)


def _is_peft_lora_linear(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def patch_model(model: nn.Module, **toggles) -> PatchReport:
    """Patch a loaded model (or its PEFT wrapper) in place. Re-patching first undoes the earlier patch."""
    lm = base_causal_lm(model)
    if is_patched(lm):
        unpatch_model(lm)
    state = turbo_state(lm)
    state.toggles = Toggles.from_kwargs(**toggles)
    model_type = getattr(lm.config, "model_type", "?")
    spec: FamilySpec | None = FAMILIES.get(model_type)
    report = PatchReport(family=spec.name if spec else None, model_type=model_type)

    def count(kind):
        report.patched[kind] = report.patched.get(kind, 0) + 1

    if spec is None:
        report.notes.append("no turbotune family module; stock forwards with fused LoRA and fused loss")
        for _, module in lm.named_modules():
            if _is_peft_lora_linear(module):
                set_forward(lm, module, make_lora_linear_forward(state))
                count("lora_linear")
        if hasattr(lm, "lm_head") and hasattr(lm, "model"):
            set_forward(lm, lm, make_lm_forward(None, state))
            count("lm_head")
        return report

    for _, module in lm.named_modules():
        cls = type(module).__name__
        projects_qkv = hasattr(module, "q_proj") or hasattr(module, "qkv_proj")  # separate, or fused (Phi-3)
        gates = hasattr(module, "gate_proj") or hasattr(module, "gate_up_proj")
        if cls.endswith(spec.attention_cls_suffix) and projects_qkv and hasattr(module, "o_proj"):
            set_forward(lm, module, spec.make_attention_forward(spec, state))
            count("attention")
        elif cls.endswith(spec.mlp_cls_suffix) and gates and hasattr(module, "down_proj"):
            set_forward(lm, module, spec.make_mlp_forward(spec, state))
            count("mlp")
        elif cls.endswith(spec.norm_cls_suffix) and hasattr(module, "weight") and state.toggles.rms_norm:
            set_forward(lm, module, spec.make_norm_forward(spec, state))
            count("rms_norm")
    if hasattr(lm, "lm_head") and hasattr(lm, "model"):
        set_forward(lm, lm, spec.make_lm_forward(spec, state))
        count("lm_head")
    if report.patched.get("attention"):
        state.family = spec.name
    return report
