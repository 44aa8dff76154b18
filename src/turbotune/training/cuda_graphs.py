"""A training micro-step replayed from a CUDA graph: forward + backward with almost no host work.

Why: profiled on an H200 (bench/NOTES.md), a LoRA step of a 1.5B model launches ~20,000 kernels; the host
(Python, autograd, launches) needs longer to issue them than the GPU needs to run them, so the GPU idles about
half of the step. A CUDA graph records one micro-batch's forward and backward once and then replays every
kernel with one call, so the step costs what the GPU work costs.

How: `GraphedMicroStep(model, params)(batch, loss_scale)` computes `(model(**batch).loss * loss_scale)
.backward()` and returns the unscaled loss (a detached device tensor). Per distinct set of input shapes it
runs `warmup` eager calls (lazy initialisation, Triton compilation), then captures a graph on static input
buffers and replays it from then on: the batch is copied into the buffers, and the LoRA gradients are
accumulated in place into `param.grad` tensors that the graph owns. Shapes seen for the first time, more
than `max_graphs` shapes and CPU tensors run the eager call; if a capture fails (something in the step
waits for the host), graphs are switched off with a warning. Results never depend on whether a graph ran
(tests compare the two).

Rules that keep replay equal to eager:
  - gradients are zeroed with `zero_grad()` here (in place); if someone sets `param.grad` to None or to
    another tensor, the next call moves that value back into the graph's buffer first;
  - the model must not change between replays in ways the graph cannot see (new adapters, merge/unmerge,
    toggled patches, checkpointing switched, `quant.clear_dequant_buffers()`,
    `lora_parts.set_fp32_adapter_backend(name, model)`): call `reset()` after such changes;
  - every trainable parameter gets a gradient buffer that is zeroed, never set to None, so a parameter that
    receives no gradient still sees AdamW's weight decay (the LoRA A and B of a used layer always get one);
  - nothing in the step may synchronise with the host (the fused paths don't); dropout > 0 is left eager.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from turbotune._compat import masks_see_no_packing_or_tracing


class GraphedMicroStep:
    def __init__(self, model, params, enabled: bool = True, warmup: int = 2, max_graphs: int = 4,
                 verbose: bool = True, capture_offload: bool = True):
        self.model = model
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.verbose = verbose
        self.disabled_reason = None if enabled else "turned off"
        self._graphs: dict = {}  # shape key -> (graph, static inputs, static loss)
        self._seen: dict = {}  # shape key -> eager calls so far
        self._failed: set = set()
        self._grads: list[torch.Tensor] | None = None  # the gradient buffers the graphs accumulate into
        self._pool = None
        self.replays = 0
        self.captures = 0
        self.capture_offload = capture_offload
        # turbotune's own loops drive the whole micro-step (packing, auto checkpointing, one graph for forward and
        # backward): the Hugging Face trainers' hook on the same model passes every call through.
        from turbotune.training.trainer_step import trainer_step_of
        hook = trainer_step_of(model)
        if hook is not None:
            hook.passthrough = "turbotune's own training loop drives the micro-step"
        if enabled:
            self.recheck()

    # ------------------------------------------------------------------ public
    def recheck(self) -> None:
        """Check again that the model's step can be captured (e.g. after its checkpointing plan changed) and
        switch graphs off, saying why, if not. Never switches them back on."""
        if self.capture_offload and self.params and self.params[0].is_cuda:
            # Offloaded checkpointing in a graph: pinned host buffers made in the eager warm-ups, reused by the
            # replays (host_buffers.py). On by default since its H200 check: replay equals eager (tests/gpu) and
            # the offloading row keeps the speed of the recompute-only one (bench/NOTES.md, fifth session).
            from turbotune.model.checkpointing import get_offloaded_checkpointing
            oc = get_offloaded_checkpointing(self.model)
            if oc is not None:
                oc.config.static_host_buffers = True
        reason = why_not_graphable(self.model, self.params)
        if reason and self.active:
            self.disable(reason)

    @property
    def active(self) -> bool:
        return self.disabled_reason is None

    def __call__(self, batch: dict, loss_scale: float = 1.0) -> torch.Tensor:
        key = self._key(batch, loss_scale)
        if key is None or key in self._failed:
            return self._forward_backward(batch, loss_scale)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup or len(self._graphs) >= self.max_graphs:
                self._seen[key] = seen + 1
                return self._forward_backward(batch, loss_scale)
            entry = self._capture(key, batch, loss_scale)
            if entry is None:
                return self._forward_backward(batch, loss_scale)
        graph, static_in, static_loss = entry
        self._claim_grads()
        for k, buf in static_in.items():
            buf.copy_(batch[k], non_blocking=True)
        graph.replay()
        self.replays += 1
        return static_loss.clone()  # the next replay of any graph may overwrite the pool's copy

    def zero_grad(self, optimizer=None) -> None:
        """Zero the gradients: in place when graphs are on (they keep their addresses) or no optimizer is given,
        else `optimizer.zero_grad(set_to_none=True)` as an eager loop would."""
        if optimizer is not None and not self.active:
            optimizer.zero_grad(set_to_none=True)
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def disable(self, reason: str) -> None:
        """Run eagerly from now on (the step can't be captured, or its shapes won't repeat), saying why."""
        self.disabled_reason = reason
        self.reset()

    def reset(self) -> None:
        """Drop every captured graph (after changing the model); the next calls warm up and capture again."""
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()
        self._grads = None
        self._pool = None

    # ------------------------------------------------------------------ internals
    def _key(self, batch: dict, loss_scale: float):
        if not self.active or pinned_in_place(self.model, batch):
            return None
        key = [("__scale__", float(loss_scale))]
        for k in sorted(batch):
            v = batch[k]
            if torch.is_tensor(v):
                if v.device.type != "cuda":
                    return None
                key.append((k, tuple(v.shape), v.dtype))
            elif v is None or isinstance(v, (bool, int, float, str)):
                key.append((k, v))
            else:
                return None  # something we can't key on (a cache object, a list): stay eager
        return tuple(key)

    def _forward_backward(self, batch: dict, loss_scale: float) -> torch.Tensor:
        loss = self.model(**batch).loss
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        return loss.detach()


    def _claim_grads(self) -> None:
        """Make every param.grad the buffer the graphs write to, carrying over whatever value it holds now."""
        if self._grads is None:
            self._grads = []
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._grads.append(p.grad)
            return
        for p, buf in zip(self.params, self._grads):
            g = p.grad
            if g is buf:
                continue
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g)
            p.grad = buf

    def _capture(self, key, batch: dict, loss_scale: float):
        self._claim_grads()
        static_in = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        others = {k: v for k, v in batch.items() if not torch.is_tensor(v)}
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool), one_sequence_per_row(batch):
                static_loss = self._forward_backward({**static_in, **others}, loss_scale)
        except Exception as exc:  # noqa: BLE001 - fall back to eager from now on, say why once
            # What fails one capture (a host sync in the model's forward, say) fails every shape: stop trying.
            torch.cuda.synchronize()
            self.disable(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            if self.verbose:
                warnings.warn(f"turbotune: CUDA graphs off, micro-steps run eagerly: {self.disabled_reason}",
                              stacklevel=3)
            return None
        self.captures += 1
        entry = (graph, static_in, static_loss)
        self._graphs[key] = entry
        return entry


# Batch keys that say a row may hold several sequences or padding (then transformers must build a mask).
_LAYOUT_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k")


@contextlib.contextmanager
def one_sequence_per_row(batch: dict):
    """During capture, let transformers' mask code decide as it does eagerly for a batch with no position_ids
    and no mask: no mask at all, SDPA's is_causal.

    transformers counts CUDA stream capture as tracing, and while tracing it assumes the worst: it keeps an
    all-zero "packed sequences" mask (deciding "none" would read a GPU value) and, in 5.17, never skips the
    causal mask. SDPA then gets an explicit [B, 1, L, L] mask: no causal tile skipping, and K/V repeated for
    grouped-query heads. On an H200 that made llama3-8b's attention about 3x slower under graphs than eagerly
    (bench/NOTES.md). With none of `_LAYOUT_KEYS` in the batch there is no packing and no padding, so for the
    capture's duration the mask code sees "not tracing" and "no packed sequences"; with no padding mask,
    nothing it then does waits for the GPU (tests/gpu/test_cuda_graphs_gpu.py checks the captured calls).
    """
    if any(batch.get(k) is not None for k in _LAYOUT_KEYS):
        yield
        return
    with masks_see_no_packing_or_tracing():
        yield


def pinned_in_place(model, batch: dict) -> bool:
    """Whether offloaded checkpointing would keep this call's layer inputs in host memory pinned in place
    (host_buffers.EXACT_PIN_BYTES or more each: 32k tokens of llama3-8b), which torch refuses to copy into during
    a capture (seen on an H100: "Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the
    CPU tensor is pinned"). Such calls stay eager, shape by shape; at that size the device's time dwarfs the
    host's launches, so the graph would gain nothing."""
    from turbotune.model import host_buffers
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    ids = batch.get("input_ids")
    if ids is None:
        ids = batch.get("inputs_embeds")
    oc = get_offloaded_checkpointing(model) if torch.is_tensor(ids) else None
    if oc is None or not oc.config.pin_memory:
        return False
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # no embedding table to size the layer inputs by
        return False
    hidden, itemsize = weight.shape[-1], weight.element_size()
    tokens = ids.shape[0] * ids.shape[1] if ids.dim() >= 2 else ids.numel()
    return tokens * hidden * itemsize >= host_buffers.EXACT_PIN_BYTES


def why_not_graphable(model, params) -> str | None:
    """None when a training step of `model` can be captured, else a short reason."""
    if not params or params[0].device.type != "cuda" or not torch.cuda.is_available():
        return "the model is not on a CUDA GPU"
    if any(p.device != params[0].device for p in params):
        return "the trainable parameters are on several devices"
    if _has_offload(model):
        return "offloaded checkpointing copies to host memory on a side stream (capture_offload is off)"
    from turbotune.model.lora import uses_dropout
    if uses_dropout(model):
        return "dropout is active (a graph would replay the same random mask)"
    return None


def _has_offload(model) -> bool:
    """Offloaded checkpointing that a graph can't hold (without static host buffers)."""
    from turbotune.model.checkpointing import get_offloaded_checkpointing

    oc = get_offloaded_checkpointing(model)
    return oc is not None and not oc.config.static_host_buffers
