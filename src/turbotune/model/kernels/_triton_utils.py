"""Shared launch settings for turbotune's Triton kernels.

Triton is optional: when it cannot be imported, `HAS_TRITON` is False, kernel modules skip defining their
`@triton.jit` functions, and every op falls back to its PyTorch reference (see `_dispatch.use_triton`).
"""
from __future__ import annotations

try:  # triton is an optional dependency
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

# Largest row a "one program owns a whole row" kernel keeps in registers (64 KiB of bf16 / 128 KiB fp32
# across the warps). Hidden sizes of every supported model (<= 16384) are far below it.
MAX_FUSED_SIZE = 65536

# Element-wise kernels: 1024 elements and 4 warps per program = 8 elements per thread, i.e. one 16-byte
# vector load per thread and tensor in bf16 (two in fp32). Measured ~4.1 TB/s (about 85% of HBM peak) on an
# H200 for SwiGLU at 4096 x 11008; larger blocks only shrink a grid already in the tens of thousands.
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def calculate_settings(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel in which one program handles one row of `n` elements.

    BLOCK_SIZE is the next power of two >= n (the tail is masked). Warps grow with the row so each thread
    holds 16 elements of each row-sized register tile (two 16-byte bf16 vectors) without spilling:
    4 warps up to 2048, 8 at 4096, 16 at 8192, 32 (the maximum) from 16384; wider rows hold more per thread.
    """
    block = next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(f"row of {n} elements exceeds the fused-row limit {MAX_FUSED_SIZE}")
    if block >= 16384:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 4096:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps

