"""fp32 products of a bf16 activation with a small fp32 matrix, on bf16 tensor cores and without an fp32 copy.

Why: PEFT runs LoRA's rank-r products in fp32 (the adapters are fp32, and x is cast up to them). Done
literally on a GPU, every wide activation (x, the MLP's h, dY) is first copied to a new fp32 tensor and then
multiplied without tensor cores: on an H200 those casts and fp32 GEMMs took about a quarter of a llama3-8b
LoRA step (bench/NOTES.md, 2026-11-28).

How, without changing the math: the wide operand is already exact in bf16. The small fp32 operand S splits
exactly into three bf16 matrices, S = S1 + S2 + S3, each holding the next 8 significant bits (fp32 has 24).
Each bf16 x bf16 product is exact in fp32, so x S = x S1 + x S2 + x S3 up to the fp32 rounding of the sums,
the same kind of error as an fp32 GEMM's own accumulation. One GEMM with the three side by side ([K, 3n])
accumulates in fp32 and writes fp32 (torch.mm's out_dtype, CUDA); the three column blocks are then added,
smallest first. The reference is the literal recipe, `x.float() @ S` (`reference_mm`).

Only for bf16 activations: an fp16 one would need fp16 pieces, whose narrow exponent range loses the small
ones (the caller keeps the literal recipe then). On the CPU (tests) the same pieces are multiplied in fp32,
which gives the same exact products.

The split and the final sum each run as one small Triton kernel on CUDA (`_split3_kernel`, `_sum3_kernel`):
in PyTorch ops they were 6 and 2 launches of a few microseconds each, ~4,000 of each per llama3-8b step, about
90 ms of GPU time per step on an H200 (bench/NOTES.md). `split3_reference` / `sum3_reference` are the same
arithmetic in PyTorch (CPU, and the tests' reference).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, HAS_TRITON, tl, triton

__all__ = ["gpu_supported", "reference_mm", "split3", "split3_reference", "sum3", "sum3_reference",
           "wide_mm_fp32"]


def split3_reference(s: torch.Tensor) -> torch.Tensor:
    """fp32 `s` [K, n] as three bf16 pieces whose sum is `s`, side by side: [K, 3n] (largest first)."""
    s = s.float()
    hi = s.to(torch.bfloat16)
    rest = s - hi.float()  # exact: what rounding to 8 bits dropped
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo], dim=1)


def sum3_reference(out: torch.Tensor) -> torch.Tensor:
    """[M, 3n] fp32 -> [M, n]: the three column blocks added, smallest first."""
    n = out.shape[1] // 3
    return torch.add(out[:, 2 * n:], out[:, n:2 * n]).add_(out[:, :n])


if HAS_TRITON:
    @triton.jit
    def _split3_kernel(s_ptr, out_ptr, total, n, stride_k, stride_n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < total
        k = i // n
        j = i - k * n
        s = tl.load(s_ptr + k * stride_k + j * stride_n, mask=mask, other=0.0).to(tl.float32)
        hi = s.to(tl.bfloat16)
        rest = s - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        row = out_ptr + k * (3 * n) + j
        tl.store(row, hi, mask=mask)
        tl.store(row + n, mid, mask=mask)
        tl.store(row + 2 * n, lo, mask=mask)

    @triton.jit
    def _sum3_kernel(in_ptr, out_ptr, total, n, stride_m, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < total
        m = i // n
        j = i - m * n
        row = in_ptr + m * stride_m + j
        a = tl.load(row, mask=mask, other=0.0)
        b = tl.load(row + n, mask=mask, other=0.0)
        c = tl.load(row + 2 * n, mask=mask, other=0.0)
        tl.store(out_ptr + i, (c + b) + a, mask=mask)


def split3(s: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`split3_reference`, in one kernel on CUDA. `s` [K, n] fp32, any strides."""
    if s.dtype != torch.float32 or s.dim() != 2 or not use_triton(s, backend):
        return split3_reference(s)
    k, n = s.shape
    out = torch.empty(k, 3 * n, dtype=torch.bfloat16, device=s.device)
    total = k * n
    if total:
        _split3_kernel[(triton.cdiv(total, ELEMENTWISE_BLOCK),)](
            s, out, total, n, s.stride(0), s.stride(1), BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return out


def sum3(out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`sum3_reference`, in one kernel on CUDA. `out` [M, 3n] fp32 with unit column stride."""
    if out.dtype != torch.float32 or out.dim() != 2 or out.stride(1) != 1 or not use_triton(out, backend):
        return sum3_reference(out)
    m, n = out.shape[0], out.shape[1] // 3
    res = torch.empty(m, n, dtype=torch.float32, device=out.device)
    total = m * n
    if total:
        _sum3_kernel[(triton.cdiv(total, ELEMENTWISE_BLOCK),)](
            out, res, total, n, out.stride(0), BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return res


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU: the same exact bf16 x bf16 products, summed in fp32


def wide_mm_fp32(wide: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """`wide` [M, K] (bf16, any strides) times `small` [K, n] (fp32) in fp32 precision -> fp32 [M, n]."""
    return sum3(_mm_fp32_out(wide, split3(small)))  # [M, 3n]: x S1 | x S2 | x S3, then added


def reference_mm(wide: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """PEFT's literal recipe: cast the wide operand to fp32, then an fp32 GEMM."""
    return torch.mm(wide.float(), small.float())


@lru_cache(None)
def gpu_supported() -> bool:
    """Whether this torch has bf16 GEMMs with an fp32 output on the current CUDA device (torch.mm out_dtype)."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        out = torch.mm(a, a, out_dtype=torch.float32)
        return out.dtype == torch.float32 and float(out[0, 0]) == 16.0
    except (RuntimeError, TypeError, NotImplementedError):
        return False
