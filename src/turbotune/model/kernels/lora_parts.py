"""What the fused LoRA functions need from one PEFT-wrapped linear, and the shared matmul pieces.

A `LoRAPart` is a view of one `peft.tuners.lora.Linear` (or `lora.Linear4bit` over a bitsandbytes
`Linear4bit`) with its active adapter: frozen base weight W [out, in] (+ optional frozen bias b), trainable
A [r, in] (lora_A.weight), B [out, r] (lora_B.weight) and the scaling s (lora_alpha / r, or / sqrt(r) for
rsLoRA -- read from the module, so whatever PEFT computed). A plain `nn.Linear` / `Linear4bit` without LoRA
gives a part with A = B = None (a frozen projection), so a fused q/k/v still works when LoRA targets only
some of the projections.

    y = x W^T + b + s * (x A^T) B^T

Dtypes (matching PEFT): the base product runs in x's dtype ("cd"; a 4-bit W is dequantised to it). PEFT
casts x to lora_A's dtype before the adapter ("ld"; adapters are usually fp32 under a bf16 model, PEFT's
autocast_adapter_dtype), so the rank-r product xa = x A^T and the adapter gradients dA, dB are computed in ld.
The rank-r expansion back to the wide output, s * xa B^T, and the input-gradient term s * (dY B) A are
accumulated straight into the cd output buffers with addmm_ (operands rounded to cd, fp32 accumulation in the
GEMM, one rounding) instead of PEFT's separate ld-sized temporary + add + cast. In fp32 the two agree to
round-off; in bf16 to within a bf16 ulp of the LoRA term.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from turbotune._compat import autocast_dtype
from turbotune.model.kernels import bf16x3
from turbotune.model.kernels._dispatch import interpret_mode
from turbotune.model.kernels._triton_utils import HAS_TRITON
from turbotune.model.kernels.skinny_fp32 import MAX_RANK, skinny_mm_t, skinny_tn

logger = logging.getLogger(__name__)

__all__ = ["LoRAPart", "lora_part", "fused_lora_unsupported_reason", "dense_weight", "is_4bit"]


@dataclass
class LoRAPart:
    """Everything the fused functions need from one PEFT-wrapped linear (A, B None: no adapter)."""
    weight: Any                      # frozen base weight [out, in]: a Parameter or a bnb Params4bit
    bias: torch.Tensor | None        # frozen base bias [out]
    A: torch.Tensor | None           # lora_A weight [r, in] (trainable)
    B: torch.Tensor | None           # lora_B weight [out, r] (trainable)
    scaling: float
    module: nn.Module | None = None  # the PEFT layer (or plain linear) this came from
    fp32_backend: str = "auto"       # how fp32 adapters read 16-bit activations (FP32_ADAPTER_BACKENDS): the
                                     # model's choice, carried by the part because every product routes on it

    @property
    def out_features(self) -> int:
        qs = getattr(self.weight, "quant_state", None)
        return int(qs.shape[0]) if qs is not None else int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        qs = getattr(self.weight, "quant_state", None)
        return int(qs.shape[1]) if qs is not None else int(self.weight.shape[1])

    @property
    def has_lora(self) -> bool:
        return self.A is not None


# --------------------------------------------------------------------------------------------- base weights
def is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


def dense_weight(part: LoRAPart, dtype: torch.dtype | None = None, slot=None) -> torch.Tensor:
    """The base weight as a dense [out, in] tensor in `dtype` (default: its own dtype).

    A bitsandbytes NF4 weight is dequantised straight into `dtype` by `turbotune.model.quant.dequantize_nf4` (the
    Triton kernel on CUDA, its bitsandbytes-identical reference elsewhere; the same bits as bitsandbytes'
    dequantisation into that dtype), and the result is the SHARED buffer for its (shape, dtype, device): the
    next 4-bit dense_weight of the same shape overwrites it. Callers use it at once and drop it, never save it
    for backward, and never hold two of the same shape.

    Why one buffer per shape is safe for the fused LoRA functions (rather than a buffer per role or call site):
    each caller consumes the weight in the very next GEMM -- `project` (forward: one mm / addmm with W^T) and
    `input_grad_into` (backward: one mm / addmm_ with W) -- and drops it before any other dense_weight call.
    Projections that share a shape are evaluated strictly one after another: MLP gate and up (both [I, H]) in
    forward (project(gate), then project(up)) and backward (_multi_backward: input_grad_into(gate), then up);
    k and v (both [n_kv * d, H], and q too without GQA) in LoRAQKVFunction's loops the same way. So the next
    dequantisation starts only after the previous GEMM was issued, and on CUDA the stream orders the overwrite
    after that GEMM's reads. A buffer per role would add another dense [I, H] copy (~117 MB at Llama-3-8B in
    bf16) for no gain.
    Other (fp4) 4-bit weights still go through bitsandbytes and return a fresh tensor.
    slot: a separate NF4 buffer for a caller that keeps the weight past the next same-shaped dequantisation
    (LoRAMLPFunction's recompute, see `keeps_dequantised`).
    """
    w = part.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError("fused LoRA: this 4-bit weight was repacked by bitsandbytes for CPU inference "
                               "(eval-mode forward without grad); it can't be dequantised here")
        if qs.quant_type == "nf4":
            from turbotune.model.quant import dequantize_nf4
            from turbotune.model.kernels.nf4_dequant import OUT_DTYPES
            target = dtype if dtype in OUT_DTYPES else None  # None: quant_state.dtype, cast below
            w = dequantize_nf4(w, qs, dtype=target, slot=slot)
        else:
            import bitsandbytes.functional as bnbF
            w = bnbF.dequantize_4bit(w.data, qs)
    if dtype is not None and w.dtype != dtype:
        w = w.to(dtype)
    return w


def is_nf4(part: LoRAPart) -> bool:
    """The base weight is a bitsandbytes NF4 weight that dense_weight dequantises with our kernel."""
    qs = getattr(part.weight, "quant_state", None)
    return qs is not None and qs.quant_type == "nf4" and not getattr(qs, "packing_format_for_cpu", False)


# --------------------------------------------------------------------------------------------- PEFT introspection
def _peft_lora_types():
    types = []
    try:
        from peft.tuners.lora import Linear as LoraLinear
        types.append(LoraLinear)
    except Exception:  # pragma: no cover
        pass
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        types.append(LoraLinear4bit)
    except Exception:  # no bitsandbytes
        pass
    return tuple(types)


def _bnb_linear4bit_type():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit
    except Exception:
        return None


def _base_reason(base: nn.Module) -> str | None:
    lin4 = _bnb_linear4bit_type()
    if lin4 is not None and isinstance(base, lin4):
        if not is_4bit(base.weight):
            return "4-bit base weight has no quant_state (not quantised yet)"
    elif type(base) is not nn.Linear:
        return f"base layer {type(base).__name__} is not nn.Linear or bitsandbytes Linear4bit"
    if base.weight.requires_grad:
        return "base weight is trainable"
    if base.bias is not None and base.bias.requires_grad:
        return "base bias is trainable"
    return None


def fused_lora_unsupported_reason(peft_linear: nn.Module) -> str | None:
    """Why `peft_linear` can't run through the fused LoRA functions, or None when it can."""
    lora_types = _peft_lora_types()
    if not isinstance(peft_linear, lora_types):
        if isinstance(peft_linear, nn.Module) and hasattr(peft_linear, "lora_A"):
            return f"unsupported LoRA layer type {type(peft_linear).__name__}"
        # a plain frozen linear (no adapter) is fine
        return _base_reason(peft_linear) if isinstance(peft_linear, nn.Module) else "not a module"
    m = peft_linear
    if getattr(m, "disable_adapters", False):
        return "disable_adapters"
    if getattr(m, "merged", False):
        return "merged"
    active = [a for a in m.active_adapters if a in m.lora_A.keys()]
    if len(active) > 1:
        return f"several active adapters {active}"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    reason = _base_reason(m.get_base_layer())
    if reason or not active:
        return reason  # no active adapter: the base layer alone
    name = active[0]
    if m.use_dora.get(name, False) if hasattr(m, "use_dora") else False:
        return "DoRA"
    if name in getattr(m, "lora_variant", {}):
        return f"LoRA variant {type(m.lora_variant[name]).__name__}"
    if getattr(m, "lora_bias", {}).get(name, False) or m.lora_B[name].bias is not None:
        return "bias on lora"
    drop = m.lora_dropout[name]
    p = getattr(drop, "p", 0.0) if not isinstance(drop, nn.Identity) else 0.0
    if p > 0:
        return f"lora_dropout={p} > 0"
    if type(m.lora_A[name]) is not nn.Linear or type(m.lora_B[name]) is not nn.Linear:
        return "lora_A / lora_B are not nn.Linear"
    return None


def lora_part(peft_linear: nn.Module, fp32_backend: str = "auto") -> LoRAPart | None:
    """The LoRAPart of `peft_linear`'s active adapter, or None when it is unsupported (the reason is
    `fused_lora_unsupported_reason(peft_linear)`). A plain frozen nn.Linear / Linear4bit gives A = B = None."""
    reason = fused_lora_unsupported_reason(peft_linear)
    if reason is not None:
        logger.debug("fused LoRA unsupported for %s: %s", type(peft_linear).__name__, reason)
        return None
    if not hasattr(peft_linear, "lora_A"):
        return LoRAPart(peft_linear.weight, peft_linear.bias, None, None, 0.0, peft_linear, fp32_backend)
    base = peft_linear.get_base_layer()
    active = [a for a in peft_linear.active_adapters if a in peft_linear.lora_A.keys()]
    if not active:
        return LoRAPart(base.weight, base.bias, None, None, 0.0, peft_linear, fp32_backend)
    name = active[0]
    return LoRAPart(base.weight, base.bias, peft_linear.lora_A[name].weight, peft_linear.lora_B[name].weight,
                    float(peft_linear.scaling[name]), peft_linear, fp32_backend)


def lora_state_key(m: nn.Module) -> tuple:
    """What can change a module's fused-LoRA eligibility between forwards, cheaply read: PEFT's
    disable_adapter() context, merge/unmerge, set_adapter / load_adapter, and freezing or replacing the base.

    Read from the module's own attributes where PEFT keeps them (`_lora_state_fast`): through PEFT's properties
    and nn.Module's attribute lookup a call took 7.6 µs, read directly 0.9 µs (timeit, CPU machine); 392 calls
    per pass of a 28-layer model with recompute, paid by every eager pass and every CUDA-graph capture."""
    fast = _lora_state_fast(m)
    if fast is not None:
        return fast
    if not hasattr(m, "lora_A"):
        return (id(m.weight), m.weight.requires_grad)
    base = m.get_base_layer()
    return (m.disable_adapters, m.merged, tuple(m.active_adapters), len(m.lora_A), id(base.weight),
            base.weight.requires_grad, id(getattr(base.weight, "quant_state", None)))


def _lora_state_fast(m: nn.Module) -> tuple | None:
    """lora_state_key from the instance dictionaries (the same values PEFT's properties return), or None where
    a module keeps them elsewhere (another PEFT version, another layer type): the slow path then."""
    d = m.__dict__
    lora_a = d["_modules"].get("lora_A")
    if lora_a is None or "_disable_adapters" not in d or "merged_adapters" not in d or "_active_adapter" not in d:
        return None
    base = m
    while "base_layer" in base.__dict__["_modules"]:  # get_base_layer(): wrappers may nest
        base = base.__dict__["_modules"]["base_layer"]
    weight = base.__dict__["_parameters"].get("weight")
    if weight is None:
        return None
    active = d["_active_adapter"]
    return (d["_disable_adapters"], bool(d["merged_adapters"]), (active,) if isinstance(active, str) else tuple(active),
            len(lora_a), id(weight), weight.requires_grad, id(getattr(weight, "quant_state", None)))


def cached_lora_part(module: nn.Module, fp32_backend: str = "auto") -> LoRAPart | None:
    """`lora_part(module, fp32_backend)`, remembered on the module until its `lora_state_key` (or the backend) changes.

    The full check walks a dozen PEFT attributes; done for seven projections per layer in every forward,
    recompute and backward, it was about a third of the host time of a patched training step (measured with
    cProfile on a 28-layer model whose arithmetic is negligible). Dropout probabilities and LoRA variants are
    fixed at construction in PEFT, so the key leaves them out.
    """
    key = (lora_state_key(module), fp32_backend)
    hit = module.__dict__.get("_turbotune_part")
    if hit is not None and hit[0] == key:
        return hit[1]
    part = lora_part(module, fp32_backend)
    module.__dict__["_turbotune_part"] = (key, part)
    return part


# --------------------------------------------------------------------------------------------- shared math
# How fp32 rank-r products read a 16-bit activation (x, the MLP's h, a wide dY):
#   "torch"  casts it to fp32 and runs an fp32 cuBLAS GEMM (PEFT's literal recipe; always on the CPU);
#   "bf16x3" splits the small fp32 operand into three bf16 pieces and runs one bf16 GEMM with fp32 output
#            (bf16x3.py: the same fp32 products, no fp32 copy, tensor cores; bf16 activations on CUDA);
#   "triton" reads it in place and upcasts in registers (skinny_fp32.py; measured slower on an H200);
#   "auto"   (default) "bf16x3" where it applies and the activation has >= BF16X3_MIN_FEATURES columns,
#            else "torch". Why the width: on an H200 (4,096 tokens, r=16; tests/gpu/test_bf16x3_gpu.py) the pair
#            x A^T + x^T u took 0.08 ms (torch) vs 0.23 ms (bf16x3) at 1,536 columns, 0.22 vs 0.21 at 4,096
#            (r=64), 0.37 vs 0.22 at 8,960 and 0.58 vs 0.22 at 14,336: bf16x3's time barely depends on the
#            width, the fp32 copy's grows with it.
# The choice is per model (TurboState.fp32_adapter_backend, set with `set_fp32_adapter_backend(name, model)`);
# the patched forwards put it on each LoRAPart, which is what `_route` reads.
FP32_ADAPTER_BACKENDS = ("auto", "torch", "bf16x3", "triton")
BF16X3_MIN_FEATURES = 4096


def set_fp32_adapter_backend(name: str, model: nn.Module) -> str:
    """Choose how `model`'s fp32 adapters read 16-bit activations (a PEFT wrapper or the model under it);
    returns its previous choice. Takes effect at the model's next forward; a CUDA-graphed step needs `reset()`.

    The model is required (it once set a process-wide choice): a choice for "models patched later" would
    silently miss the model already loaded. Direct calls of the fused functions, with no model, put the
    backend on their parts: `lora_part(module, fp32_backend=name)`."""
    if name not in FP32_ADAPTER_BACKENDS:
        raise ValueError(f"fp32 adapter backend must be one of {FP32_ADAPTER_BACKENDS}, got {name!r}")
    from turbotune.model.state import turbo_state  # the kernels read only their parts; this setter alone knows models

    state = turbo_state(model)
    prev, state.fp32_adapter_backend = state.fp32_adapter_backend, name
    return prev


def fp32_adapter_backend_in_effect(device_type: str, backend: str = "auto") -> str:
    """What a choice (a model's TurboState.fp32_adapter_backend) means on this device for bf16 activations:
    "torch", "bf16x3" or "triton"."""
    if backend != "auto":
        return backend
    if device_type == "cuda" and bf16x3.gpu_supported():
        return f"bf16x3 for activations >= {BF16X3_MIN_FEATURES} wide, torch below"
    return "torch"


def _route(wide: torch.Tensor, ld: torch.dtype, part: LoRAPart) -> str:
    """Which recipe computes this fp32 rank-r product (see FP32_ADAPTER_BACKENDS): "torch", "bf16x3" or
    "triton". Anything but fp32 adapters over a 16-bit activation is plain torch."""
    backend = part.fp32_backend
    if backend == "torch" or ld != torch.float32 or part.A is None or part.A.dtype != torch.float32 \
            or part.B.dtype != torch.float32 or wide.dtype not in (torch.bfloat16, torch.float16):
        return "torch"
    if backend == "triton":
        ok = part.A.shape[0] <= MAX_RANK and (wide.is_cuda or interpret_mode()) and HAS_TRITON
        return "triton" if ok else "torch"
    if wide.dtype != torch.bfloat16:
        return "torch"
    if backend == "bf16x3":  # forced: also on the CPU, where the pieces are multiplied in fp32 (tests)
        return "bf16x3"
    wide_enough = wide.shape[-1] >= BF16X3_MIN_FEATURES  # wide is [tokens, features] at every call
    return "bf16x3" if wide_enough and _bf16x3_available(wide) else "torch"


def _bf16x3_available(wide: torch.Tensor) -> bool:
    return wide.is_cuda and bf16x3.gpu_supported()


def no_autocast(device_type: str):
    """Context that switches autocast off (our matmuls use explicit dtypes), or a no-op when it is off."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def lora_dtype(part: LoRAPart, amp: torch.dtype | None) -> torch.dtype | None:
    """Dtype of the rank-r computation: lora_A's (PEFT casts x to it), or the autocast dtype when autocast is
    on (under autocast PEFT's lora_A(x) runs in it too). None for a part without adapter."""
    if part.A is None:
        return None
    return amp if amp is not None else part.A.dtype


class CastCache:
    """x (or dY) cast to each adapter dtype at most once, shared by the projections that read it."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self._c = {t.dtype: t}

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._c:
            self._c[dtype] = self.t.to(dtype)
        return self._c[dtype]


_COMPUTE = object()  # project's xa default: compute x A^T here


def project(x2: torch.Tensor, xc: CastCache, part: LoRAPart, ld: torch.dtype, w: torch.Tensor | None = None,
            xa=_COMPUTE):
    """out = x W^T + b + s (x A^T) B^T in x's dtype; returns (out, xa) with xa = x A^T [N, r] in ld (or None).

    W is dequantised/cast for this call only and released before returning, unless the caller passes it as `w`
    (the dense weight in x's dtype). `xa`: x A^T when the caller has it already (adapter_products).
    """
    cd = x2.dtype
    w = dense_weight(part, cd) if w is None else w
    if part.bias is not None:
        out = torch.addmm(part.bias.to(cd), x2, w.t())
    else:
        out = torch.mm(x2, w.t())
    del w
    if xa is _COMPUTE:
        xa = adapter_product(x2, xc, part, ld)
    if xa is not None:
        out.addmm_(xa.to(cd), part.B.to(cd).t(), alpha=part.scaling)
    return out, xa


def adapter_product(x2: torch.Tensor, xc: CastCache, part: LoRAPart, ld: torch.dtype) -> torch.Tensor | None:
    """xa = x A^T [N, r] in ld (None without an adapter): the rank-r product the backward's dB needs."""
    if part.A is None:
        return None
    route = _route(x2, ld, part)
    if route == "bf16x3":
        return bf16x3.wide_mm_fp32(x2, part.A.t())
    if route == "triton":
        return skinny_mm_t(x2, part.A, backend="triton")
    return torch.mm(xc(ld), part.A.to(ld).t())


def adapter_products(x2: torch.Tensor, xc: CastCache, parts, lds) -> list:
    """x A_j^T for adapters that read the same x (q, k, v; gate, up), each as adapter_product computes it,
    except that the ones going the bf16x3 way share ONE GEMM ([A_1; A_2; ..] stacked): these products are
    bound by reading x (r is tiny next to x's width), so x is read once instead of once per adapter."""
    joint = [j for j, (p, ld) in enumerate(zip(parts, lds)) if p.A is not None and _route(x2, ld, p) == "bf16x3"]
    out = [None] * len(parts)
    if len(joint) > 1:
        xa = bf16x3.wide_mm_fp32(x2, torch.cat([parts[j].A for j in joint]).t())
        for j, piece in zip(joint, xa.split([parts[j].A.shape[0] for j in joint], dim=1)):
            out[j] = piece
    return [o if o is not None else adapter_product(x2, xc, p, ld) for o, p, ld in zip(out, parts, lds)]


def joint_a_grads(us, x2: torch.Tensor, parts) -> list:
    """dA_j = s_j u_j^T x for adapters that read the same x and go the bf16x3 way: one GEMM with the u_j side
    by side, for the same reason as adapter_products."""
    if len(us) == 1:
        return [_a_grad(us[0], x2, None, parts[0], "bf16x3")]
    g = bf16x3.wide_mm_fp32(x2.t(), torch.cat(us, dim=1))  # [in, sum r]
    return [piece.t().contiguous().mul_(p.scaling) for piece, p in zip(g.split([u.shape[1] for u in us], 1), parts)]


def joint_a_route(xc: CastCache | None, ld: torch.dtype, part: LoRAPart) -> bool:
    """Whether this adapter's dA can join joint_a_grads (its x goes the bf16x3 way)."""
    return xc is not None and _route(xc.t, ld, part) == "bf16x3"


def adapter_grads(dy: CastCache, xc: CastCache | None, xa: torch.Tensor | None, part: LoRAPart,
                  ld: torch.dtype, need_a: bool, need_b: bool):
    """For out = ... + s (x A^T) B^T and dY = dL/dout:

        u  = dY B                 [N, r]   (ld)
        dB = s dY^T xa            [out, r]
        dA = s u^T x              [r, in]
    Returns (u, dA, dB), each in ld (u is needed for dx += s u A).
    """
    dy_route = _route(dy.t, ld, part)
    x_route = _route(xc.t, ld, part) if need_a else dy_route
    if "triton" in (dy_route, x_route) and dy_route != x_route:
        dy_route = x_route = "torch"  # the Triton kernels run as a pair or not at all
    # u and dB read dY; dA reads x: each goes its own way (their widths differ, e.g. an MLP's gate vs its input)
    if dy_route == "triton":
        u = skinny_mm_t(dy.t, part.B.t(), backend="triton")
        d_b = skinny_tn(dy.t, xa, backend="triton").mul_(part.scaling) if need_b else None
    elif dy_route == "bf16x3":
        u = bf16x3.wide_mm_fp32(dy.t, part.B)
        d_b = bf16x3.wide_mm_fp32(dy.t.t(), xa).mul_(part.scaling) if need_b else None
    else:
        dyl = dy(ld)
        u = torch.mm(dyl, part.B.to(ld))
        d_b = torch.mm(dyl.t(), xa).mul_(part.scaling) if need_b else None
    d_a = _a_grad(u, xc.t, lambda: xc(ld), part, x_route) if need_a else None
    return u, d_a, d_b


def down_adapter_grad(u: torch.Tensor, h: torch.Tensor, part: LoRAPart, ld: torch.dtype) -> torch.Tensor:
    """dA = s u^T h for the MLP's down projection (h recomputed in backward, 16-bit, [N, I])."""
    return _a_grad(u, h, lambda: h.to(ld), part, _route(h, ld, part))


def _a_grad(u: torch.Tensor, wide: torch.Tensor, wide_in_ld, part: LoRAPart, route: str) -> torch.Tensor:
    """dA = s u^T x for a [N, in] activation x (`wide`; `wide_in_ld()` gives it in the adapter dtype)."""
    if route == "bf16x3":
        return bf16x3.wide_mm_fp32(wide.t(), u).t().contiguous().mul_(part.scaling)
    if route == "triton":
        return skinny_tn(wide, u, backend="triton").t().contiguous().mul_(part.scaling)
    return torch.mm(u.t(), wide_in_ld()).mul_(part.scaling)


def input_grad_into(dx: torch.Tensor | None, dy: torch.Tensor, part: LoRAPart, u: torch.Tensor | None,
                    w: torch.Tensor | None = None):
    """dx += dY W + s u A (u = dY B), with W dequantised for this call only (or the caller's dense `w` when it
    is in dY's dtype); returns dx (new when None)."""
    cd = dy.dtype
    w = w if w is not None and w.dtype == cd else dense_weight(part, cd)
    if dx is None:
        dx = torch.mm(dy, w)
    else:
        dx.addmm_(dy, w)
    del w
    if u is not None:
        dx.addmm_(u.to(cd), part.A.to(cd), alpha=part.scaling)
    return dx


def grad_to(g: torch.Tensor | None, like: torch.Tensor | None):
    """Gradient in its parameter's dtype (adapters may be e.g. bf16 while ld came from autocast)."""
    if g is None or like is None:
        return None
    return g if g.dtype == like.dtype else g.to(like.dtype)
