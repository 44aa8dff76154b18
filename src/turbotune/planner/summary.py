"""A plan in one line, for commands other than `turbotune plan` (which prints the itemised table)."""
from __future__ import annotations

from turbotune.planner.predict import GiB, Plan


def gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f}"


def prediction_line(plan: Plan) -> str:
    """One line for `turbotune train` to print at start."""
    return (f"[turbotune] predicted peak GPU memory: {gib(plan.allocated_bytes)} GiB allocated, "
            f"{gib(plan.total_bytes)} GiB with CUDA context and fragmentation (seq {plan.seq_len} × batch "
            f"{plan.batch_size}, {plan.checkpointing} checkpointing, {'QLoRA' if plan.qlora else 'LoRA'} "
            f"r={plan.lora_r}"
            + (f"; {gib(plan.host_bytes)} GiB of pinned host memory for the offloaded layer inputs"
               if plan.host_bytes else "")
            + (f"; per GPU, {'FSDP2' if plan.parallel == 'fsdp' else 'DDP'} over {plan.gpus} GPUs"
               if plan.gpus > 1 else "")
            + "; `turbotune plan` itemises it)")
