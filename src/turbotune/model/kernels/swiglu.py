"""Gated MLP activation: h = act(gate) * up, for SwiGLU (Llama, Qwen2, Mistral) and GeGLU (Gemma).

Forward (per element, computed in fp32, rounded once to the input dtype):

    silu:      a(g) = g * sigma(g)
    gelu_tanh: a(g) = 0.5 g (1 + tanh(z)),  z = c (g + k g^3),  c = sqrt(2/pi), k = 0.044715
               = g * sigma(2 z)                              (since 0.5 (1 + tanh z) = sigma(2 z))
    h = a(g) * u

Backward, given dh = dL/dh:

    dL/du = dh * a(g)
    dL/dg = dh * u * a'(g)
    silu:      a'(g) = s (1 + g (1 - s)),                      s = sigma(g)
    gelu_tanh: a'(g) = s + 2 s (1 - s) g c (1 + 3 k g^2),     s = sigma(2 z)

The backward pass recomputes a(g) from g (nothing but gate and up is saved) and also returns h, which the
fused-LoRA down projection needs for its own weight gradients, all in one element-wise pass.

Rounding versus the reference: HF's LlamaMLP computes `act_fn(gate)` in the input dtype (rounded to bf16)
and then multiplies in bf16 (rounded again). The kernel keeps a(g) in fp32 and rounds only h, so in bf16 a
value can differ from the reference by one ulp or two (the kernel's is the one within 1 ulp of the exact
value). torch's gelu_tanh evaluates 0.5 g (1 + tanh z), which cancels for z << 0 (g < -3): there the
reference loses relative precision and the kernel's g * sigma(2 z) does not. In fp32 the two agree to a few
ulp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import (
    ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, HAS_TRITON, next_power_of_2, tl, triton,
)

__all__ = [
    "swiglu_reference", "geglu_reference", "act_mul_forward", "act_mul_backward",
    "ActMulFunction", "swiglu", "geglu",
]

_SILU, _GELU_TANH = 0, 1
# Names accepted for `act` (HF's `hidden_act` values included, so callers can pass config.hidden_act).
_ACTS = {
    "silu": _SILU, "swish": _SILU, "swiglu": _SILU,
    "gelu_tanh": _GELU_TANH, "gelu_pytorch_tanh": _GELU_TANH, "geglu": _GELU_TANH, "gelu_new": _GELU_TANH,
}


def _act_code(act: str) -> int:
    try:
        return _ACTS[act]
    except KeyError:
        raise ValueError(f"act must be one of {sorted(_ACTS)} (exact-erf 'gelu' is not supported), got {act!r}")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


_REFERENCES = {_SILU: swiglu_reference, _GELU_TANH: geglu_reference}


# --------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
        """a(g) and, when NEED_GRAD, a'(g), all in fp32 (g is fp32)."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            if NEED_GRAD:
                da = s * (1.0 + g * (1.0 - s))
            else:
                da = a
        else:
            c = 0.7978845608028654  # sqrt(2 / pi)
            dz = c * (1.0 + 0.134145 * g * g)  # d(2z)/dg / 2, with 3k = 0.134145
            s = tl.sigmoid(2.0 * c * (g + 0.044715 * g * g * g))
            a = g * s
            if NEED_GRAD:
                da = s + 2.0 * s * (1.0 - s) * g * dz
            else:
                da = a
        return a, da

    @triton.jit
    def _act_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, g_stride, u_stride, h_stride,
                            ACT: tl.constexpr, BLOCK: tl.constexpr):
        # axis 0: row, axis 1: block of columns. Per-tensor row strides let gate/up be column slices of
        # one fused gate_up projection without a copy.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT, False)
        tl.store(h_ptr + row * h_stride + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, h_out, dg_out, du_out, n_cols,
                            dh_stride, g_stride, u_stride, h_stride, dg_stride, du_stride,
                            ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
        # Outputs may alias inputs (h -> dh, dgate -> gate, dup -> up): every element is read before it
        # is written, by the same program, so in-place use is safe.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dh = tl.load(dh_ptr + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT, True)
        if STORE_H:
            tl.store(h_out + row * h_stride + cols, (a * u).to(h_out.dtype.element_ty), mask=mask)
        tl.store(dg_out + row * dg_stride + cols, (dh * u * da).to(dg_out.dtype.element_ty), mask=mask)
        tl.store(du_out + row * du_stride + cols, (dh * a).to(du_out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launch helpers
# The kernels take a base pointer and a row stride per tensor, so no views are made: a contiguous tensor (the
# common case) costs one is_contiguous() call. Host overhead matters: these ops are launched once per layer.
def _rows(t: torch.Tensor):
    """(t, row stride) to address `t` as [numel / C, C] rows with unit column stride, or None."""
    if t.is_contiguous():
        return t, t.shape[-1]
    if t.stride(-1) != 1:
        return None
    try:
        return t, t.view(-1, t.shape[-1]).stride(0)  # leading dims collapse into evenly spaced rows
    except RuntimeError:
        return None


def _rows_in(t: torch.Tensor):
    r = _rows(t)
    return r if r is not None else (t.contiguous(), t.shape[-1])


def _rows_out(buf: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, n_rows: int):
    """Where to write a result: `buf` itself when it can hold it, else a new contiguous tensor."""
    if buf is not None and buf.dtype == dtype:
        r = _rows(buf)
        # rows must not overlap (an expanded gradient has row stride 0)
        if r is not None and (n_rows <= 1 or r[1] >= like.shape[-1]):
            return r
    return torch.empty(like.shape, dtype=dtype, device=like.device), like.shape[-1]


def _block(n_cols: int) -> int:
    return min(ELEMENTWISE_BLOCK, max(16, next_power_of_2(n_cols)))


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


# --------------------------------------------------------------------------------------------- public ops
def act_mul_forward(gate: torch.Tensor, up: torch.Tensor, act: str = "silu", backend: str = "auto") -> torch.Tensor:
    """h = act(gate) * up in gate's dtype, without autograd. gate/up may be strided row views."""
    code = _act_code(act)
    _check(gate, up)
    n = gate.numel()
    if not use_triton(gate, backend) or n == 0:
        return _REFERENCES[code](gate, up)
    (g, gs), (u, us) = _rows_in(gate), _rows_in(up)
    n_cols = gate.shape[-1]
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = _block(n_cols)
    _act_mul_fwd_kernel[(n // n_cols, triton.cdiv(n_cols, block))](
        g, u, h, n_cols, gs, us, n_cols, ACT=code, BLOCK=block, num_warps=ELEMENTWISE_WARPS)
    return h


def _backward(dh, gate, up, code, backend, inplace, need_h):
    _check(gate, up)
    if dh.shape != gate.shape:
        raise ValueError(f"dh must have gate's shape {tuple(gate.shape)}, got {tuple(dh.shape)}")
    n = gate.numel()
    if not use_triton(gate, backend) or n == 0:
        return _backward_torch(dh, gate, up, code, inplace, need_h)
    n_cols = gate.shape[-1]
    n_rows = n // n_cols
    (d, ds), (g, gs), (u, us) = _rows_in(dh), _rows_in(gate), _rows_in(up)
    h, hs = _rows_out(dh if inplace else None, gate, gate.dtype, n_rows) if need_h else (None, 0)
    dg, dgs = _rows_out(gate if inplace else None, gate, gate.dtype, n_rows)
    du, dus = _rows_out(up if inplace else None, up, up.dtype, n_rows)
    block = _block(n_cols)
    _act_mul_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
        d, g, u, h if need_h else dg, dg, du, n_cols,  # h's pointer is unused when STORE_H is False
        ds, gs, us, hs, dgs, dus,
        ACT=code, STORE_H=need_h, BLOCK=block, num_warps=ELEMENTWISE_WARPS)
    return h, dg, du


def _backward_torch(dh, gate, up, code, inplace, need_h):
    g, u, d = gate.float(), up.float(), dh.float()
    if code == _SILU:
        s = torch.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        c = 0.7978845608028654
        s = torch.sigmoid(2.0 * c * (g + 0.044715 * g ** 3))
        a = g * s
        da = s + 2.0 * s * (1.0 - s) * g * c * (1.0 + 0.134145 * g * g)
    # h exactly as the reference forward computed it (the model's own activation value)
    h = _REFERENCES[code](gate, up) if need_h else None
    dg = (d * u * da).to(gate.dtype)
    du = (d * a).to(up.dtype)
    if inplace:  # same contract as the Triton path: results land in dh / gate / up when they can
        h = dh.copy_(h) if need_h and dh.dtype == h.dtype else h
        dg = gate.copy_(dg)
        du = up.copy_(du)
    return h, dg, du


def act_mul_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str = "silu",
                     backend: str = "auto", inplace: bool = False):
    """One element-wise pass returning (h, dgate, dup) for h = act(gate) * up.

    h = act(gate) * up (recomputed; gate's dtype), dgate = dh * up * act'(gate), dup = dh * act(gate),
    each computed in fp32 and rounded once.

    inplace=False (default): three new tensors. inplace=True: h is written into dh's buffer, dgate into
    gate's and dup into up's (for callers that own those buffers, e.g. fused LoRA), so dh, gate and up are
    overwritten. A buffer is only reused when it can hold the result (same dtype, non-overlapping rows with
    unit column stride); otherwise a new tensor is returned for that result. Always use the returned tensors.
    """
    return _backward(dh, gate, up, _act_code(act), backend, inplace, need_h=True)


class ActMulFunction(torch.autograd.Function):
    """h = act(gate) * up. Saves gate and up only; the backward recomputes act(gate)."""

    @staticmethod
    def forward(ctx, gate, up, act="silu", backend="auto"):
        ctx.code = _act_code(act)
        ctx.act = act
        ctx.backend = backend
        ctx.save_for_backward(gate, up)
        return act_mul_forward(gate, up, act, backend)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        # not in place: gate and up belong to the autograd graph (and may be needed by a second backward)
        _, dg, du = _backward(dh, gate, up, ctx.code, ctx.backend, inplace=False, need_h=False)
        return dg, du, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, autograd-aware (Llama / Qwen2 / Mistral MLP)."""
    if not use_triton(gate, backend):
        return swiglu_reference(gate, up)
    return ActMulFunction.apply(gate, up, "silu", backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gelu_tanh(gate) * up, autograd-aware (Gemma MLP)."""
    if not use_triton(gate, backend):
        return geglu_reference(gate, up)
    return ActMulFunction.apply(gate, up, "gelu_tanh", backend)
