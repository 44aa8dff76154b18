"""`use_gradient_checkpointing="auto"`: recompute (or offload) only when memory requires it.

Recomputing every layer costs about a third more matrix work; on a card with room to spare that is waste. Given
the sequence length and micro-batch, the planner (planner/predict.py) predicts the peak of each mode from the config;
the cheapest mode whose prediction fits the card, with a safety margin, wins:

    none (keep every activation)  →  recompute k of the L layers (the smallest k that fits; the others keep
    their activations)  →  recompute all  →  offload (every layer's input on the host)

On the CPU there is no card to fit: "auto" keeps transformers' recompute, the conservative choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbotune._compat import is_checkpointing, unwrap_peft
from turbotune.model.checkpointing import find_decoder_layers, get_offloaded_checkpointing
from turbotune.model.state import turbo_state

MODES = ("none", "recompute", "offload")
SAFETY_MARGIN = 0.85  # the planner is an estimate (±10% measured on qwen2-1.5b); leave room for it


@dataclass
class CheckpointingChoice:
    mode: str
    predicted_bytes: int | None
    budget_bytes: int | None
    reason: str
    layers: int | None = None  # recompute: how many decoder layers are checkpointed (None: all of them)

    def line(self) -> str:
        what = self.mode if self.layers is None else f"recompute {self.layers} of its layers"
        return f"gradient checkpointing: {what} ({self.reason})"


def _lora_rank(model) -> int:
    cfg = getattr(model, "peft_config", {}) or {}
    first = next(iter(cfg.values()), None)
    return int(getattr(first, "r", 16) or 16)


def device_budget(device: torch.device) -> int:
    """Bytes this run may use on the card: what is free plus what our process already holds."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def choose_checkpointing(model, seq_len: int, batch: int, budget_bytes: int | None = None,
                         device: torch.device | None = None) -> CheckpointingChoice:
    from turbotune.planner.predict import predict_peak

    base = unwrap_peft(model)
    device = device or next(base.parameters()).device
    if budget_bytes is None:
        if device.type != "cuda":
            return CheckpointingChoice("recompute", None, None, "no GPU to plan for; the conservative choice")
        budget_bytes = device_budget(device)
    qlora = bool(getattr(base, "is_loaded_in_4bit", False))
    usable = int(budget_bytes * SAFETY_MARGIN)

    def plan(mode, layers=None):
        return predict_peak(base.config, seq_len, batch, qlora=qlora, lora_r=_lora_rank(model), checkpointing=mode,
                            dtype=base.dtype, checkpointed_layers=layers)

    def choice(mode, p, layers=None):
        return CheckpointingChoice(mode, p.total_bytes, budget_bytes,
                                   f"predicted {p.total_bytes / 2**30:.1f} GiB of {budget_bytes / 2**30:.1f} GiB "
                                   f"usable at seq {seq_len} × batch {batch}", layers)

    p = plan("none")
    if p.total_bytes <= usable:
        return choice("none", p)
    full = plan("recompute")
    if full.total_bytes <= usable:
        # Checkpoint as few layers as fit: each one costs a second forward of that layer in backward. The
        # prediction falls as more layers are checkpointed, so bisect for the smallest count that fits.
        n_layers = len(find_decoder_layers(model))
        lo, hi = 1, n_layers
        while lo < hi:
            mid = (lo + hi) // 2
            if plan("recompute", mid).total_bytes <= usable:
                hi = mid
            else:
                lo = mid + 1
        if lo < n_layers:
            return choice("recompute", plan("recompute", lo), lo)
        return choice("recompute", full)
    p = plan("offload")
    if p.total_bytes <= usable:
        return choice("offload", p)
    return CheckpointingChoice("offload", p.total_bytes, budget_bytes,
                               "nothing is predicted to fit; offload needs the least GPU memory")



def apply_checkpointing_choice(model, choice: CheckpointingChoice) -> None:
    from turbotune.model.lora import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, {"none": False, "recompute": True, "offload": "offload"}[choice.mode])
    if choice.mode == "recompute" and choice.layers is not None:
        set_checkpointed_layers(model, choice.layers)
    turbo_state(model).checkpointing = choice.mode


def checkpointing_in_effect(model) -> str:
    """What the model's layers will do in backward, one of MODES (recompute: on some or all layers); what a
    choice applied by apply_checkpointing_choice reads back as, unless something switched it since."""
    if get_offloaded_checkpointing(model) is not None:
        return "offload"
    return "recompute" if is_checkpointing(model) else "none"


def set_checkpointed_layers(model, count: int) -> None:
    """With transformers' checkpointing on, keep it on the first `count` decoder layers only: the others save
    their activations as usual (GradientCheckpointingLayer reads its own `gradient_checkpointing` flag)."""
    layers = find_decoder_layers(model)
    if not 0 <= count <= len(layers):
        raise ValueError(f"count must be between 0 and {len(layers)}, got {count}")
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise RuntimeError("this transformers' decoder layers have no per-layer checkpointing switch")
        layer.gradient_checkpointing = i < count


def plan_checkpointing(model, seq_len: int, batch: int, budget_bytes: int | None = None) -> CheckpointingChoice:
    """Choose and apply; returns the choice (its `line()` is what the run prints first)."""
    choice = choose_checkpointing(model, seq_len, batch, budget_bytes)
    apply_checkpointing_choice(model, choice)
    return choice
