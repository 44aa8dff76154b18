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
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["gpu_supported", "reference_mm", "split3", "wide_mm_fp32"]


def split3(s: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 `s` as three bf16 tensors whose sum is `s`, concatenated along `dim` (largest part first)."""
    s = s.float()
    hi = s.to(torch.bfloat16)
    rest = s - hi.float()  # exact: what rounding to 8 bits dropped
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo], dim=dim)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU: the same exact bf16 x bf16 products, summed in fp32


def wide_mm_fp32(wide: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """`wide` [M, K] (bf16, any strides) times `small` [K, n] (fp32) in fp32 precision -> fp32 [M, n]."""
    n = small.shape[1]
    out = _mm_fp32_out(wide, split3(small, dim=1))  # [M, 3n]: x S1 | x S2 | x S3
    return torch.add(out[:, 2 * n:], out[:, n:2 * n]).add_(out[:, :n])


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
