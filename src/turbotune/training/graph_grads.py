"""How a replayed backward's LoRA gradients reach `.grad` (graphed_call.py's graphs): the shared gradient buffers
every backward graph writes, the grads modes ("adopt", "flat", "foreach", "autograd") and their switches."""
from __future__ import annotations

import os

import torch


def shared_grads() -> bool:
    """On by default (TURBOTUNE_SHARED_GRADS=0 turns it off): every backward graph copies its LoRA gradients into
    one shared set of buffers (allocated once, outside the graph pool) and its own gradient outputs go back to the
    pool, where later captures reuse them: one set of gradient memory (74 MB for qwen2-1.5b's LoRA) instead of one
    per captured length. Sound for the same reason one pool is: a trainer replays a forward, then its backward, and the
    gradients are consumed (added to .grad) before the next replay; a graph's own outputs, which another graph's
    backward may now overwrite, are only read right after its forward replays. Measured (H100, ninth session):
    +12% real tokens/s and -0.14 GiB on qwen2-1.5b QLoRA mixed lengths, losses unchanged (bench/NOTES.md)."""
    return os.environ.get("TURBOTUNE_SHARED_GRADS", "1") == "1"


def into_shared(grads, bufs, add: bool = False):
    """Inside the backward capture: the gradients copied (or, `add`, added) into the shared buffers (one launch);
    those buffers stand in for them from then on."""
    pairs = [(b, g) for b, g in zip(bufs, grads) if g is not None]
    if pairs:
        (torch._foreach_add_ if add else torch._foreach_copy_)([b for b, _ in pairs], [g for _, g in pairs])
    return tuple(b if g is not None else None for b, g in zip(bufs, grads))


def replay_adopting(entry) -> None:
    """Grads mode "adopt": the backward graph adds into the shared buffers, and those buffers are the `.grad`s.
    The first pass of a step (every `.grad` None, after zero_grad) zeroes them, replays, and hands them over as the
    `.grad`s; later passes add into them where they still are the `.grad`s; anything else (a `.grad` made by an
    eager pass, or one the user set) gets the replay's gradients added to it, as the other modes do. One set of
    LoRA gradients instead of two (buffers + `.grad`), and no copy per pass."""
    live = [(p, b) for p, b in zip(entry.params, entry.grads) if b is not None]
    params, bufs = [p for p, _ in live], [b for _, b in live]
    if not live or grads_are(params, bufs):
        entry.bwd.replay()
        return
    fresh = all(p.grad is None for p in params)
    torch._foreach_zero_(bufs)
    entry.bwd.replay()
    if fresh:
        for p, b in live:
            p.grad = b
    else:
        accumulate_foreach(params, bufs)


def adopt_eager_grads(params, bufs) -> bool:
    """Grads mode "adopt", before a capture: `.grad`s that eager calls of this step made move into the shared
    buffers, which become the `.grad`s (then the replay adds into them, replay_adopting). Without it the capture
    holds both sets (the eager `.grad`s and the buffers) while its forward and backward allocate: that is where a
    short run's peak is (qwen2-1.5b LoRA under SFTTrainer, `turbotune bench --memory-report`, H100, seventeenth
    session). Only when every parameter has a `.grad`: a buffer may not become the `.grad` of a parameter that had
    none (an optimizer treats a zero gradient and no gradient differently). Returns whether it moved them."""
    grads = [p.grad for p in params]
    if not grads or any(g is None for g in grads) or grads_are(params, bufs):
        return False  # nothing to move, or already the buffers
    torch._foreach_copy_(bufs, grads)
    for p, b in zip(params, bufs):
        p.grad = b
    return True


def grads_are(params, bufs) -> bool:
    """Whether every parameter's `.grad` is its shared buffer (same memory, same shape)."""
    return bufs is not None and bool(params) and all(
        p.grad is not None and p.grad.data_ptr() == b.data_ptr() and p.grad.shape == b.shape
        for p, b in zip(params, bufs))


def grads_in_place() -> bool:
    """TURBOTUNE_CAPTURE_GRADS_IN_PLACE (default 1, 0 turns it off; grads mode "adopt" only): a backward captured
    while every `.grad` is its shared buffer (after adopt_eager_grads) lets autograd add each gradient into its
    `.grad` as it is made (AccumulateGrad's in-place add, captured), instead of `torch.autograd.grad` returning
    all of them at the end to be added then. The capture then never holds a whole second set of LoRA gradients:
    65 MiB at qwen2-1.5b `turbotune-min-memory`'s peak, which is that capture (bench/NOTES.md, seventeenth
    session). Only when every parameter already has a `.grad` (an eager call of the step made them): a parameter
    a graph does not reach would otherwise get a zero `.grad` where it had none. Measured on an H100 (eighteenth
    session): min-memory's peak 3.547 -> 3.484 GiB at the same speed (with offload's MLP tiling: 31,608 tokens/s
    without it, 31,526 with it, same machine)."""
    return os.environ.get("TURBOTUNE_CAPTURE_GRADS_IN_PLACE", "1") != "0"


def graph_grads_mode() -> str:
    """How replayed gradients reach `.grad` (TURBOTUNE_GRAPH_GRADS): "adopt" (default), one scalar as the
    replay's only autograd input (no per-parameter autograd nodes), the backward graphs add into the one shared
    set of gradient buffers, and those buffers are the `.grad`s (replay_adopting; at a capture the eager calls'
    `.grad`s move into them, adopt_eager_grads): one set of LoRA gradients less in memory (74 MB for qwen2-1.5b,
    168 MB for llama3-8b) and no copy per pass (so a `.grad` tensor kept past its optimizer step is overwritten by
    the next step's: clone it to keep it); "flat", as adopt but the buffers' gradients copied into separate
    `.grad`s in one allocation (the host's gap between passes 41.4 -> 35.9 ms and +6.5% steady real tokens/s on
    mixed lengths against "foreach", H100, fourteenth session, bench/NOTES.md); "foreach", each LoRA tensor an
    autograd input and the gradients added in one multi-tensor call; "autograd", autograd's own accumulation.
    Under torch.distributed always "autograd": gradient hooks must see autograd's accumulation."""
    mode = os.environ.get("TURBOTUNE_GRAPH_GRADS", "adopt")
    if mode not in ("foreach", "flat", "adopt", "autograd"):
        raise ValueError(f"TURBOTUNE_GRAPH_GRADS must be foreach, flat, adopt or autograd, not {mode!r}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "autograd"
    return mode


def accumulate_foreach(params, grads, one_allocation: bool = False) -> None:
    """`p.grad += g` for every parameter, as AccumulateGrad would, in two multi-tensor launches. Parameters without
    a `.grad` get copies of their gradients: each its own tensor, or (`one_allocation`) views of one buffer per
    dtype and device, allocated at once."""
    add_to, add_from, fresh, fresh_from = [], [], [], []
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            fresh.append(p)
            fresh_from.append(g)
        else:
            add_to.append(p.grad)
            add_from.append(g)
    if add_to:
        torch._foreach_add_(add_to, add_from)
    if fresh:
        if one_allocation:
            copies = views_of_one_buffer(fresh_from)
            torch._foreach_copy_(copies, fresh_from)
        else:
            copies = torch._foreach_mul(fresh_from, 1.0)
        for p, g in zip(fresh, copies):
            p.grad = g


def views_of_one_buffer(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped as `like`, views into one allocation per (dtype, device)."""
    out: list = [None] * len(like)
    groups: dict = {}
    for i, t in enumerate(like):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), index in groups.items():
        sizes = [like[i].numel() for i in index]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        for i, piece in zip(index, flat.split(sizes)):
            out[i] = piece.view(like[i].shape)
    return out
