"""Offloaded gradient checkpointing: each decoder layer keeps only its input, and that input waits in host memory.

Plain checkpointing (transformers' `gradient_checkpointing`) keeps one tensor per decoder layer on the GPU, the
layer's input hidden state [batch, seq, hidden], and recomputes the layer in the backward. At long sequences
those inputs are what is left of the activation memory: `layers x batch x seq x hidden x bytes`. Here they go to
pinned host memory instead:

    forward, layer i:   run the layer without autograd; copy its input to the host on a side stream
                        (the GPU copy is freed as soon as the copy has read it)
    backward, layer i:  wait for layer i's input to be back on the GPU (prefetched, or copied now);
                        start copying layer i-1's input back on the side stream  <- overlaps the next line
                        recompute layer i with autograd on, backprop through it

The backward visits the layers in reverse, so the input needed next is always that of the layer before in
forward order: one prefetch in flight, two inputs on the GPU at most during the backward. The last layer's
input is needed first, straight after the forward, so by default it never leaves the GPU.

    from turbotune.model.checkpointing import OffloadConfig, OffloadedCheckpointing
    oc = OffloadedCheckpointing(OffloadConfig(min_offload_bytes=0)).apply(model)   # or: with ... as oc:
    loss = model(**batch).loss; loss.backward()
    oc.stats  # {'saved_inputs': ..., 'offloaded_bytes': ..., 'prefetches': ..., ...}
    oc.remove()

`FastModel.get_peft_model(model, use_gradient_checkpointing="offload")` applies it with the default config.

On the CPU the input already lives on the host, so the "offload" is no copy at all, but everything else (the
no-grad forward, the saved input, the prefetch order, the recompute) runs the same way, which is what the CPU
tests check. The CUDA-only parts are the copies and the stream/event calls in `_to_host`, `_prefetch` and
`_restore` (offload_transfers.py, which holds how the saved inputs are stored and brought back).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from turbotune._compat import clear_layer_caches, unwrap_peft
from turbotune.errors import ConfigError
from turbotune.model.host_buffers import HostBufferPool, host_memory_bytes
from turbotune.model.offload_transfers import _INPLACE_MESSAGE, SavedInputs, _capturing, _Saved
from turbotune.model.recompute import recompute_scope
from turbotune.model.state import turbo_state

# On each wrapped layer (the model's TurboState holds the OffloadedCheckpointing itself): (attribute name, what
# was there before). It stays on the layer: `_wrap` and `remove` work layer by layer, and the marker also stops
# a layer being wrapped twice by two OffloadedCheckpointing objects.
_ORIGINAL = "_turbotune_offload_original"
_MISSING = object()


@dataclass
class OffloadConfig:
    enabled: bool = True            # False = plain recompute (keep the input on the GPU)
    pin_memory: bool = True         # pinned host buffers (async copies); ignored on CPU
    keep_last_on_gpu: bool = True   # the last layer's input is needed first in backward: don't offload it
    min_offload_bytes: int = 1 << 20  # smaller inputs stay on the device (copy overhead > saving)
    preserve_rng_state: bool = True  # replay dropout masks exactly in the recompute (as torch.utils.checkpoint)
    static_host_buffers: bool = False  # reuse pinned buffers per (layer, shape): CUDA-graph capture needs it


# ----------------------------------------------------------------------------------------------- bookkeeping

def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if isinstance(dtype, str):
        found = names.get(dtype.lower()) or getattr(torch, dtype, None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"unknown dtype {dtype!r}")


def offloaded_bytes_per_layer(batch: int, seq: int, hidden: int, dtype=torch.bfloat16) -> int:
    """Bytes of one decoder layer's saved input: batch x seq x hidden x element size."""
    d = _dtype(dtype)
    return int(batch) * int(seq) * int(hidden) * (torch.finfo(d).bits // 8 if d.is_floating_point else
                                                  torch.iinfo(d).bits // 8)


@dataclass
class OffloadMemory:
    """What offloaded checkpointing holds where, for one forward+backward (see `estimate_offload_memory`)."""
    per_layer_bytes: int       # one layer's input
    offloaded_layers: int      # inputs that go to the host
    host_bytes: int            # host memory the saved inputs take (pinned, when pin_memory)
    device_saved_bytes: int    # saved inputs that stay on the GPU between forward and backward
    device_backward_bytes: int  # extra GPU memory during the backward: a restored input + one prefetched
    device_saved_by_offload: int  # GPU memory saved compared with plain recompute (which keeps every input)


def estimate_offload_memory(num_layers: int, batch: int, seq: int, hidden: int, dtype=torch.bfloat16,
                            config: OffloadConfig | None = None) -> OffloadMemory:
    """Simple arithmetic for the planner: the same decisions `OffloadedCheckpointing` makes, per layer input."""
    cfg = config or OffloadConfig()
    per = offloaded_bytes_per_layer(batch, seq, hidden, dtype)
    if not cfg.enabled or per < cfg.min_offload_bytes or num_layers <= 0:
        n_off = 0
    else:
        n_off = num_layers - (1 if cfg.keep_last_on_gpu else 0)
    kept = num_layers - n_off
    backward_extra = per * min(2, n_off)  # the input being recomputed (if it came from the host) + the prefetch
    return OffloadMemory(per_layer_bytes=per, offloaded_layers=n_off, host_bytes=per * n_off,
                         device_saved_bytes=per * kept, device_backward_bytes=backward_extra,
                         device_saved_by_offload=per * n_off)


# ------------------------------------------------------------------------------------- the layer's recompute

class _LayerCall:
    """Everything the recompute needs to call one layer again as it was called in the forward."""
    __slots__ = ("owner", "index", "original", "rest", "kwargs", "leaves", "spec", "grad_pos", "n_params",
                 "hidden_requires_grad", "entry", "rng", "autocast")

    def run(self, x, grad_leaf_values=None):
        rest, kwargs = self.rest, self.kwargs
        if grad_leaf_values:
            leaves = list(self.leaves)
            for pos, value in zip(self.grad_pos, grad_leaf_values):
                leaves[pos] = value
            rest, kwargs = tree_unflatten(leaves, self.spec)
        return self.original(x, *rest, **kwargs)


def _autocast_state(device_type: str):
    types = [device_type] if device_type == "cpu" else [device_type, "cpu"]
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types], \
        torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def _autocast_as(state):
    settings, cache_enabled = state
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in settings:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype,
                                               cache_enabled=cache_enabled))
        yield


class _OffloadedLayerFunction(torch.autograd.Function):
    """forward: the layer without autograd, input saved (offloaded). backward: restore, recompute, backprop.

    Inputs: (call, hidden, *tensor arguments that require grad, *the layer's trainable parameters). The
    parameters are inputs only so that the output requires grad when the hidden state does not (the first
    layer of LoRA training) and so that their gradients come back through the normal autograd path.
    """

    @staticmethod
    def forward(ctx, call, hidden, *grad_inputs):
        ctx.set_materialize_grads(False)
        owner = call.owner
        if owner.config.preserve_rng_state and not _capturing(hidden):  # (graphs refuse dropout anyway)
            cuda_state = torch.cuda.get_rng_state(hidden.device) if hidden.device.type == "cuda" else None
            call.rng = (torch.get_rng_state(), cuda_state)
        call.autocast = _autocast_state(hidden.device.type)
        # Saved (the device->host copy queued) before the layer runs, so the copy overlaps the layer's compute.
        call.entry = owner._save(hidden, call.index)
        version = hidden._version
        out = call.run(hidden)  # grad mode is off inside Function.forward: nothing but the input is kept
        if hidden._version != version:
            raise RuntimeError(_INPLACE_MESSAGE)
        ctx.call = call
        ctx.params = grad_inputs[len(call.grad_pos):]  # the layer's trainable parameters (inputs: no cycle)
        return out

    @staticmethod
    def backward(ctx, *grad_outputs):
        call = ctx.call
        n_out = 2 + len(call.grad_pos) + call.n_params
        if all(g is None for g in grad_outputs):
            return (None,) * n_out
        owner = call.owner
        x = owner._take(call.entry)  # back on the device; starts the prefetch of the layer before
        x = x.detach().requires_grad_(call.hidden_requires_grad)
        grad_leaves = [call.leaves[p].detach().requires_grad_(True) for p in call.grad_pos]
        devices = [x.device] if (call.rng is not None and x.device.type == "cuda") else []
        with torch.random.fork_rng(devices=devices, enabled=call.rng is not None):
            if call.rng is not None:
                torch.set_rng_state(call.rng[0])
                if devices:
                    torch.cuda.set_rng_state(call.rng[1], x.device)
            with torch.enable_grad(), _autocast_as(call.autocast), recompute_scope():
                out = call.run(x, grad_leaves)
        owner.stats["recomputes"] += 1
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        wrt = ([x] if call.hidden_requires_grad else []) + grad_leaves + list(ctx.params)
        if not pairs or not wrt:
            return (None,) * n_out
        grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        gx = grads.pop(0) if call.hidden_requires_grad else None
        return (None, gx, *grads)


# ------------------------------------------------------------------------------------------- the public object

def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of decoder layers (e.g. `model.model.layers`), PEFT wrappers unwrapped.

    Prefers lists of transformers' `GradientCheckpointingLayer`s; otherwise a list named layers/h/blocks of one
    module class. With several (a multimodal model), the one holding the most parameters: the language model.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except Exception:  # pragma: no cover - transformers older than 4.52
        GradientCheckpointingLayer = ()
    base = unwrap_peft(model)
    best, best_key = None, None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        is_gc = bool(GradientCheckpointingLayer) and all(isinstance(m, GradientCheckpointingLayer) for m in module)
        named = name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks") and len({type(m) for m in module}) == 1
        if not (is_gc or named):
            continue
        key = (is_gc, sum(p.numel() for p in module.parameters()))
        if best_key is None or key > best_key:
            best, best_key = module, key
    if best is None:
        raise ConfigError(f"found no decoder layers (an nn.ModuleList of layers) in {type(base).__name__}; "
                          "pass layers= to OffloadedCheckpointing.apply")
    return best


def get_offloaded_checkpointing(model: nn.Module) -> "OffloadedCheckpointing | None":
    """The OffloadedCheckpointing applied to `model` (or its PEFT wrapper), or None."""
    return turbo_state(model).offload


def remove_offloaded_checkpointing(model: nn.Module) -> bool:
    """Undo offloaded checkpointing on `model` if it is applied. Returns whether there was something to undo."""
    oc = get_offloaded_checkpointing(model)
    if oc is None:
        return False
    oc.remove()
    return True


class OffloadedCheckpointing(SavedInputs):
    """Offloaded gradient checkpointing of a model's decoder layers. See the module docstring.

    `apply(model)` wraps each decoder layer's forward (per instance; transformers' own checkpointing is turned
    off) and returns self; `remove()` puts the original forwards back. Saving and restoring the inputs:
    `SavedInputs` (offload_transfers.py). Usable as a context manager:
    `with OffloadedCheckpointing(cfg).apply(model) as oc: ...` removes on exit.
    """

    def __init__(self, config: OffloadConfig | None = None, **knobs):
        if config is not None and knobs:
            raise TypeError("pass an OffloadConfig or keyword knobs, not both")
        self.config = config or OffloadConfig(**knobs)
        self.stats: dict[str, int] = {}
        self.reset_stats()
        self._model = None
        self._layers: list[nn.Module] = []
        self._last_index = -1
        self._pending: list[weakref.ref] = []  # saved inputs waiting for their backward, in forward order
        self._streams: dict[torch.device, object] = {}
        self._warned = False
        total = host_memory_bytes()  # eager steps keep at most 3/4 of it pinned for reuse (host_buffers.py)
        self._host_pool = HostBufferPool(self.config.pin_memory, limit_bytes=total * 3 // 4 if total else None)
        self._unjoined: list[_Saved] = []  # (capture) copies to the host the compute stream has not waited for

    # -- lifecycle --------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats.clear()
        self.stats.update(saved_inputs=0, offloaded_inputs=0, offloaded_bytes=0, kept_on_device=0,
                          prefetches=0, prefetch_hits=0, sync_restores=0, recomputes=0)

    @property
    def applied(self) -> bool:
        return self._model is not None

    def apply(self, model: nn.Module, layers: nn.ModuleList | None = None) -> "OffloadedCheckpointing":
        from turbotune._compat import checkpointing_disable, is_checkpointing

        base = unwrap_peft(model)
        if self._model is not None:
            if self._model is base:
                return self
            raise ConfigError("this OffloadedCheckpointing is already applied to another model; make a new one")
        if turbo_state(base).offload is not None:
            raise ConfigError("offloaded checkpointing is already applied to this model; remove() it first")
        if is_checkpointing(model):
            checkpointing_disable(model)  # the two must not nest: ours replaces transformers'
        layers = find_decoder_layers(base) if layers is None else layers
        self._layers = list(layers)
        self._last_index = len(self._layers) - 1
        for index, layer in enumerate(self._layers):
            self._wrap(layer, index)
        turbo_state(base).offload = self
        self._model = base
        return self

    def remove(self, model: nn.Module | None = None) -> None:
        if self._model is None:
            return
        if model is not None and unwrap_peft(model) is not self._model:
            raise ConfigError("this OffloadedCheckpointing is applied to a different model")
        for layer in self._layers:
            attr, original = layer.__dict__.pop(_ORIGINAL, ("forward", None))
            if original is None:
                continue  # not ours any more
            if original is _MISSING:
                layer.__dict__.pop(attr, None)
            else:
                setattr(layer, attr, original)
        turbo_state(self._model).offload = None
        self._model, self._layers, self._pending = None, [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def _wrap(self, layer: nn.Module, index: int) -> None:
        if _ORIGINAL in layer.__dict__:
            raise ConfigError(f"decoder layer {index} is already wrapped by offloaded checkpointing")
        # accelerate's device hooks replace `forward` and call `_old_forward`: wrap that so the hook stays outside.
        attr = "_old_forward" if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward") else "forward"
        layer.__dict__[_ORIGINAL] = (attr, layer.__dict__.get(attr, _MISSING))
        original = getattr(layer, attr)

        def forward(*args, **kwargs):
            return self._call_layer(layer, index, original, args, kwargs)

        setattr(layer, attr, forward)

    # -- forward -----------------------------------------------------------------------------------------------
    def _call_layer(self, layer, index, original, args, kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)  # eval / generation / no_grad: nothing to save, caches work
        if getattr(layer, "gradient_checkpointing", False):
            if not self._warned:
                self._warned = True
                warnings.warn("transformers' gradient checkpointing was switched on after turbotune's offloaded "
                              "checkpointing; the layers use transformers' (no offload). Turn one of them off.",
                              stacklevel=3)
            return original(*args, **kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            return original(*args, **kwargs)
        if not torch.is_tensor(hidden) or not hidden.is_floating_point():
            return original(*args, **kwargs)
        kwargs = dict(kwargs)
        # A KV cache must not be written by both the forward and the recompute, so it is dropped while training
        # under this checkpointing (as transformers' checkpointing does).
        clear_layer_caches(kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False

        params = [p for p in layer.parameters() if p.requires_grad]
        leaves, spec = tree_flatten((rest, kwargs))
        grad_pos = [i for i, leaf in enumerate(leaves) if torch.is_tensor(leaf) and leaf.requires_grad]
        if not (hidden.requires_grad or grad_pos or params):
            return original(hidden, *rest, **kwargs)  # frozen layer on a no-grad input: no backward through it

        call = _LayerCall()
        call.owner, call.index, call.original = self, index, original
        call.rest, call.kwargs, call.leaves, call.spec, call.grad_pos = rest, kwargs, leaves, spec, grad_pos
        call.n_params, call.hidden_requires_grad = len(params), hidden.requires_grad
        call.entry = call.rng = call.autocast = None
        return _OffloadedLayerFunction.apply(call, hidden, *[leaves[i] for i in grad_pos], *params)
