"""RMSNorm over the last dimension, with the two casting conventions found in HF models.

Forward, per row x of N elements (all arithmetic in fp32):

    r = 1 / sqrt(mean(x^2) + eps)          (saved per row, fp32: the only extra tensor kept for backward)
    y = x * r
    casting="llama" (Llama, Qwen2, Mistral):  out = (offset + w) * round_xdtype(y)
        the product is taken in promote(w.dtype, x.dtype) like HF's `self.weight * y.to(input_dtype)`:
        a bf16 model gives bf16, fp32 norm weights on bf16 activations give fp32.
    casting="gemma" (Gemma, offset=1):        out = round_xdtype(y * (offset + float(w)))

Backward, given g = dL/dout, with v = offset + w:

    dy  = g * v
    dx  = r * (dy - y * mean(dy * y))         (d r / d x_j = -r^3 x_j / N)
    dw  = sum over rows of g * round_xdtype(y)   (llama)  |  g * y   (gemma)

The rounding of y in the llama casting is treated as the identity in the backward, as autograd does.
dw is accumulated in fp32: each backward program handles a contiguous chunk of rows, keeps its partial sum
in registers, writes one row of a [programs, N] buffer, and the buffer is summed afterwards (no atomics).
When the weight is frozen (LoRA), the dw work is compiled out.

Exactness: the forward is the reference's sequence of fp32 operations and roundings. Only the mean of squares
(a tree sum here, another order in torch) and rsqrt's last bit may differ; rarely that flips the bf16
rounding of y by 1 ulp, and in the llama casting the product w * y can then land 2 ulp away. Measured on an
H200 at 4096 x 4096: bit-identical for all but a small fraction of elements (the tests bound it at 1%).
The backward differs from autograd of the reference only in rounding (autograd rounds g * w to the
activation dtype; the kernel keeps it in fp32).
"""
from __future__ import annotations

import functools

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, calculate_settings, tl, triton

__all__ = ["rms_norm_reference", "RMSNormFunction", "rms_norm"]

_CASTINGS = {"llama": 0, "gemma": 1}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       casting: str = "llama") -> torch.Tensor:
    """HF's RMSNorm math. casting="llama": LlamaRMSNorm / Qwen2RMSNorm; "gemma": GemmaRMSNorm (offset=1)."""
    _casting_code(casting)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (y * (offset + weight.float())).to(x.dtype)
    w = weight + offset if offset != 0.0 else weight
    return w * y.to(x.dtype)


def _casting_code(casting: str) -> int:
    try:
        return _CASTINGS[casting]
    except KeyError:
        raise ValueError(f"casting must be one of {sorted(_CASTINGS)}, got {casting!r}")


# --------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, n_cols, x_stride, out_stride, eps, offset,
                        CASTING: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, r)
        y = x * r
        if CASTING == 0:
            # llama: weight (+offset, rounded in the weight's dtype as torch would) times y rounded to
            # x's dtype; the product is rounded once to the output (promoted) dtype by the store.
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
            w = (w + offset).to(w_ptr.dtype.element_ty).to(tl.float32)
            out = w * y
        else:
            out = y * (offset + w)
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_bwd_kernel(dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                        n_rows, n_cols, dout_stride, x_stride, dx_stride, offset, rows_per_program,
                        CASTING: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if CASTING == 0:
            v = (w + offset).to(w_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = w + offset
        dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        # walk the chunk by advancing pointers from an int64 base (no int32 row * stride overflow)
        start64 = row_start.to(tl.int64)
        g_ptrs = dout_ptr + start64 * dout_stride + cols
        x_ptrs = x_ptr + start64 * x_stride + cols
        dx_ptrs = dx_ptr + start64 * dx_stride + cols
        r_ptr = rstd_ptr + start64
        for _ in range(row_start, row_end):
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(r_ptr)
            y = x * r
            dy = g * v
            dx = r * (dy - y * (tl.sum(dy * y, axis=0) / n_cols))
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                if CASTING == 0:
                    dw_acc += g * y.to(x_ptr.dtype.element_ty).to(tl.float32)
                else:
                    dw_acc += g * y
            g_ptrs += dout_stride
            x_ptrs += x_stride
            dx_ptrs += dx_stride
            r_ptr += 1
        if HAS_DW:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------------------------- launch helpers
@functools.lru_cache(None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dw_programs(x: torch.Tensor, n_rows: int, n_cols: int) -> int:
    """Backward grid when dw is needed. Each program walks a chunk of rows (one row in flight at a time) and
    writes one fp32 partial row of dw: narrow rows need many programs per SM to keep enough bytes in flight,
    wide rows need few so the [programs, N] partial buffer and its final sum stay cheap. Measured on an H200
    (132 SMs, 4096-16384 tokens): 8/SM best up to N=2048, 2/SM at 4096, 1/SM at 8192."""
    if not x.is_cuda:
        return max(1, min(n_rows, 4))  # interpreter: a few programs, so the chunking and partials are exercised
    per_sm = 8 if n_cols <= 2048 else 2 if n_cols <= 4096 else 1
    return max(1, min(n_rows, per_sm * _sm_count(x.get_device())))


def _rows(t: torch.Tensor):
    """(t, row stride) addressing `t` as [numel / N, N] rows with unit column stride (copies only when the
    leading dims don't collapse into evenly spaced rows). No views: each host-side call costs time."""
    if t.is_contiguous():
        return t, t.shape[-1]
    if t.stride(-1) == 1:
        try:
            return t, t.view(-1, t.shape[-1]).stride(0)
        except RuntimeError:
            pass
    return t.contiguous(), t.shape[-1]


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, code: int) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype) if code == 0 else x.dtype


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm. Saves x, weight and the per-row inverse RMS (fp32) - never the normalised output."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset=0.0, casting="llama"):
        code = _casting_code(casting)
        n_cols = x.shape[-1]
        if weight.dim() != 1 or weight.shape[0] != n_cols:
            raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
        x_arg, x_stride = _rows(x)
        w = weight if weight.is_contiguous() else weight.contiguous()
        n_rows = x.numel() // n_cols if n_cols else 0
        out = torch.empty(x.shape, dtype=_out_dtype(x, weight, code), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = calculate_settings(n_cols)
        if n_rows > 0:
            _rms_fwd_kernel[(n_rows,)](x_arg, w, out, rstd, n_cols, x_stride, n_cols, float(eps), float(offset),
                                       CASTING=code, BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.code, ctx.offset, ctx.block, ctx.num_warps = code, float(offset), block, num_warps
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None, None
        n_cols = x.shape[-1]
        n_rows = rstd.shape[0]
        (x_arg, x_stride), (g_arg, g_stride) = _rows(x), _rows(dout)
        w = weight if weight.is_contiguous() else weight.contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        # frozen weight: one row per program (most parallelism), no partial buffer
        programs = _dw_programs(x, n_rows, n_cols) if need_dw else max(1, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
        programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 1
        dw_partial = (torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if need_dw
                      else rstd)  # placeholder pointer, never written when HAS_DW is False
        if n_rows > 0:
            _rms_bwd_kernel[(programs,)](
                g_arg, x_arg, w, rstd, dx, dw_partial, n_rows, n_cols,
                g_stride, x_stride, n_cols, ctx.offset, rows_per_program,
                CASTING=ctx.code, HAS_DW=need_dw, BLOCK=ctx.block, num_warps=ctx.num_warps)
        dw = None
        if need_dw:
            dw = (dw_partial.sum(0) if n_rows > 0 else torch.zeros(n_cols, device=x.device)).to(weight.dtype)
        return (dx if need_dx else None), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting: str = "llama",
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm of the last dimension of `x` (any leading shape). See the module docstring for the math."""
    if not use_triton(x, backend):
        return rms_norm_reference(x, weight, eps, offset, casting)
    return RMSNormFunction.apply(x, weight, eps, offset, casting)
