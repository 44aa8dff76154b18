"""LoRA's rank-r products in fp32 straight from 16-bit activations: PEFT's numerics without fp32 copies.

PEFT keeps the adapters in fp32 under a bf16 model and casts x to fp32 before x A^T. Done literally (as
lora_parts' torch path does), every rank-r product first writes an fp32 copy of a wide activation (x, the
MLP's h, or the wide output gradient dY) and then runs an fp32 GEMM over it. Profiled on an H200
(bench/NOTES.md), those casts and fp32 GEMMs were a third of a Qwen2-1.5B LoRA step's GPU time.

The two shapes involved, with a wide 16-bit (or fp32) operand and a thin fp32 one (r <= 64):

    skinny_mm_t(x, A)  = x A^T      x [N, K], A [R, K]  ->  [N, R] fp32   (x A^T forward; u = dY B with A = B^T)
    skinny_tn(Y, Z)    = Y^T Z      Y [N, M], Z [N, R]  ->  [M, R] fp32   (dB = dY^T xa; dA^T = x^T u)

Each kernel reads the wide operand once in its own dtype and upcasts it in registers (bf16 / fp16 -> fp32
is exact), multiplies in fp32 (`tl.dot(..., input_precision="ieee")`: no TF32) and accumulates in fp32. So
the result is the fp32 product PEFT computes, up to the order of the fp32 summation (~1e-7 relative), with
no fp32 copy in memory. Tests compare with the plain-PyTorch references below on awkward shapes under
TRITON_INTERPRET=1 (tests/kernels/test_skinny_fp32.py) and on the GPU (tests/gpu).

skinny_tn reduces over the long N axis; with few output row blocks (M = 1536 at Qwen2-1.5B's hidden size
gives 24 blocks of 64) it would leave most SMs idle, so N is split over SPLIT programs per block, each
writing a partial [M, R] sum, and the partials are added in a fixed order (deterministic).
"""
from __future__ import annotations

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, next_power_of_2, tl, triton

MAX_RANK = 64
_BLOCK_N, _BLOCK_K = 64, 64     # skinny_mm_t: rows of x per program, columns per step
_TN_BLOCK_M, _TN_BLOCK_N = 64, 64
_TARGET_PROGRAMS = 264          # ~2 waves on a 132-SM H100 / H200


# --------------------------------------------------------------------------------------------- references
def skinny_mm_t_reference(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.mm(x.float(), a.float().t())


def skinny_tn_reference(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.mm(y.float().t(), z.float())


# --------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _mm_t_kernel(x_ptr, a_ptr, out_ptr, N, K, R, sxn, sxk, sar, sak, son, sor,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a wide operand may pass 2^31 elements
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rows[:, None] * sxn + ks[None, :] * sxk,
                         mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0).to(tl.float32)
            at = tl.load(a_ptr + rr[None, :] * sar + ks[:, None] * sak,
                         mask=(rr[None, :] < R) & (ks[:, None] < K), other=0.0).to(tl.float32)  # [BK, BR]
            acc += tl.dot(xt, at, input_precision="ieee")
        tl.store(out_ptr + rows[:, None] * son + rr[None, :] * sor, acc,
                 mask=(rows[:, None] < N) & (rr[None, :] < R))

    @triton.jit
    def _tn_kernel(y_ptr, z_ptr, part_ptr, N, M, R, rows_per_split, sy_n, sy_m, sz_n, sz_r, sp_s, sp_m, sp_r,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1).to(tl.int64)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_start = split * rows_per_split
        for n0 in range(n_start, n_start + rows_per_split, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = (ns < N) & (ns < n_start + rows_per_split)
            yt = tl.load(y_ptr + ns[None, :] * sy_n + ms[:, None] * sy_m,
                         mask=n_ok[None, :] & (ms[:, None] < M), other=0.0).to(tl.float32)  # [BM, BN] = Y^T tile
            zt = tl.load(z_ptr + ns[:, None] * sz_n + rr[None, :] * sz_r,
                         mask=n_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)  # [BN, BR]
            acc += tl.dot(yt, zt, input_precision="ieee")
        tl.store(part_ptr + split * sp_s + ms[:, None] * sp_m + rr[None, :] * sp_r, acc,
                 mask=(ms[:, None] < M) & (rr[None, :] < R))


def _block_r(r: int) -> int:
    return max(16, next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _checked_rank(wide: torch.Tensor, thin: torch.Tensor, rank_axis: int, wide_axis: int, mismatch: str) -> int:
    """The rank (thin's size along `rank_axis`) once both operands pass: 2-D, thin in fp32, rank in 1..MAX_RANK,
    and thin's other axis as long as wide's `wide_axis` (else ValueError: `mismatch` with the two lengths)."""
    if wide.dim() != 2 or thin.dim() != 2:
        raise ValueError("skinny fp32 products take 2-D operands")
    if thin.dtype != torch.float32:
        raise ValueError(f"the thin operand must be fp32 (the adapters' dtype), got {thin.dtype}")
    rank = thin.shape[rank_axis]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank {rank} outside 1..{MAX_RANK}")
    if thin.shape[1 - rank_axis] != wide.shape[wide_axis]:
        raise ValueError(mismatch.format(wide.shape[wide_axis], thin.shape[1 - rank_axis]))
    return rank


def skinny_mm_t(x: torch.Tensor, a: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x A^T in fp32: x [N, K] (any float dtype, any strides), A [R, K] fp32 (any strides) -> [N, R] fp32."""
    r = _checked_rank(x, a, 0, 1, "x has {} columns but A has {}")
    if not use_triton(x, backend):
        return skinny_mm_t_reference(x, a)
    n, k = x.shape
    out = torch.empty(n, r, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, _BLOCK_N),)
    _mm_t_kernel[grid](x, a, out, n, k, r, x.stride(0), x.stride(1), a.stride(0), a.stride(1),
                       out.stride(0), out.stride(1), BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_R=_block_r(r),
                       num_warps=4)
    return out


def skinny_tn(y: torch.Tensor, z: torch.Tensor, backend: str = "auto", split: int | None = None) -> torch.Tensor:
    """Y^T Z in fp32: Y [N, M] (any float dtype, any strides), Z [N, R] fp32 -> [M, R] fp32."""
    r = _checked_rank(y, z, 1, 0, "Y has {} rows but Z has {}")
    if not use_triton(y, backend):
        return skinny_tn_reference(y, z)
    n, m = y.shape
    m_blocks = triton.cdiv(m, _TN_BLOCK_M)
    if split is None:
        split = max(1, min(triton.cdiv(n, 4 * _TN_BLOCK_N), triton.cdiv(_TARGET_PROGRAMS, m_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(max(n, 1), split), _TN_BLOCK_N) * _TN_BLOCK_N
    split = max(1, triton.cdiv(max(n, 1), rows_per_split))
    part = torch.empty(split, m, r, dtype=torch.float32, device=y.device)
    _tn_kernel[(m_blocks, split)](y, z, part, n, m, r, rows_per_split, y.stride(0), y.stride(1), z.stride(0),
                                  z.stride(1), part.stride(0), part.stride(1), part.stride(2),
                                  BLOCK_M=_TN_BLOCK_M, BLOCK_N=_TN_BLOCK_N, BLOCK_R=_block_r(r), num_warps=4)
    return part[0] if split == 1 else part.sum(0)
