"""Per-GPU peak memory of a step trained on N GPUs: turbotune's DDP and FSDP2 (`turbotune plan --gpus N --parallel`).

Predicted; not yet measured on several GPUs. Every rank runs the same micro-batch (--batch-size is per rank), so
the activation, layer and loss terms of planner/predict.py are unchanged per rank; what changes is the static part.
With N == 1 the plan is predict_peak's, unchanged, in either mode. P = LoRA parameters (fp32, PEFT's count).

DDP (training/distributed.py: a whole model per rank)
    per GPU = predict_peak's items
            + the gradient all-reduce's flat buffers: after the last micro-step the LoRA gradients are copied into
              flat buckets of at most BUCKET_BYTES (one tensor larger than that is a bucket of its own), and every
              bucket's all_reduce is launched before the first is waited on, so all of them coexist: 4 P bytes in
              all. That happens after the last backward, when the activations and the loss buffers are freed:
              a phase of its own, "gradient all-reduce" = static + workspaces + 4 P, the peak only when it is
              larger than the step's (never for a realistic sequence; the item is then shown in brackets).
    NCCL's own buffers (outside PyTorch's allocator) are not modelled.

FSDP2 (training/fsdp.py: each decoder layer and the root are fully_shard units, every parameter Shard(0))
    weights (base linears, embeddings, norms, biases) / N   and   LoRA A, B  4 P / N     (rounded up)
    AdamW exp_avg + exp_avg_sq  8 P / N                     (the optimizer steps the local shards)
    LoRA gradients  4 P, whole: the micro-steps before the last keep accumulating *unsharded* gradients
              (set_requires_gradient_sync(False)); only the last reduce-scatters them to 4 P / N. The planner
              counts gradients for the whole step (predict.py, section 2), so the accumulating case is counted.
    + the root unit (embeddings, lm_head unless tied, final norm), whole: FSDP2 does not reshard the root after
              its forward (fully_shard's default for the root), so its gathered parameters live through the step
    + two decoder-layer units, whole (16-bit linears, norms, biases, fp32 LoRA A and B): the one running and the
              next one, all-gathered ahead by FSDP2's prefetch (forward and backward). Assumption: FSDP2's
              default prefetch holds at most two layer units gathered at once; the all-gather's send copy of a
              shard (1 / N of a unit) is not counted.
    Activations, the layer working set and the loss: as in one process (same micro-batch per rank).
    CUDA graphs are off under FSDP2; the planner counts no graph pool, so there is nothing to take away.
    A 4-bit (NF4) base is refused, as training/fsdp.py refuses it.
"""
from __future__ import annotations

import dataclasses

from turbotune.model.quant import NF4_NOT_SHARDABLE
from turbotune.planner.predict import (
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    FRAGMENTATION,
    Plan,
    PlanError,
    PlanItem,
    lora_param_count,
    model_shape,
    predict_peak,
)
from turbotune.planner.summary import gib

PARALLEL_MODES = ("ddp", "fsdp")
PARALLEL_LABELS = {"ddp": "DDP", "fsdp": "FSDP2"}
# The all-reduce bucket size of training/distributed.py, which imports it from here (the planner may not import
# training/: tests/test_layout.py).
BUCKET_BYTES = 16 * 2**20
FSDP_FOUR_BIT_REFUSAL = (f"--parallel fsdp with --qlora is not supported: {NF4_NOT_SHARDABLE} (training/fsdp.py "
                         "refuses it too). Plan a 4-bit base with --parallel ddp, or a 16-bit base with --parallel fsdp.")
PREFETCHED_UNITS = 2  # FSDP2: the running layer unit + the one all-gathered ahead (an assumption, see above)


def lora_tensor_bytes(shape, r: int) -> list[int]:
    """Bytes of each fp32 LoRA tensor in parameter order (per layer: q, k, v, o, gate, up, down; A then B)."""
    one_layer = [4 * r * n for i, o in shape.linear_shapes().values() for n in (i, o)]
    return one_layer * shape.layers


def bucket_indices(sizes: list[int], keys: list | None = None, limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive items (by index) grouped while they share a key and their bytes stay within `limit`: how
    training/distributed.py buckets its all-reduces (keys: dtype and device), and what the planner counts."""
    groups: list[list[int]] = []
    size, key = 0, None
    for i, n in enumerate(sizes):
        k = None if keys is None else keys[i]
        if not groups or k != key or size + n > limit:
            groups.append([])
            size, key = 0, k
        groups[-1].append(i)
        size += n
    return groups


def ddp_buckets(tensor_bytes: list[int], bucket_bytes: int = BUCKET_BYTES) -> list[int]:
    """Sizes of the all-reduce buckets of one dtype's tensors (bucket_indices, as training/distributed.py)."""
    return [sum(tensor_bytes[i] for i in group) for group in bucket_indices(tensor_bytes, limit=bucket_bytes)]


def fsdp_unit_bytes(shape, dtype: str, r: int) -> dict[str, int]:
    """Whole parameters of FSDP2's units: {"layer": one decoder layer, "root": embeddings, lm_head, final norm}."""
    b = DTYPE_BYTES[dtype]
    L, H = shape.layers, shape.hidden
    layer = (shape.linear_params() // L + 2 * H + shape.bias_params() // L) * b + 4 * lora_param_count(shape, r) // L
    return {"layer": layer, "root": (shape.embedding_params() + H) * b}


def _ceil_div(n: int, d: int) -> int:
    return -(-int(n) // d)


def _refresh(plan: Plan, items: list[PlanItem], peak_phase: str, gpus: int, parallel: str) -> Plan:
    """The plan with these items (fragmentation and CUDA context recomputed) and its per-GPU settings."""
    items = [i for i in items if i.key not in ("fragmentation", "cuda_context")]
    allocated = sum(i.bytes for i in items if i.counted)
    frag = int(FRAGMENTATION * allocated)
    items.append(PlanItem("fragmentation", f"allocator fragmentation (+{FRAGMENTATION:.0%} of the allocated peak)",
                          frag, "overhead"))
    items.append(PlanItem("cuda_context", "CUDA context (outside the allocator)", CUDA_CONTEXT_BYTES, "overhead"))
    return dataclasses.replace(plan, items=items, peak_phase=peak_phase, allocated_bytes=int(allocated),
                               total_bytes=int(allocated + frag + CUDA_CONTEXT_BYTES), gpus=gpus, parallel=parallel)


def _ddp(plan: Plan, shape, gpus: int) -> Plan:
    items = [dataclasses.replace(i) for i in plan.items]
    buckets = ddp_buckets(lora_tensor_bytes(shape, plan.lora_r))
    flats = sum(buckets)
    at_reduce = sum(i.bytes for i in items if i.phase in ("static", "workspace")) + flats
    reduce_peak = at_reduce > plan.allocated_bytes
    if reduce_peak:  # the activations and the loss buffers are freed before the all-reduce
        for i in items:
            i.counted = i.phase in ("static", "workspace", "overhead")
    at = next(k for k, i in enumerate(items) if i.phase == "workspace")
    items.insert(at, PlanItem("ddp_allreduce", f"DDP: gradient all-reduce buffers ({len(buckets)} bucket"
                              f"{'s' if len(buckets) != 1 else ''} ≤ {BUCKET_BYTES // 2**20} MiB, all in flight)",
                              flats, "reduce", reduce_peak,
                              "the LoRA gradients' flat copies, after the last micro-step"))
    return _refresh(plan, items, "gradient all-reduce" if reduce_peak else plan.peak_phase, gpus, "ddp")


def _fsdp(plan: Plan, shape, gpus: int) -> Plan:
    items = []
    shard = f", 1/{gpus} shard"
    for i in plan.items:
        if i.key in ("weights_linears", "weights_other", "lora_params", "adamw_state"):
            i = dataclasses.replace(i, label=i.label + shard, bytes=_ceil_div(i.bytes, gpus))
        elif i.key == "lora_grads":
            i = dataclasses.replace(i, label=i.label + ", whole", note="accumulated unsharded until the last "
                                    f"micro-step's reduce-scatter ({gib(i.bytes // gpus)} GiB after it)")
        else:
            i = dataclasses.replace(i)
        items.append(i)
        if i.key == "adamw_state":
            unit = fsdp_unit_bytes(shape, plan.dtype, plan.lora_r)
            k = min(PREFETCHED_UNITS, shape.layers)
            items.append(PlanItem("fsdp_root_gathered", "FSDP2: root unit gathered (embeddings, lm_head, final norm)",
                                  unit["root"], "static", True, "not resharded after the root's forward"))
            items.append(PlanItem("fsdp_layers_gathered", f"FSDP2: {k} decoder-layer units gathered", k * unit["layer"],
                                  "static", True, "the running unit and the one prefetched (assumed at most two)"))
    return _refresh(plan, items, plan.peak_phase, gpus, "fsdp")


def predict_per_gpu(config, seq_len: int, batch: int, gpus: int = 1, parallel: str = "ddp", **kw) -> Plan:
    """predict_peak's plan for one of `gpus` ranks training with `parallel` ("ddp" | "fsdp"); batch is per rank.

    gpus == 1 gives predict_peak's numbers exactly. kw: predict_peak's keyword arguments.
    """
    if parallel not in PARALLEL_MODES:
        raise PlanError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if int(gpus) < 1:
        raise PlanError(f"gpus must be at least 1, got {gpus}")
    if parallel == "fsdp" and kw.get("qlora"):
        raise PlanError(FSDP_FOUR_BIT_REFUSAL)
    shape = model_shape(config)
    plan = predict_peak(shape, seq_len, batch, **kw)
    gpus = int(gpus)
    if gpus == 1:
        return dataclasses.replace(plan, parallel=parallel)
    return (_ddp if parallel == "ddp" else _fsdp)(plan, shape, gpus)
