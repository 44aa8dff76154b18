"""`turbotune plan`: the command line and the printed table of the memory planner (planner/predict.py: the model)."""
from __future__ import annotations

import argparse
import json
import re
import sys

from turbotune.planner.parallel import PARALLEL_LABELS, PARALLEL_MODES, predict_per_gpu
from turbotune.planner.search import max_batch_size, max_seq_len
from turbotune.model.host_buffers import host_memory_bytes
from turbotune.planner.summary import gib
from turbotune.planner.predict import (
    ADAPTER_BYTES,
    CHECKPOINTING_MODES,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    FRAGMENTATION,
    METHODS,
    GiB,
    MiB,
    Plan,
    PlanError,
    model_shape,
    resolve_config,
)

# --------------------------------------------------------------------------------------------- output
_MEM_UNITS = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": MiB, "mb": MiB, "mib": MiB, "t": 1024 * GiB,
              "tb": 1024 * GiB, "tib": 1024 * GiB}


def parse_memory(text) -> int:
    """'24GB', '24GiB', '24', '80g', '24000MB' -> bytes. GB and GiB both mean 2^30 (a "24 GB" card has 24 GiB)."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _MEM_UNITS:
        raise PlanError(f"--gpu-memory {text!r}: use a size like 24GB, 80GiB or 40000MB")
    value = float(m.group(1)) * _MEM_UNITS[m.group(2).lower()]
    if value <= 0:
        raise PlanError(f"--gpu-memory {text!r} must be positive")
    return int(value)


HOST_FRACTION = 0.8  # of the host's RAM that pinned (unswappable) offload buffers may take


def host_max_seq_len(plan: Plan, host_bytes: int | None) -> int | None:
    """The longest sequence (at the plan's batch) whose offloaded layer inputs fit HOST_FRACTION of the host's
    RAM; None when nothing is offloaded or the RAM is unknown."""
    if not plan.host_bytes or not host_bytes:
        return None
    per_token = plan.host_bytes / (plan.seq_len * plan.batch_size)
    return int(HOST_FRACTION * host_bytes / (per_token * plan.batch_size))


def _not_at_peak(phase: str) -> str:
    """The note of an item not counted at the peak: its phase is the smaller one (or, kept activations under a
    DDP all-reduce peak, freed by then)."""
    if phase == "kept":
        return "not at the peak (freed before the gradient all-reduce)"
    name = {"loss": "loss", "reduce": "gradient all-reduce"}.get(phase, "layer backward")
    return f"not at the peak (the {name} phase is smaller)"


def format_plan(plan: Plan, budget_bytes: int | None = None, fits_table: list[dict] | None = None,
                other: Plan | None = None, host_bytes: int | None = None) -> str:
    """The table `turbotune plan` prints."""
    quant = ("QLoRA 4-bit NF4" + ("" if plan.double_quant else " (no double quant)")) if plan.qlora \
        else f"LoRA, {plan.dtype} base"
    lines = [f"turbotune plan: {plan.model} ({plan.model_type}, {plan.base_params / 1e9:.2f} B params) · {quant} · "
             f"r={plan.lora_r} · method {plan.method}",
             f"seq {plan.seq_len:,} × batch {plan.batch_size} = {plan.seq_len * plan.batch_size:,} tokens · "
             f"checkpointing {plan.checkpointing}",
             ""]
    if plan.gpus > 1:
        lines[-1:-1] = [f"per GPU: {PARALLEL_LABELS[plan.parallel]} over {plan.gpus} GPUs, batch {plan.batch_size} "
                        "per rank (predicted; not yet measured on several GPUs)"]
    width = max(len(i.label) for i in plan.items) + 2
    lines.append(f"{'item':<{width}}{'GiB':>8}  note")
    lines.append("-" * (width + 8 + 40))
    for i in plan.items:
        if i.key == "fragmentation":
            lines.append(f"{'= peak allocated (torch.cuda.max_memory_allocated)':<{width}}"
                         f"{gib(plan.allocated_bytes):>8}  at the {plan.peak_phase} phase")
        value = gib(i.bytes) if i.counted else f"[{gib(i.bytes)}]"
        note = i.note if i.counted else _not_at_peak(i.phase)
        lines.append(f"{i.label:<{width}}{value:>8}  {note}".rstrip())
    lines.append("-" * (width + 8 + 40))
    verdict = ""
    if budget_bytes is not None:
        verdict = f"  fits {gib(budget_bytes)} GiB: {'yes' if plan.total_bytes <= budget_bytes else 'NO'}"
    total = "= total" + (" per GPU" if plan.gpus > 1 else "")
    lines.append(f"{total:<{width}}{gib(plan.total_bytes):>8}{verdict}")
    if plan.host_bytes:
        lines.append(f"+ pinned host memory for the offloaded layer inputs: {gib(plan.host_bytes)} GiB"
                     + (f" of this machine's {gib(host_bytes)} GiB RAM"
                        + ("" if plan.host_bytes <= HOST_FRACTION * host_bytes else
                           f": MORE than {HOST_FRACTION:.0%} of it") if host_bytes else ""))
    if other is not None:
        lines.append(f"(the same step with method {other.method}: {gib(other.total_bytes)} GiB total, "
                     f"{gib(other.allocated_bytes)} GiB allocated)")
    if fits_table:
        lines += ["", f"largest that fit {gib(budget_bytes)} GiB (method {plan.method}):",
                  f"  {'checkpointing':<14}{'max seq (batch ' + str(plan.batch_size) + ')':>22}"
                  f"{'max batch (seq ' + format(plan.seq_len, ',') + ')':>24}"]
        for row in fits_table:
            seq = "none fits" if row["max_seq_len"] == 0 else \
                f"{'≥ ' if row['seq_capped'] else ''}{row['max_seq_len']:,}"
            bat = "none fits" if row["max_batch_size"] == 0 else \
                f"{'≥ ' if row['batch_capped'] else ''}{row['max_batch_size']:,}"
            host = row.get("host_max_seq_len")
            note = f"  (host RAM: up to {host:,})" if host is not None and host < row["max_seq_len"] else ""
            lines.append(f"  {row['checkpointing']:<14}{seq:>22}{bat:>24}{note}")
        if any(r["seq_capped"] for r in fits_table):
            lines.append("  (≥: the search stops at the model's max_position_embeddings)")
        if any(r.get("host_max_seq_len") is not None and r["host_max_seq_len"] < r["max_seq_len"]
               for r in fits_table):
            lines.append(f"  (host RAM: the longest whose offloaded inputs fit {HOST_FRACTION:.0%} of this "
                         "machine's RAM, pinned; --host-memory to plan for another)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Predict the peak GPU memory of a LoRA / QLoRA training step from the model config "
                          "alone (nothing is loaded onto a GPU), and the largest sequence length and batch that "
                          "fit a GPU.")
    parser.add_argument("--model", required=True,
                        help="bench preset (tiny, smollm2-135m, qwen2-1.5b, llama3-8b), model folder, or cached hub id")
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights")
    parser.add_argument("--no-double-quant", action="store_false", dest="double_quant",
                        help="4-bit without double quantisation of the absmax scales")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch size (default 2)")
    parser.add_argument("--gpu-memory", default="24GB",
                        help="GPU memory to fit, e.g. 24GB, 80GiB, 40000MB (GB = GiB; default 24GB)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on the seven projections (default 16)")
    parser.add_argument("--checkpointing", choices=CHECKPOINTING_MODES, default="recompute",
                        help="activation checkpointing (default recompute)")
    parser.add_argument("--method", choices=METHODS, default="turbotune",
                        help="turbotune's fused path (default) or transformers + PEFT (hf)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--host-memory", default=None,
                        help="host RAM for offloaded checkpointing's pinned buffers, e.g. 128GB (default: this "
                             "machine's)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs trained on (torchrun ranks, --batch-size per rank): the prediction is per GPU "
                             "(default 1; predicted; not yet measured on several GPUs)")
    parser.add_argument("--parallel", choices=PARALLEL_MODES, default="ddp",
                        help="with --gpus > 1: ddp (a whole model per GPU, default) or fsdp (FSDP2: the model "
                             "sharded over the GPUs; not with --qlora)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _plan_document(args) -> tuple[dict, str]:
    name, config = resolve_config(args.model)
    shape = model_shape(config)
    budget = parse_memory(args.gpu_memory)
    host = parse_memory(args.host_memory) if getattr(args, "host_memory", None) else host_memory_bytes()
    kw = dict(qlora=args.qlora, lora_r=args.lora_r, method=args.method, dtype=args.dtype,
              double_quant=args.double_quant, gpus=getattr(args, "gpus", 1), parallel=getattr(args, "parallel", "ddp"))
    plan = predict_per_gpu(shape, args.seq_len, args.batch_size, checkpointing=args.checkpointing, name=name, **kw)
    other_method = "hf" if args.method == "turbotune" else "turbotune"
    other = predict_per_gpu(shape, args.seq_len, args.batch_size, checkpointing=args.checkpointing, name=name,
                         **{**kw, "method": other_method})
    rows = []
    for mode in CHECKPOINTING_MODES:
        seq, seq_capped = max_seq_len(shape, budget, args.batch_size, checkpointing=mode, **kw)
        bat, bat_capped = max_batch_size(shape, budget, args.seq_len, checkpointing=mode, **kw)
        at_given = predict_per_gpu(shape, args.seq_len, args.batch_size, checkpointing=mode, **kw)
        rows.append({"checkpointing": mode, "max_seq_len": seq, "seq_capped": seq_capped,
                     "max_batch_size": bat, "batch_capped": bat_capped,
                     "total_bytes_at_given": at_given.total_bytes,
                     "host_max_seq_len": host_max_seq_len(at_given, host)})
    doc = plan.to_dict()
    doc.update(gpu_memory_bytes=budget, host_memory_bytes=host, fits=plan.total_bytes <= budget, max_fit=rows,
               other_method={"method": other_method, "allocated_bytes": other.allocated_bytes,
                             "total_bytes": other.total_bytes},
               constants={"cuda_context_bytes": CUDA_CONTEXT_BYTES, "fragmentation": FRAGMENTATION,
                          "cublas_workspace_bytes": CUBLAS_WORKSPACE_BYTES, "adapter_bytes": ADAPTER_BYTES})
    return doc, format_plan(plan, budget, rows, other, host)


def run_plan(args) -> int:
    """`turbotune plan`: print the table (or JSON). Returns 0, or 2 on a usage error (one line on stderr)."""
    try:
        doc, text = _plan_document(args)
    except PlanError as exc:
        print(f"turbotune plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=1) if args.json else text)
    return 0


def main(argv=None) -> int:  # python -m turbotune.cli.plan
    parser = argparse.ArgumentParser(prog="turbotune plan")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
