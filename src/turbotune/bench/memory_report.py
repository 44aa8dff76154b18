"""`turbotune bench --memory-report DIR`: what holds GPU memory at a method's peak, by the code that allocated it.

A method's peak (`torch.cuda.max_memory_allocated`) says how much, not what. With the switch, each worker records
the CUDA caching allocator's history from before the model loads (`torch.cuda.memory._record_memory_history`,
Python stacks only), and after its run replays the recorded allocations and frees to find the moment of the peak
and the blocks live then, grouped by the first frame outside PyTorch itself (a turbotune kernel, transformers'
attention, PEFT's LoRA layer, the optimizer's state). Written to DIR/memory-<method>.txt. Allocations made inside
a CUDA-graph capture are recorded like any other (a replay allocates nothing), so a graph pool's share shows up
under the code that captured it.

Recording slows the host: the timed figures of a run with this switch are not comparable to one without.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict

MAX_ENTRIES = 2_000_000  # allocator events kept (a ring: the oldest go first; see `baseline` below)
_SKIP = ("/torch/", "/memory_report.py", "<frozen", "/contextlib.py", "/functools.py")


_stack = contextlib.ExitStack()


def start() -> None:
    import torch
    from torch.utils.checkpoint import set_checkpoint_early_stop
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=MAX_ENTRIES)
    # Recompute then runs each checkpointed region to its end instead of raising out of it once the saved tensors
    # are back (same values). On an H200 (twelfth session) a recording run failed inside a recompute with
    # "SystemError: ... apply ... returned NULL"; the likely cause, read from the traceback, is that early-stop
    # exception unwinding through a custom autograd Function while the allocator gathers Python stacks.
    _stack.enter_context(set_checkpoint_early_stop(False))


def finish(directory: str, method: str) -> dict:
    """Stop recording, write DIR/memory-<method>.txt, return its summary (also for the result JSON)."""
    import torch
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    _stack.close()
    traces = snapshot.get("device_traces") or [[]]
    device = torch.cuda.current_device()
    summary = peak_breakdown(traces[device] if device < len(traces) else [], torch.cuda.memory_allocated())
    summary["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"memory-{method}.txt")
    with open(path, "w") as f:
        f.write(format_report(method, summary))
    summary["report"] = path
    return {k: v for k, v in summary.items() if k != "sites"} | {"top_sites": summary["sites"][:10]}


def report_into(spec: dict, result: dict, log) -> None:
    """The worker's end of a --memory-report run (also after a failure: an out-of-memory is when it matters)."""
    import sys
    torch_mod = sys.modules.get("torch")
    if spec["device"] != "cuda" or torch_mod is None or not torch_mod.cuda.is_initialized():
        return
    try:
        result["memory"] = m = finish(spec["memory_dir"], spec["method"])
        line = f"memory at peak {m['peak_bytes'] / 2 ** 30:.2f} GiB by allocating site: {m['report']}"
        log(spec["method"], line)
        result.setdefault("notes", []).append(line)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the run
        result["memory"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}


def site_of(frames) -> str:
    """The innermost frame outside PyTorch's own files: "file:line function" (the path from site-packages/ or
    src/ on)."""
    for fr in frames or ():
        name = fr.get("filename", "")
        if not name or any(s in name for s in _SKIP):
            continue
        for marker in ("site-packages/", "/src/"):
            if marker in name:
                name = name.split(marker, 1)[1]
                break
        return f"{name}:{fr.get('line', '?')} {fr.get('name', '?')}"
    return "(PyTorch internals)"


def peak_breakdown(trace: list, allocated_now: int) -> dict:
    """Replay `trace` (the allocator's events: alloc / free_completed with addr, size, frames) to the moment the
    live total peaked; the live blocks then, summed per allocating site. `allocated_now` (memory_allocated at the
    end) minus the trace's live total at its end is what was allocated before the trace's first event (the
    `baseline`: nothing, when recording started before the model loaded and no event was dropped)."""
    total = peak = peak_index = 0
    sizes: dict = {}
    for i, ev in enumerate(trace):
        action, addr = ev.get("action"), ev.get("addr")
        if action == "alloc":
            sizes[addr] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_index = total, i
        elif action == "free_completed" and addr in sizes:
            total -= sizes.pop(addr)
    baseline = max(0, allocated_now - total)
    live: dict = {}
    for ev in trace[:peak_index + 1]:
        action, addr = ev.get("action"), ev.get("addr")
        if action == "alloc":
            live[addr] = (ev["size"], site_of(ev.get("frames")))
        elif action == "free_completed":
            live.pop(addr, None)
    by_site: dict = defaultdict(lambda: [0, 0])
    for size, site in live.values():
        by_site[site][0] += size
        by_site[site][1] += 1
    sites = sorted(([s, b, n] for s, (b, n) in by_site.items()), key=lambda r: -r[1])
    return {"events": len(trace), "peak_bytes": baseline + peak, "baseline_bytes": baseline,
            "peak_event": peak_index, "sites": sites}


def format_report(method: str, summary: dict) -> str:
    gib = 1024 ** 3
    lines = [f"# {method}: GPU memory at its peak, by allocating site",
             f"peak from the allocator's events: {summary['peak_bytes'] / gib:.3f} GiB "
             f"(torch.cuda.max_memory_allocated: {summary.get('max_memory_allocated', 0) / gib:.3f} GiB); "
             f"allocated before the recorded events: {summary['baseline_bytes'] / gib:.3f} GiB; "
             f"{summary['events']} events, peak at event {summary['peak_event']}", "",
             "| MiB at peak | blocks | site (first frame outside PyTorch) |", "|---:|---:|---|"]
    for site, size, count in summary["sites"][:40]:
        lines.append(f"| {size / 2 ** 20:,.1f} | {count} | {site} |")
    return "\n".join(lines) + "\n"
