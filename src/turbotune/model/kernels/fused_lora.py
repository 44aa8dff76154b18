"""Fused LoRA projections with manual backward passes: o_proj, q/k/v from one input, and the gated MLP.

Every projection is PEFT's LoRA linear (dropout 0, one active adapter, frozen base):

    y = x W^T + b + s (x A^T) B^T          A [r, in], B [out, r], s = lora_alpha / r (or rsLoRA's)

applied as (x A^T) B^T (B A is never formed). For dY = dL/dy the chain rule gives

    u  = dY B                               [N, r]
    dB = s dY^T (x A^T)                     [out, r]
    dA = s u^T x                            [r, in]
    dx = dY W + s u A                       [N, in]

and nothing for W or b (frozen, never computed). x A^T is [N, r] (r/in of x's size), so it is kept from
forward instead of recomputed. A 4-bit W is dequantised by `dense_weight` in forward and again in backward; no
dense weight is saved, with one exception: a checkpointed layer's recompute keeps the MLP's dequantised gate
and up weights for the backward that follows it at once (LoRAMLPFunction, `checkpoint_phase`).
x of shape [..., in] is flattened to [N, in]. Dtypes follow PEFT (see lora_parts): wide products in x's dtype,
the rank-r products and dA / dB in lora_A's dtype.

adapter_precision (every entry point): "peft" (default) runs the rank-r products in lora_A's dtype exactly as
PEFT does; with PEFT's default fp32 adapters under a bf16 model that upcasts x, h, dY, de, dg to fp32 for the
skinny GEMMs. "input" casts A and B to x's dtype instead (r x in copies) and rounds dA / dB to x's dtype
before casting them to the adapters' dtype: bf16 adapter gradients, like Unsloth's. Measured on an H200 (bf16
Qwen2-1.5B-sized MLP, 8192 tokens, fp32 adapters, fwd+bwd): PEFT 6.7 ms / 1150 MiB peak, "peft" 4.7 ms /
751 MiB, "input" 2.9 ms / 469 MiB.

Autocast: if autocast is on when a function is called, x is cast to the autocast dtype first and the adapter
math runs in that dtype (as PEFT's lora_A(x) would under autocast); the functions themselves run with
autocast off. Each function supports one backward (retain_graph double-backward through lora_mlp raises,
since its backward reuses the saved activations' buffers).
"""
from __future__ import annotations

import torch

from turbotune.model.kernels.lora_parts import (
    CastCache, LoRAPart, adapter_grads, adapter_product, adapter_products, autocast_dtype, dense_weight,
    down_adapter_grad, fused_lora_unsupported_reason, grad_to, input_grad_into, is_nf4, joint_a_grads,
    joint_a_route, lora_dtype, lora_part, no_autocast, project,
)
from turbotune.model.kernels.swiglu import act_mul_backward, act_mul_forward, geglu_reference, swiglu_reference

__all__ = ["LoRAPart", "lora_part", "fused_lora_unsupported_reason", "dense_weight",
           "lora_linear", "lora_qkv", "lora_mlp",
           "LoRALinearFunction", "LoRAQKVFunction", "LoRAMLPFunction"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _needs(ctx, i_a: int) -> tuple[bool, bool]:
    """(need dA, need dB) for the adapter pair whose A is input number i_a."""
    return ctx.needs_input_grad[i_a], ctx.needs_input_grad[i_a + 1]


def _multi_backward(dys, parts, lds, xc, xas, ctx, first_a_index, need_x, ws=None):
    """Gradients of sum_j y_j, y_j = x W_j^T + b_j + s_j (x A_j^T) B_j^T, all reading the same x.

    dx = sum_j (dY_j W_j + s_j u_j A_j) is accumulated in ONE [N, in] buffer (first term by mm, the rest by
    addmm_). ws: dense W_j already at hand (else each is dequantised/cast here). Returns (dx, [dA_j, dB_j, ...]).
    """
    dx = None
    grads = []
    joint = []  # (j, u_j) whose dA comes from one shared GEMM below (lora_parts.joint_a_grads)
    ws = ws or [None] * len(parts)
    for j, (dy, part, ld, xa, w) in enumerate(zip(dys, parts, lds, xas, ws)):
        u = None
        need_a, need_b = _needs(ctx, first_a_index + 2 * j)
        if part.has_lora and (need_a or need_b or need_x):
            later = need_a and joint_a_route(xc, ld, part)
            u, d_a, d_b = adapter_grads(CastCache(dy), xc, xa, part, ld, need_a and not later, need_b)
            if later:
                joint.append((j, u))
            grads += [grad_to(d_a, part.A), grad_to(d_b, part.B)]
        else:
            grads += [None, None]
        if need_x:
            dx = input_grad_into(dx, dy, part, u, w)
    if joint:
        d_as = joint_a_grads([u for _, u in joint], xc.t, [parts[j] for j, _ in joint])
        for (j, _), d_a in zip(joint, d_as):
            grads[2 * j] = grad_to(d_a, parts[j].A)
    return dx, grads


# --------------------------------------------------------------------------------------------- o_proj
class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T.

    Saved: x (only when dA is needed) and xa = x A^T [N, r] (only when dB is needed). Backward: the four
    equations of the module docstring with one dequantisation of W.
    """

    @staticmethod
    def forward(ctx, x, A, B, part: LoRAPart, ld):
        x2 = _flat(x)
        out, xa = project(x2, CastCache(x2), part, ld)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.save_for_backward(x if need_a else None, xa if need_b else None)
        ctx.part, ctx.ld, ctx.x_shape = part, ld, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, xa = ctx.saved_tensors
        xc = CastCache(_flat(x)) if x is not None else None
        with no_autocast(dy.device.type):
            dx, (d_a, d_b) = _multi_backward([_flat(dy)], [ctx.part], [ctx.ld], xc, [xa], ctx, 1,
                                              ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, d_a, d_b, None, None


# --------------------------------------------------------------------------------------------- q, k, v
class LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = three LoRA projections of the same x, read once.

        q = x Wq^T + bq + s_q (x Aq^T) Bq^T   (same for k, v)

    Backward (dQ, dK, dV the output gradients):

        dx  = dQ Wq + dK Wk + dV Wv + s_q (dQ Bq) Aq + s_k (dK Bk) Ak + s_v (dV Bv) Av    (one buffer)
        dBq = s_q dQ^T (x Aq^T),  dAq = s_q (dQ Bq)^T x                                     (same for k, v)

    Saved: x (when any dA is needed; its cast to the adapter dtype is shared by the three) and the three
    x A^T [N, r] (when the matching dB is needed).
    """

    @staticmethod
    def forward(ctx, x, Aq, Bq, Ak, Bk, Av, Bv, parts, lds):
        x2 = _flat(x)
        xc = CastCache(x2)
        outs, xas = [], []
        xa_all = adapter_products(x2, xc, parts, lds)
        for j, (part, ld) in enumerate(zip(parts, lds)):
            out, xa = project(x2, xc, part, ld, xa=xa_all[j])
            # Returned flat: views returned by a multi-output Function could not be modified in place
            # later (RoPE rotates q and k in place); lora_qkv reshapes outside the Function.
            outs.append(out)
            xas.append(xa if ctx.needs_input_grad[2 + 2 * j] else None)
        del xc
        need_any_a = any(ctx.needs_input_grad[1 + 2 * j] for j in range(3))
        ctx.save_for_backward(x if need_any_a else None, *xas)
        ctx.parts, ctx.lds, ctx.x_shape = parts, lds, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, *xas = ctx.saved_tensors
        xc = CastCache(_flat(x)) if x is not None else None
        with no_autocast(dq.device.type):
            dx, grads = _multi_backward([_flat(dq), _flat(dk), _flat(dv)], ctx.parts, ctx.lds, xc, xas, ctx, 1,
                                        ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, *grads, None, None)


# --------------------------------------------------------------------------------------------- gated MLP
class LoRAMLPFunction(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)), LoRA on all three projections.

    Forward:
        e = x Wg^T + s_g (x Ag^T) Bg^T          [N, I]   (gate pre-activation)
        g = x Wu^T + s_u (x Au^T) Bu^T          [N, I]   (up)
        h = act(e) * g                          [N, I]   (act_mul_forward; not saved)
        y = h Wd^T + s_d (h Ad^T) Bd^T          [N, H]

    Backward, dY = dL/dy:
        u_d = dY Bd;   dBd = s_d dY^T (h Ad^T);   dh = dY Wd + s_d u_d Ad
        (h, de, dg) = act_mul_backward(dh, e, g):  de = dh * g * act'(e),  dg = dh * act(e)
        dAd = s_d u_d^T h                                   (h recomputed in the same pass, never saved)
        u_g = de Bg;   dBg = s_g de^T (x Ag^T);   dAg = s_g u_g^T x      (same for up with dg)
        dx  = de Wg + dg Wu + s_g u_g Ag + s_u u_u Au       (one buffer)

    Saved: x (when a gate/up dA is needed), e and g (the only [N, I] tensors), and the [N, r] products
    x Ag^T, x Au^T, h Ad^T. The backward writes h into dh's buffer and de / dg over e / g (act_mul_backward
    in place), so the [N, I] peak is three buffers, as in forward.

    output_unused=True (a checkpointed layer's recompute whose output only feeds the residual sum, see
    recompute.py): everything the backward needs is saved as usual, but y itself (the down projection: a
    [N, I] x [I, H] matmul, and the dequantisation of a 4-bit Wd) is not computed; zeros stand in for it.
    checkpoint_phase (recompute.checkpoint_phase()): with NF4 gate and up weights, a checkpointed layer's
    recompute ("recompute") keeps their dequantised copies for the backward that autograd runs next (the
    recompute is triggered by that backward): 2 of the 20 dequantisations per layer and micro-step saved, for
    one more [I, H] buffer. They travel as saved tensors, which is what a non-reentrant checkpoint hands from
    the recompute to the backward; so the layer's first run ("forward") saves same-shaped stand-ins (the
    shared buffers, never read: the checkpoint keeps only their shapes). The backward uses the pair only when
    up is the recompute's own buffer, else it dequantises as usual (`_held_weights`, `_usable`).
    """

    @staticmethod
    def forward(ctx, x, Ag, Bg, Au, Bu, Ad, Bd, parts, lds, act, backend, output_unused=False,
                checkpoint_phase=None):
        gate_p, up_p, down_p = parts
        x2 = _flat(x)
        xc = CastCache(x2)
        keep = checkpoint_phase is not None and is_nf4(gate_p) and is_nf4(up_p)
        held = _held_weights(parts, x2.dtype) if keep and checkpoint_phase == "recompute" else None
        xa_g, xa_u = adapter_products(x2, xc, parts[:2], lds[:2])
        e, xa_g = project(x2, xc, gate_p, lds[0], held[0] if held else None, xa=xa_g)
        g, xa_u = project(x2, xc, up_p, lds[1], held[1] if held else None, xa=xa_u)
        del xc
        h = act_mul_forward(e, g, act, backend)
        nig = ctx.needs_input_grad
        if output_unused:
            ha_d = adapter_product(h, CastCache(h), down_p, lds[2]) if nig[6] else None
            y = h.new_zeros(h.shape[0], down_p.out_features)
        else:
            y, ha_d = project(h, CastCache(h), down_p, lds[2])
        del h
        if keep and held is None:
            held = _stand_ins(parts, x2.dtype)
        ctx.save_for_backward(x if (nig[1] or nig[3]) else None, e, g,
                              xa_g if nig[2] else None, xa_u if nig[4] else None, ha_d if nig[6] else None,
                              *(held if keep else ()))
        ctx.parts, ctx.lds, ctx.act, ctx.backend, ctx.x_shape = parts, lds, act, backend, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, e, g, xa_g, xa_u, ha_d, *held = ctx.saved_tensors
        gate_p, up_p, down_p = ctx.parts
        ld_g, ld_u, ld_d = ctx.lds
        nig = ctx.needs_input_grad
        with no_autocast(dy.device.type):
            dy2 = _flat(dy)
            # down projection: dh = dY Wd + s_d u_d Ad, and dBd (needs only dY and h Ad^T)
            u_d = d_ad = d_bd = None
            if down_p.has_lora:
                u_d, _, d_bd = adapter_grads(CastCache(dy2), None, ha_d, down_p, ld_d, False, nig[6])
            dh = input_grad_into(None, dy2, down_p, u_d)
            # one element-wise pass: h (into dh's buffer), de (over e), dg (over g)
            h, de, dg = act_mul_backward(dh, e, g, ctx.act, ctx.backend, inplace=True)
            torch.autograd.graph.increment_version(e)  # e, g now hold de, dg: a second backward must fail
            torch.autograd.graph.increment_version(g)
            del dh
            if nig[5]:
                d_ad = down_adapter_grad(u_d, h, down_p, ld_d)
            del h
            xc = CastCache(_flat(x)) if x is not None else None
            dx, (d_ag, d_bg, d_au, d_bu) = _multi_backward([de, dg], [gate_p, up_p], [ld_g, ld_u], xc,
                                                           [xa_g, xa_u], ctx, 1, nig[0],
                                                           _usable(held, ctx.parts, dy2.dtype))
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, d_ag, d_bg, d_au, d_bu, grad_to(d_ad, down_p.A), grad_to(d_bd, down_p.B),
                None, None, None, None, None, None)


_UP_SLOT, _GATE_SLOT = "mlp-up-held", "mlp-gate-held"


def _gate_slot(parts):
    """Gate stays in the shared buffer of its shape: between the recompute and the MLP backward that consumes
    it the only dequantisation is the down projection's, of another shape unless the MLP is square."""
    gate_p, _, down_p = parts
    down_shape = getattr(getattr(down_p.weight, "quant_state", None), "shape", down_p.weight.shape)
    return _GATE_SLOT if tuple(gate_p.weight.quant_state.shape) == tuple(down_shape) else None


def _held_weights(parts, dtype: torch.dtype):
    """(Wg, Wu) dequantised by a recompute and kept for its backward; up in a buffer of its own.

    Assumes one fused MLP per checkpointed layer (every registered family): two same-shaped MLPs in one
    checkpointed region would share these buffers between their recompute and their backward."""
    gate_p, up_p, _ = parts
    return (dense_weight(gate_p, dtype, slot=_gate_slot(parts)), dense_weight(up_p, dtype, slot=_UP_SLOT))


def _stand_ins(parts, dtype: torch.dtype):
    """What a first run saves where the recompute saves the held weights: their shape, dtype and device (all a
    non-reentrant checkpoint records), one element broadcast, so nothing is dequantised and no buffer aliased."""
    return tuple(torch.zeros((), dtype=dtype, device=p.weight.device).expand(tuple(p.weight.quant_state.shape))
                 for p in parts[:2])


def _usable(held, parts, dtype: torch.dtype):
    """The saved (Wg, Wu) when they are a recompute's held weights, else None (dequantise again)."""
    if len(held) != 2 or held[1].dtype != dtype:
        return None
    from turbotune.model.quant import existing_dequant_buffer
    up = parts[1].weight
    own = existing_dequant_buffer(up.quant_state.shape, dtype, up.device, _UP_SLOT)
    return held if own is not None and held[1].data_ptr() == own.data_ptr() else None


# --------------------------------------------------------------------------------------------- entry points
ADAPTER_PRECISIONS = ("peft", "input")


def _prep(x: torch.Tensor, parts, adapter_precision: str):
    """(x cast for autocast, per-part adapter compute dtype)."""
    if adapter_precision not in ADAPTER_PRECISIONS:
        raise ValueError(f"adapter_precision must be one of {ADAPTER_PRECISIONS}, got {adapter_precision!r}")
    amp = autocast_dtype(x.device.type)
    if amp is not None and x.dtype != amp:
        x = x.to(amp)
    if adapter_precision == "input":
        return x, [x.dtype if p.has_lora else None for p in parts]
    return x, [lora_dtype(p, amp) for p in parts]


def _ab(part: LoRAPart):
    return part.A, part.B


def lora_linear(x: torch.Tensor, part: LoRAPart, adapter_precision: str = "peft") -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T (e.g. o_proj), with the manual backward of LoRALinearFunction."""
    x, lds = _prep(x, [part], adapter_precision)
    with no_autocast(x.device.type):
        return LoRALinearFunction.apply(x, *_ab(part), part, lds[0])


def lora_qkv(x: torch.Tensor, q_part: LoRAPart, k_part: LoRAPart, v_part: LoRAPart,
             adapter_precision: str = "peft"):
    """(q, k, v) projections of one x, each [..., out_j]; one dx buffer in backward (LoRAQKVFunction)."""
    parts = (q_part, k_part, v_part)
    x, lds = _prep(x, parts, adapter_precision)
    with no_autocast(x.device.type):
        outs = LoRAQKVFunction.apply(x, *_ab(q_part), *_ab(k_part), *_ab(v_part), parts, tuple(lds))
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


def lora_mlp(x: torch.Tensor, gate_part: LoRAPart, up_part: LoRAPart, down_part: LoRAPart, act: str = "silu",
             backend: str = "auto", adapter_precision: str = "peft", output_unused: bool = False,
             checkpoint_phase: str | None = None) -> torch.Tensor:
    """y = down(act(gate x) * up x) with LoRA on all three (LoRAMLPFunction). act: "silu" | "gelu_tanh".
    output_unused: a recompute that needs only what the backward saves; y is returned as zeros.
    checkpoint_phase: recompute.checkpoint_phase() of the layer ("forward", "recompute" or None)."""
    parts = (gate_part, up_part, down_part)
    x, lds = _prep(x, parts, adapter_precision)
    with no_autocast(x.device.type):
        return LoRAMLPFunction.apply(x, *_ab(gate_part), *_ab(up_part), *_ab(down_part), parts, tuple(lds),
                                     act, backend, output_unused, checkpoint_phase)


# --------------------------------------------------------------------------------------------- references
# Plain PyTorch, PEFT's math written out: the base projection in x's dtype (an NF4 weight dequantised), the
# adapter in the adapters' dtype ("peft": x upcast, as PEFT's _cast_input_dtype) or in x's ("input"), added, and the
# sum cast back to x's dtype. Autograd gives the gradients the fused functions compute by hand.
def lora_linear_reference(x: torch.Tensor, part: LoRAPart, adapter_precision: str = "peft") -> torch.Tensor:
    w = dense_weight(part, x.dtype)
    w = w.clone() if is_nf4(part) else w  # autograd keeps it for the backward; the dequant buffer is shared
    y = torch.nn.functional.linear(x, w, part.bias)
    if not part.has_lora:
        return y
    ld = part.A.dtype if adapter_precision == "peft" else x.dtype
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x.to(ld), part.A.to(ld)), part.B.to(ld))
    return (y + lora * part.scaling).to(x.dtype)


def lora_qkv_reference(x, q_part, k_part, v_part, adapter_precision: str = "peft"):
    return tuple(lora_linear_reference(x, p, adapter_precision) for p in (q_part, k_part, v_part))


def lora_mlp_reference(x, gate_part, up_part, down_part, act: str = "silu", adapter_precision: str = "peft"):
    gate = lora_linear_reference(x, gate_part, adapter_precision)
    up = lora_linear_reference(x, up_part, adapter_precision)
    h = (swiglu_reference if act == "silu" else geglu_reference)(gate, up)
    return lora_linear_reference(h, down_part, adapter_precision)
