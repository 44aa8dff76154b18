"""Adding LoRA: PEFT modules with turbotune's defaults.

    base:   y = x Wᵀ                      W frozen ([out, in]; 16-bit, or 4-bit NF4)
    LoRA:   y = x Wᵀ + s · (x Aᵀ) Bᵀ      A [r, in] (random), B [out, r] (zeros), s = alpha / r

Only A and B train. The adapter is a normal PEFT adapter: `save_pretrained` writes adapter_config.json +
adapter_model.safetensors, loadable by PEFT and by `AutoModelForCausalLM.from_pretrained(adapter_dir)`.
The fused forward/backward of these modules lives in kernels/fused_lora.py and is wired in by the family
patch (models/); this module only decides what is trainable.
"""
from __future__ import annotations

import torch

from turbotune._compat import (
    checkpointing_disable,
    checkpointing_enable,
    is_checkpointing,
)
from turbotune.errors import ConfigError
from turbotune.model.loader import count_parameters
from turbotune.model.state import turbo_state

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Families that fuse projections into one linear (Phi-3: qkv_proj, gate_up_proj): asking for any of the parts
# means the fused module, or those weights would silently get no adapter.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def resolve_target_modules(model, targets: list[str], verbose: bool = True) -> list[str]:
    """The target names as this model spells them: parts of a fused projection become the fused module; names
    the model does not have are dropped with a note (an error when none is left)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    notes = []
    for fused, parts in FUSED_PROJECTIONS.items():
        asked = [t for t in targets if t in parts and t not in present]
        if fused in present and asked:
            targets = [t for t in targets if t not in parts] + ([fused] if fused not in targets else [])
            notes.append(f"{'/'.join(asked)} are fused as {fused} here: LoRA goes on {fused}")
    out = [t for t in targets if t in present]
    if not out:
        raise ConfigError(f"none of the target modules {targets} exist in this model; "
                          f"linear layers here include {sorted(n for n in present if n.endswith('proj'))[:12]}")
    missing = [t for t in targets if t not in present]
    if missing:
        notes.append(f"not in this model, so without LoRA: {', '.join(missing)}")
    if notes and verbose:
        print(f"[turbotune] target modules: {'; '.join(notes)}", flush=True)
    return out


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
                or getattr(model, "quantization_method", None))


def enable_gradient_checkpointing(model, mode=True) -> None:
    """True: recompute each decoder layer in the backward (non-reentrant). False: keep all activations.
    'offload': recompute, and keep each layer's input in host memory meanwhile (turbotune.model.checkpointing)."""
    from turbotune.model.checkpointing import OffloadedCheckpointing, remove_offloaded_checkpointing

    if mode in (False, None, "none"):
        remove_offloaded_checkpointing(model)
        if is_checkpointing(model):
            checkpointing_disable(model)
        return
    if mode not in (True, "true", "unsloth", "auto", "offload"):
        raise ConfigError(f"use_gradient_checkpointing={mode!r}: use True, False, 'auto' or 'offload'")
    remove_offloaded_checkpointing(model)
    # Without dropout a layer draws no random numbers, so saving the RNG state for the recompute is
    # pointless (and reading it is not allowed while a CUDA graph is being captured).
    if mode == "offload":
        # also switches transformers' checkpointing off
        OffloadedCheckpointing(preserve_rng_state=uses_dropout(model)).apply(model)
    else:
        checkpointing_enable(model, use_reentrant=False, preserve_rng_state=uses_dropout(model))
        from turbotune.model.recompute import mark_recompute_in
        mark_recompute_in(model)  # fused blocks may then skip work whose result the recompute throws away
    model.config.use_cache = False


def fused_lora_reason(model) -> str | None:
    """Why the first LoRA layer can't take the fused path (None when it can, or when there is no LoRA layer)."""
    from turbotune.model.kernels.lora_parts import fused_lora_unsupported_reason

    for _, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            return fused_lora_unsupported_reason(module)
    return None


def get_peft_model(model, r=16, lora_alpha=None, lora_dropout=0.0, target_modules=None, bias="none",
                   use_gradient_checkpointing=True, random_state=3407, use_rslora=False, modules_to_save=None,
                   init_lora_weights=True, verbose=True, adapter_precision="peft", **lora_kwargs):
    """Wrap `model` with PEFT LoRA adapters and make it ready to train. Returns the PeftModel.

    lora_alpha: None (the default of every entry point) means r: the adapters' scale alpha / r is 1.
    adapter_precision: where the fused path runs LoRA's rank-r products. "peft" (default): in the adapters'
    dtype, exactly as PEFT (fp32 adapters: x is upcast). "input": in the model's compute dtype, as Unsloth
    does; faster under bf16 (no fp32 copies of activations), results differ by bf16 rounding only."""
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as peft_get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError("this model already has LoRA adapters; call get_peft_model on the base model")
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be positive, got {r}")
    lora_alpha = r if lora_alpha is None else lora_alpha
    from turbotune.model.kernels.fused_lora import ADAPTER_PRECISIONS
    if adapter_precision not in ADAPTER_PRECISIONS:
        raise ConfigError(f"adapter_precision must be one of {ADAPTER_PRECISIONS}, got {adapter_precision!r}")
    if target_modules is None:
        target_modules = list(DEFAULT_TARGET_MODULES)
    if isinstance(target_modules, (list, tuple)):
        target_modules = resolve_target_modules(model, list(target_modules), verbose)

    # Frozen base; for a 4-bit base, inputs need grads to flow through frozen layers into LoRA. We do not
    # upcast norms/embeddings to fp32 as prepare_model_for_kbit_training does: it costs memory and changes
    # nothing in the math of the trainable part (the reference recipe is benchmarked separately).
    for p in model.parameters():
        p.requires_grad_(False)
    if _is_quantized(model):
        model.is_parallelizable = True

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                        bias=bias, task_type="CAUSAL_LM", use_rslora=use_rslora, modules_to_save=modules_to_save,
                        init_lora_weights=init_lora_weights, **lora_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)  # the same adapters' initial values on every run
        peft_model = peft_get_peft_model(model, config)
    state = turbo_state(peft_model)
    if state.toggles is not None:
        state.toggles.adapter_precision = adapter_precision
    enable_gradient_checkpointing(peft_model, use_gradient_checkpointing)
    # "auto": recompute until the run's shapes are known; the trainer (or auto_checkpointing.plan_checkpointing)
    # then keeps whatever the memory plan allows. A fixed mode clears an earlier wrapping's plan.
    state.checkpointing = "auto" if use_gradient_checkpointing == "auto" else None
    if use_gradient_checkpointing and hasattr(peft_model, "enable_input_require_grads"):
        peft_model.enable_input_require_grads()
    reason = fused_lora_reason(peft_model)
    if reason and verbose:
        print(f"[turbotune] fused LoRA off ({reason}): the stock PEFT forward runs for these layers (slower); "
              "the fused path needs dropout 0, no DoRA and no LoRA bias", flush=True)
    if verbose:
        trainable, total = count_parameters(peft_model)
        print(f"[turbotune] LoRA r={r} alpha={lora_alpha} on {', '.join(target_modules) if not isinstance(target_modules, str) else target_modules}: "
              f"trainable {trainable:,} / total {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)",
              flush=True)
    return peft_model


def uses_dropout(model) -> bool:
    """True when a forward in training mode draws random numbers (an nn.Dropout with p > 0, attention dropout)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop"):
        if float(getattr(cfg, name, 0.0) or 0.0) > 0:
            return True
    return False
