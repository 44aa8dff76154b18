"""CUDA graphs of one training call under a Hugging Face trainer (trainer_step.py's hook): per input shape, a
few eager calls, then the call's forward and its backward captured as two graphs of one autograd callable and
replayed, the LoRA parameters as its inputs, so the trainer's loss scaling, accumulation, clipping and optimizer
see ordinary `.grad`s."""
from __future__ import annotations

import contextlib
import time
import warnings

import torch

from turbotune.training.graph_grads import (accumulate_foreach, adopt_eager_grads, graph_grads_mode, grads_are,
                                            grads_in_place, into_shared, replay_adopting, shared_grads,
                                            views_of_one_buffer)
from turbotune.training.pass_timeline import PassTimeline

WARMUP = 2       # eager calls of the first shape before it is captured (lazy initialisation, Triton compilation);
                 # later shapes need one
MAX_GRAPHS = 16  # shapes captured at most (bucketed lengths: about 4 per octave of tokens)


class GraphedCall:
    """`fn(**tensors, **others)` per distinct shape: `warmup` eager calls, then a forward graph and a backward
    graph (the `torch.cuda.make_graphed_callables` scheme) replayed through `_Replay`.

    Replay equals the eager call because the same kernels run on the same (static) buffers: the batch is
    copied into the captured input tensors, the outputs are copied out, the upstream gradients copied in
    before the backward graph and the parameter gradients copied out after it. One memory pool serves every
    graph: a trainer replays one forward, then its backward, never two forwards in between. Call `reset()`
    after changing the model (adapters, checkpointing, patches)."""

    def __init__(self, fn, model, enabled: bool = True, warmup: int = WARMUP, max_graphs: int = MAX_GRAPHS):
        self.fn, self.model = fn, model
        self.warmup, self.max_graphs = warmup, max_graphs
        self.disabled_reason = None if enabled else "turned off"
        self.replays = self.captures = self.eager_calls = self.standins = 0
        self.captures_in_place = 0  # backward captures that added each gradient into .grad as made (grads_in_place)
        self.capture_s = 0.0  # wall time spent capturing (graph instantiation included): the cost of a new shape
        self.capture_parts: list[tuple[float, float]] = []  # per capture: seconds of its forward and its backward
        self.eager_after_capture = 0  # eager calls of a capturable shape once some shape was captured
        self.calls = 0
        self.timeline = None  # a PassTimeline (pass_timeline.py) to time the replays on the device; off: None
        self._carrier = None  # TURBOTUNE_GRAPH_GRADS=flat: the one autograd input of a replay
        lean_capture_mode()  # a misspelt switch fails here (reset() reads the grads mode), not at the first capture
        standin_sightings()
        self.reset()

    def reset(self) -> None:
        self.grads_mode = graph_grads_mode()  # one mode for every graph: "adopt" graphs add into shared buffers
        if self.grads_mode == "adopt" and not shared_grads():
            self.grads_mode = "flat"  # adopting needs the one shared set of buffers
        self._entries: dict = {}
        self._seen: dict = {}
        self._pool = None
        self._params = None  # the trainable parameters, read once (not per micro-step)
        self._grad_bufs = None  # shared_grads: the one set of gradient outputs every backward graph copies into
        self._offload = False  # offloaded checkpointing in the captured calls (set by params())

    def params(self) -> list[torch.Tensor]:
        if self._params is None:
            self._params = [p for p in self.model.parameters() if p.requires_grad]
            if self.disabled_reason is None:
                from turbotune.model.checkpointing import get_offloaded_checkpointing
                from turbotune.training.cuda_graphs import why_not_graphable
                offload = get_offloaded_checkpointing(self.model)
                if offload is not None and not graph_offload_enabled():
                    # TURBOTUNE_GRAPH_OFFLOAD=0: the offload's copies stay eager (the A/B against the captured ones)
                    self.disabled_reason = "offloaded checkpointing runs eagerly (TURBOTUNE_GRAPH_OFFLOAD=0)"
                else:
                    if offload is not None:  # pinned host buffers reused by the replays (host_buffers.py)
                        offload.config.static_host_buffers = True
                        self._offload = True
                    self.disabled_reason = why_not_graphable(self.model, self._params)
        return self._params

    def why_off(self) -> str | None:
        self.params()
        return self.disabled_reason

    def __call__(self, tensors: dict, others: dict, grow=None):
        """`grow(tensors, others, length)`: the same call made `length` tokens long with the same results
        (padding.grow_packed) or None; given, a new length may replay a longer graph (standin_sightings)."""
        if capturing():  # inside a graph someone else captures: a sync or a nested capture would break theirs
            return self.fn(**tensors, **others)
        params = self.params()
        self.calls += 1
        key = self._key(tensors, others)
        entry = self._entries.get(key) if key is not None else None
        if entry is None and key is not None and grow is not None:
            found = self._stand_in(key, tensors, others, grow)
            if found is not None:
                tensors, others, entry = found
        if entry is None and key is not None:
            seen = self._seen.get(key, 0)
            # After the first capture the code paths are warm: a new shape is captured when first seen (a Triton
            # kernel's new size specialisation compiles on the host during the capture, as the GPU tests show),
            # or after one eager call with TURBOTUNE_CAPTURE_FIRST_SIGHT=0. A failed capture turns graphs off.
            warm = bool(self._entries) or (warm_up_any_shape() and self.eager_calls >= self.warmup)
            needed = eager_calls_before_capture(self.warmup, warm, _first_sight(), self._offload)
            if seen >= needed and len(self._entries) < self.max_graphs:
                t0 = time.perf_counter()
                entry = self._capture(key, tensors, others, params)
                self.capture_s += time.perf_counter() - t0
            else:
                self._seen[key] = seen + 1
        if entry is None:
            self.eager_calls += 1
            self.eager_after_capture += bool(self._entries) and key is not None
            return self.fn(**tensors, **others)
        events = None if self.timeline is None else self.timeline.begin(self.calls)
        for k, buf in entry.inputs.items():
            buf.copy_(tensors[k], non_blocking=True)
        outs = _Replay.apply(entry, events, *self._autograd_inputs(entry))
        self.replays += 1
        return entry.rebuild(outs)

    def _stand_in(self, key, tensors, others, grow):
        """(TURBOTUNE_GRAPH_STANDIN=k) A length without a graph of its own, seen fewer than k times, replays the
        shortest captured graph it can grow into: its k-th sighting captures it. A capture costs ~300 ms of host
        time on an H100 (qwen2-1.5b; bench/NOTES.md), a longer replay tens of ms more device time, so a length
        seen once or twice in a run costs less this way. Returns (grown tensors, grown others, entry) or None. Not
        under offloaded checkpointing: there a length's capture needs an eager call of its own first (its pinned
        host buffers), which stand-in sightings are not."""
        sightings = standin_sightings()
        seen = self._seen.get(key, 0)
        if not sightings or seen + 1 >= sightings or not self._entries or self._offload:
            return None
        if not torch.is_tensor(tensors.get("input_ids")):
            return None
        length = tensors["input_ids"].shape[-1]
        longer = sorted({e.length for e in self._entries.values() if e.length is not None and e.length > length})
        for target in longer:
            grown = grow(tensors, others, target)
            if grown is None:
                return None
            entry = self._entries.get(self._key(*grown))
            if entry is not None:
                self._seen[key] = seen + 1
                self.standins += 1
                return (*grown, entry)
        return None

    def _autograd_inputs(self, entry) -> list[torch.Tensor]:
        """What a replay hands autograd as its inputs: the trainable parameters, or (grads mode "flat") one
        scalar that requires grad, so the outputs require grad without ~400 inputs and ~400 AccumulateGrad nodes
        per backward (the replay puts the gradients into .grad itself either way); "adopt" as "flat"."""
        if entry.grads_mode not in ("flat", "adopt"):
            return entry.params
        if self._carrier is None:
            self._carrier = torch.zeros((), device=entry.params[0].device, requires_grad=True)
        return [self._carrier]

    def _key(self, tensors, others):
        from turbotune.training.cuda_graphs import pinned_in_place
        if self.disabled_reason is not None or (self._offload and pinned_in_place(self.model, tensors)):
            return None
        return graph_key(tensors, others)

    def _capture(self, key, tensors, others, params):
        from turbotune.training.cuda_graphs import one_sequence_per_row
        inputs = {k: v.clone() for k, v in tensors.items()}
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._grad_bufs is None and shared_grads():  # outside the pool, before any capture
            self._grad_bufs = [torch.zeros_like(p) for p in params] if self.grads_mode != "adopt" \
                else [b.zero_() for b in views_of_one_buffer(params)]
        if self.grads_mode == "adopt":
            adopt_eager_grads(params, self._grad_bufs)
        in_place = self.grads_mode == "adopt" and grads_in_place() and grads_are(params, self._grad_bufs)
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with capture_into(fwd, self._pool), one_sequence_per_row(inputs):
                out = self.fn(**inputs, **others)
                _end_offload_forward(self.model)
            t1 = time.perf_counter()
            entry = _Entry(out, inputs, params)
            # The trainer runs its backward outside the forward's autocast (accelerate's bf16 wrapper): so here.
            with capture_into(bwd, self._pool), torch.autocast("cuda", enabled=False):
                if in_place:  # each gradient added into its .grad (a shared buffer) as autograd makes it
                    torch.autograd.backward(entry.diff_outputs(), grad_tensors=entry.grad_inputs, inputs=params)
                    grads = tuple(self._grad_bufs)
                else:
                    grads = torch.autograd.grad(entry.diff_outputs(), params, grad_outputs=entry.grad_inputs,
                                                allow_unused=True)
                    if self._grad_bufs is not None:
                        grads = into_shared(grads, self._grad_bufs, add=self.grads_mode == "adopt")
        except Exception as exc:  # noqa: BLE001 - eager from now on, said once
            return capture_failed(self, exc, "in the trainer step")
        self.capture_parts.append((t1 - t0, time.perf_counter() - t1))
        entry.fwd, entry.bwd, entry.grads = fwd, bwd, grads
        entry.grads_mode = self.grads_mode
        entry.detach_outputs()
        self._entries[key] = entry
        self.captures += 1
        self.captures_in_place += in_place
        return entry


def capture_into(graph, pool):
    """The context that captures into `graph` (from `pool`): torch.cuda.graph, error mode "thread_local" (a
    trainer's data-loading threads may touch CUDA, pinning memory, meanwhile). With TURBOTUNE_LEAN_CAPTURE=1 the
    same capture on the same stream without what torch.cuda.graph does on entering: empty the caching allocator
    (so the eager work of the next steps allocates from the driver again) and the pinned-host cache (so the data
    loader pins from scratch), on every capture; a mixed-length run captures ~7 graphs in its first 50 steps,
    each costing 300–540 ms on an H100 (bench/NOTES.md, thirteenth session). Measured on an H100 (fourteenth
    session): a backward capture 248 -> 182 ms, but 0.5 GiB more reserved (the eager blocks stay cached beside the
    graphs' pool), so off. TURBOTUNE_LEAN_CAPTURE=host empties the device cache as torch does and keeps only the
    pinned-host cache (the data loader's pinned batches), for the share of the saving that costs no device memory
    (not yet measured on a GPU)."""
    mode = lean_capture_mode()
    if mode == "0":
        return torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")
    return _lean_capture(graph, pool, empty_device_cache=mode == "host")


def lean_capture_mode() -> str:
    """TURBOTUNE_LEAN_CAPTURE: "0" (default), "1" or "host" (capture_into)."""
    import os
    mode = os.environ.get("TURBOTUNE_LEAN_CAPTURE", "0")
    if mode not in ("0", "1", "host"):
        raise ValueError(f"TURBOTUNE_LEAN_CAPTURE must be 0, 1 or host, not {mode!r}")
    return mode


@contextlib.contextmanager
def _lean_capture(graph, pool, empty_device_cache: bool = False):
    if torch.cuda.graph.default_capture_stream is None:  # the stream torch.cuda.graph captures on: shared, so
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()  # pools are reused across both kinds
    torch.cuda.synchronize()
    if empty_device_cache:
        torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.graph.default_capture_stream):
        graph.capture_begin(pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()


def graph_offload_enabled() -> bool:
    """Offloaded checkpointing (use_gradient_checkpointing="offload", the bench's turbotune-min-memory row) captured
    in the trainer step's graphs too, its copies to the host joined inside the forward graph (end_forward_capture).
    On unless TURBOTUNE_GRAPH_OFFLOAD=0. Its GPU tests (one length, mixed lengths) passed on an H100 in the
    thirteenth session; with 8-bit AdamW in both, the mixed-length SFTTrainer run went from 5,303 real tokens/s
    eager to 11,452 captured, for 0.10 GiB more peak memory (1.68 -> 1.78 GiB; bench/NOTES.md)."""
    import os
    return os.environ.get("TURBOTUNE_GRAPH_OFFLOAD", "1") == "1"


def _end_offload_forward(model) -> None:
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    offload = get_offloaded_checkpointing(model)
    if offload is not None:
        offload.end_forward_capture()


def capture_failed(owner, exc: Exception, where: str) -> None:
    """A capture raised: `owner` (GraphedCall, ForwardGraphs) stays eager from now on, said once."""
    torch.cuda.synchronize()
    owner.disabled_reason = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    owner.reset()
    warnings.warn(f"turbotune: CUDA graphs off {where}: {owner.disabled_reason}", stacklevel=5)


def graph_key(tensors: dict, others: dict) -> tuple | None:
    """What a captured call is looked up by: every tensor's name, shape and dtype (all on a GPU) and every other
    argument's value (scalars and strings only); None where the call can't be captured (stays eager)."""
    key = []
    for k, v in sorted(tensors.items()):
        if v.device.type != "cuda":
            return None
        key.append((k, tuple(v.shape), v.dtype))
    for k, v in sorted(others.items()):
        if v is not None and not isinstance(v, (bool, int, float, str)):
            return None  # a cache object, a list: stay eager
        key.append((k, v))
    return tuple(key)


class _Entry:
    """One captured shape: static inputs, the forward's outputs and gradient buffers, the two graphs."""

    def __init__(self, out, inputs, params):
        self.inputs, self.params = inputs, params
        self.cls = type(out)
        self.names = [k for k, v in out.items() if torch.is_tensor(v)]
        self.outputs = [out[k] for k in self.names]
        self.diff = [o.requires_grad for o in self.outputs]
        self.grad_inputs = [torch.empty_like(o) for o, d in zip(self.outputs, self.diff) if d]
        self.fwd = self.bwd = self.grads = None
        self.grads_mode = "autograd"
        ids = inputs.get("input_ids")
        self.length = ids.shape[-1] if torch.is_tensor(ids) else None  # the tokens a stand-in grows to

    def diff_outputs(self):
        return [o for o, d in zip(self.outputs, self.diff) if d]

    def detach_outputs(self):
        self.outputs = [o.detach() for o in self.outputs]

    def rebuild(self, outs):
        return self.cls(**dict(zip(self.names, outs)))


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry, events, *inputs):
        entry.fwd.replay()
        if events is not None:
            PassTimeline.mark(events)
        ctx.entry, ctx.events, ctx.inputs = entry, events, len(inputs)
        outs = tuple(o.clone() for o in entry.outputs)
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, entry.diff) if not d])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        entry = ctx.entry
        bufs = iter(entry.grad_inputs)
        for g, d in zip(grad_outs, entry.diff):
            if d:
                buf = next(bufs)
                if g is None:
                    buf.zero_()
                else:
                    buf.copy_(g)
        if ctx.events is not None:
            PassTimeline.mark(ctx.events)
        if entry.grads_mode == "adopt":
            replay_adopting(entry)
        else:
            entry.bwd.replay()
            if entry.grads_mode != "autograd":
                accumulate_foreach(entry.params, entry.grads, one_allocation=entry.grads_mode == "flat")
        out = ((None, None, *[g.clone() if g is not None else None for g in entry.grads])
               if entry.grads_mode == "autograd" else (None,) * (2 + ctx.inputs))
        if ctx.events is not None:
            PassTimeline.mark(ctx.events)
        return out


def eager_calls_before_capture(warmup: int, captured_before: bool, first_sight: bool, offload: bool) -> int:
    """Eager calls of a new shape before it is captured: `warmup` for the first shape; later ones none
    (first_sight) or one. `captured_before`: some shape was captured, or (warm_up_any_shape) `warmup` eager calls
    of any shapes have run. With offloaded checkpointing at least one: its pinned host buffers for a new shape can
    only be made in an eager call (none can be pinned during a capture; seen on an H200, twelfth session, when
    mixed lengths brought a new shape after the first capture)."""
    needed = warmup if not captured_before else (0 if first_sight else min(warmup, 1))
    return max(needed, 1) if offload else needed


def standin_sightings() -> int:
    """TURBOTUNE_GRAPH_STANDIN=k (default 4; 0 or 1: off): a padded-then-packed length is replayed in the shortest
    longer graph until its k-th sighting, which captures it (GraphedCall._stand_in). Measured on an H100
    (seventeenth session, qwen2-1.5b QLoRA mixed lengths under SFTTrainer, 50 steps): k = 2 +14% and k = 4 +21%
    real tokens/s over the timed steps (7 -> 4 graphs captured), the steady steps -6% at k = 4 (the stand-in
    replays carry more padding); a length's stand-in cost ends at its k-th sighting, so a long run loses little."""
    import os
    value = os.environ.get("TURBOTUNE_GRAPH_STANDIN", "4")
    if not value.isdigit():
        raise ValueError(f"TURBOTUNE_GRAPH_STANDIN must be a whole number of sightings (0: off), not {value!r}")
    return int(value)


def warm_up_any_shape() -> bool:
    """On by default (TURBOTUNE_WARMUP_ANY_SHAPE=0: off): the first capture waits for `warmup` eager calls of any
    shapes, not of its own. The warm-up is for lazy initialisation and Triton's compilation, which every shape's
    eager call does (bucketed lengths share Triton's size specialisations); with long-tailed lengths the same shape
    rarely comes twice early, so without it most of the first steps run eagerly (7 of the bench's mixed run's
    first 10). Measured on an H100 (seventeenth session, same run as standin_sightings): +19% real tokens/s over
    the timed steps (53 of 55 calls replayed instead of 48), steady steps unchanged; with k = 4 stand-ins +30%."""
    import os
    return os.environ.get("TURBOTUNE_WARMUP_ANY_SHAPE", "1") == "1"


def _first_sight() -> bool:
    """After the first capture, a new shape is captured when first seen (TURBOTUNE_CAPTURE_FIRST_SIGHT=0: after
    one eager call). +19% real tokens/s on mixed lengths (H100, ninth session, bench/NOTES.md)."""
    import os
    return os.environ.get("TURBOTUNE_CAPTURE_FIRST_SIGHT", "1") == "1"


def capturing() -> bool:
    """Whether this thread's current stream is being captured into a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

