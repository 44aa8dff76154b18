"""`use_gradient_checkpointing="auto"`: recompute (or offload) only when memory requires it.

Recomputing every layer costs about a third more matrix work; on a card with room to spare that is waste. Given
the sequence length and micro-batch, the planner (planner.py) predicts the peak of each mode from the config;
the cheapest mode whose prediction fits the card, with a safety margin, wins:

    none (keep every activation)  →  recompute (keep each layer's input)  →  offload (inputs on the host)

On the CPU there is no card to fit: "auto" keeps transformers' recompute, the conservative choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._compat import unwrap_peft

MODES = ("none", "recompute", "offload")
SAFETY_MARGIN = 0.85  # the planner is an estimate (±10% measured on qwen2-1.5b); leave room for it


@dataclass
class CheckpointingChoice:
    mode: str
    predicted_bytes: int | None
    budget_bytes: int | None
    reason: str

    def line(self) -> str:
        return f"gradient checkpointing: {self.mode} ({self.reason})"


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
    from .planner import predict_peak

    base = unwrap_peft(model)
    device = device or next(base.parameters()).device
    if budget_bytes is None:
        if device.type != "cuda":
            return CheckpointingChoice("recompute", None, None, "no GPU to plan for; the conservative choice")
        budget_bytes = device_budget(device)
    qlora = bool(getattr(base, "is_loaded_in_4bit", False))
    usable = int(budget_bytes * SAFETY_MARGIN)
    last = None
    for mode in MODES:
        plan = predict_peak(base.config, seq_len, batch, qlora=qlora, lora_r=_lora_rank(model), checkpointing=mode,
                            dtype=base.dtype)
        last = plan
        if plan.total_bytes <= usable:
            return CheckpointingChoice(mode, plan.total_bytes, budget_bytes,
                                       f"predicted {plan.total_bytes / 2**30:.1f} GiB of {budget_bytes / 2**30:.1f} "
                                       f"GiB usable at seq {seq_len} × batch {batch}")
    return CheckpointingChoice("offload", last.total_bytes if last else None, budget_bytes,
                               "nothing is predicted to fit; offload needs the least GPU memory")


def apply_checkpointing_choice(model, choice: CheckpointingChoice) -> None:
    from .lora import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, {"none": False, "recompute": True, "offload": "offload"}[choice.mode])
    model.__dict__["_turbotune_checkpointing"] = choice.mode


def plan_checkpointing(model, seq_len: int, batch: int, budget_bytes: int | None = None) -> CheckpointingChoice:
    """Choose and apply; returns the choice (its `line()` is what the run prints first)."""
    choice = choose_checkpointing(model, seq_len, batch, budget_bytes)
    apply_checkpointing_choice(model, choice)
    return choice
