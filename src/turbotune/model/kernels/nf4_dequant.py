"""NF4 dequantisation: bitsandbytes' packed 4-bit weight -> a dense bf16 / fp16 / fp32 tensor, bit-identical to
`bitsandbytes.functional.dequantize_4bit`.

Storage (bitsandbytes' `quantize_4bit(..., quant_type="nf4")`), for a weight of n = numel elements:

    packed   uint8 [(n + 1) // 2]    two 4-bit codes per byte: element 2i in the HIGH nibble (byte >> 4),
                                     element 2i + 1 in the LOW nibble (byte & 15); for odd n the last low
                                     nibble is padding
    absmax   fp32  [ceil(n / bs)]    one scale per block of bs consecutive elements of the flattened weight
                                     (bs = blocksize; the last block may be partial)
    code     the 16 NF4 values (turbotune.model.quant.NF4_CODE)

    w[e] = code[q[e]] * absmax[e // bs]                     (one fp32 multiply, then one rounding to the output
                                                             dtype, round-to-nearest-even)

With double quantisation (bnb_4bit_use_double_quant / compress_statistics=True) absmax itself is stored as
uint8 codes of bitsandbytes' 8-bit blockwise format, with its own fp32 scales per block of bs2 (256) scales,
its own 256-entry code table, and the mean `offset` that was subtracted before quantising:

    absmax[b] = (code2[absmax_u8[b]] * absmax2[b // bs2]) + offset

evaluated exactly as bitsandbytes does it: the product rounded to fp32 (dequantize_blockwise's output), then the
fp32 add (`absmax += offset`) -- two roundings, never one fused multiply-add. The Triton kernel is therefore
launched with `enable_fp_fusion=False` (no FMA contraction in LLVM, and `--fmad=false` for ptxas).

fp32 -> bf16 rounding is done with integer ops in the kernel (add 0x7FFF + the kept LSB, drop 16 bits) rather
than `.to(tl.bfloat16)`: it is exactly round-to-nearest-even, the same as CUDA's __float2bfloat16 (used by
bitsandbytes' kernel) and torch's `.to(torch.bfloat16)`, and Triton's CPU interpreter (whose bf16 cast
truncates) then computes the same bits as the compiled kernel. fp16 uses the native conversion (RTNE on the GPU
and in numpy). Every value is a finite product of a table entry and a finite scale, so no NaN handling is needed
beyond keeping NaN a NaN.

Kernel layout: one program owns ROWS consecutive quantisation blocks (a [ROWS, bs/2] tile of packed bytes,
~1 KiB), loads each block's scale once, looks the two nibbles up in the 16-entry table (64 bytes, one L1 line,
so a warp's gather is a single wavefront), interleaves high/low into [ROWS, bs] and stores it contiguously
(16-byte vector stores in bf16). Bytes are read once and the output written once: the kernel moves 2.5 bytes
per bf16 element, which is all a dequantisation can move.

Tuning knobs of `dequantize_nf4_triton` (all variants give the same bits; bench/nf4_dequant.py times them):
bytes_per_program (tile size), num_warps, and pair_table: instead of two 16-entry gathers per byte, ONE 8-byte
gather from a 256-entry table of (code[b >> 4], code[b & 15]) pairs (2 KiB, built once per code tensor), split
into its two fp32 halves; the multiply and the rounding are unchanged.

`dequantize_nf4_reference` is the plain-PyTorch equivalent (the CPU path of `backend="auto"`).
"""
from __future__ import annotations

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, tl, triton

__all__ = ["dequantize_nf4_reference", "dequantize_nf4_triton", "dequantize_nf4_into", "OUT_DTYPES"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Defaults of the tuning knobs, the timed best of bench/nf4_dequant.py on an H200 (2026-11-28, llama3-8b's seven
# projection shapes): 2 KiB of packed bytes per program (4096 outputs), 4 warps, codes looked up two at a time from
# the 256-entry pair table. 211 us per llama layer against 242 us for the earlier 1 KiB / single-code default and
# 370 us for bitsandbytes (bench/results/nf4_dequant-8318d9e.txt).
_BYTES_PER_PROGRAM = 2048
_NUM_WARPS = 4
_PAIR_TABLE = True

# (code.data_ptr(), device, dtype) -> (code, int64 [256] pair table). Holding `code` pins its address, so a key
# cannot be reused by another tensor; code tables are constants (quant.nf4_code: one per device).
_PAIR_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _check_args(packed, absmax, blocksize, numel, out, absmax2, code2, blocksize2, offset):
    if out.dtype not in OUT_DTYPES:
        raise ValueError(f"NF4 dequantisation writes bf16 / fp16 / fp32, not {out.dtype}")
    if out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {numel} elements, got shape {tuple(out.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() < (numel + 1) // 2:
        raise ValueError("packed must be a 1-D uint8 tensor of at least (numel + 1) // 2 bytes")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    n_blocks = -(-numel // blocksize)
    if absmax.numel() < n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n_blocks} blocks need one each")
    nested = absmax2 is not None
    if nested:
        if absmax.dtype != torch.uint8 or code2 is None or blocksize2 is None or offset is None:
            raise ValueError("double quantisation needs uint8 absmax codes, absmax2, code2, blocksize2 and offset")
        if absmax2.numel() < -(-n_blocks // blocksize2):
            raise ValueError("absmax2 has too few entries for the number of blocks")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"plain absmax must be fp32, got {absmax.dtype}")
    for t in (packed, absmax, absmax2, code2, offset):
        if t is not None and t.device != out.device:
            raise ValueError(f"all tensors must be on {out.device}; one is on {t.device}")
    return n_blocks, nested


# --------------------------------------------------------------------------------------------- reference
def _scales_reference(absmax, n_blocks, absmax2=None, code2=None, blocksize2=None, offset=None):
    """fp32 [n_blocks] per-block scales (double-quantised ones decoded the way bitsandbytes decodes them)."""
    if absmax2 is None:
        return absmax.reshape(-1)[:n_blocks]
    q = absmax.reshape(-1)[:n_blocks].long()
    b2 = torch.arange(n_blocks, device=absmax.device) // blocksize2
    prod = code2.reshape(-1)[q] * absmax2.reshape(-1)[b2]  # fp32 product, rounded (dequantize_blockwise)
    return prod + offset.reshape(-1)[:1]                       # then the fp32 add (absmax += offset)


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             shape, dtype: torch.dtype, *, absmax2: torch.Tensor | None = None,
                             code2: torch.Tensor | None = None, blocksize2: int | None = None,
                             offset: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch NF4 dequantisation, bit-identical to bitsandbytes' `dequantize_4bit` (see module docstring).

    packed: uint8 [(n+1)//2]; absmax: fp32 [n_blocks] (or uint8 codes with absmax2/code2/blocksize2/offset for
    double quantisation); code: the 16 fp32 NF4 values. Writes into `out` when given (fp32 values computed in a
    temporary, then rounded once by copy_), else returns a new tensor of `shape` in `dtype`.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_blocks, _ = _check_args(packed, absmax, blocksize, numel, out, absmax2, code2, blocksize2, offset)
    scales = _scales_reference(absmax, n_blocks, absmax2, code2, blocksize2, offset)
    n_bytes = (numel + 1) // 2
    b = packed[:n_bytes].int()
    vals = torch.empty(n_bytes, 2, dtype=torch.float32, device=packed.device)
    code = code.reshape(-1)
    vals[:, 0] = code[b >> 4]                                    # element 2i: high nibble
    vals[:, 1] = code[b & 15]                                    # element 2i + 1: low nibble
    del b
    vals = vals.view(-1)[:numel]
    full = numel // blocksize
    if full:                                                     # fp32 products, in place
        vals[: full * blocksize].view(full, blocksize).mul_(scales[:full].view(-1, 1))
    if full < n_blocks:                                          # the partial last block
        vals[full * blocksize:].mul_(scales[full])
    out.view(-1).copy_(vals)                                     # one RNE rounding to out's dtype
    return out


# --------------------------------------------------------------------------------------------- Triton
def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry b holds fp32 code[b >> 4] in its low 32 bits and code[b & 15] in its high 32 bits."""
    key = (code.data_ptr(), code.device, code.dtype)
    hit = _PAIR_TABLES.get(key)
    if hit is not None:
        return hit[1]
    b = torch.arange(256, device=code.device)
    c = code.reshape(-1).float()
    table = torch.stack((c[b >> 4], c[b & 15]), 1).contiguous().view(torch.int64).reshape(-1)  # little-endian
    # Built during CUDA-graph capture its values exist only on replay: use it, but do not keep it.
    if not (code.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_PAIR_TABLES) >= 16:  # callers passing fresh code tensors each time: stay small
            _PAIR_TABLES.clear()
        _PAIR_TABLES[key] = (code, table)
    return table


if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                            n_bytes, numel, n_blocks,
                            HALF_BS: tl.constexpr, ROWS: tl.constexpr, BS2: tl.constexpr,
                            NESTED: tl.constexpr, OUT_KIND: tl.constexpr, PAIR: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)        # quantisation-block indices
        row_ok = rows < n_blocks
        if NESTED:
            q2 = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q2) * tl.load(absmax2_ptr + rows // BS2, mask=row_ok, other=0.0)
            scale = scale + tl.load(offset_ptr)                     # two roundings: launched without FP fusion
        else:
            scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
        byte = rows[:, None] * HALF_BS + tl.arange(0, HALF_BS)[None, :]
        b = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
        if PAIR:  # code_ptr is the int64 pair table: one gather per byte, then its two fp32 halves
            pair = tl.load(code_ptr + b)
            hi = pair.to(tl.uint32).to(tl.float32, bitcast=True) * scale[:, None]
            lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale[:, None]
        else:
            hi = tl.load(code_ptr + (b >> 4)) * scale[:, None]      # element 2i: high nibble
            lo = tl.load(code_ptr + (b & 15)) * scale[:, None]      # element 2i + 1: low nibble
        vals = tl.interleave(hi, lo)                                # [ROWS, 2 * HALF_BS], element order
        idx = rows[:, None] * (2 * HALF_BS) + tl.arange(0, 2 * HALF_BS)[None, :]
        if OUT_KIND == 0:    # bf16, round-to-nearest-even with integer ops (exact; see module docstring)
            bits = vals.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(vals != vals, 0x7FC0, rounded)       # NaN stays (quiet) NaN
            res = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif OUT_KIND == 1:  # fp16 (RTNE)
            res = vals.to(tl.float16)
        else:
            res = vals
        tl.store(out_ptr + idx, res, mask=idx < numel)


_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          out: torch.Tensor, *, absmax2: torch.Tensor | None = None,
                          code2: torch.Tensor | None = None, blocksize2: int | None = None,
                          offset: torch.Tensor | None = None, bytes_per_program: int = _BYTES_PER_PROGRAM,
                          num_warps: int = _NUM_WARPS, pair_table: bool = _PAIR_TABLE) -> torch.Tensor:
    """The Triton kernel: dequantise into `out` (contiguous, bf16 / fp16 / fp32; its numel is the weight's).

    Tuning knobs (same bits whatever they are): bytes_per_program, a power of two (at least one whole
    quantisation block per program); num_warps; pair_table, one gather per byte from a 256-entry pair table.
    """
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if bytes_per_program < 1 or bytes_per_program & (bytes_per_program - 1):
        raise ValueError(f"bytes_per_program must be a power of two, got {bytes_per_program}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    numel = out.numel()
    n_blocks, nested = _check_args(packed, absmax, blocksize, numel, out, absmax2, code2, blocksize2, offset)
    if numel == 0:
        return out
    half = blocksize // 2
    rows = max(1, bytes_per_program // half)
    grid = (triton.cdiv(n_blocks, rows),)
    if nested:
        extra = (absmax2, code2, offset)
    else:  # unused pointers (NESTED=False never reads them)
        extra = (absmax, absmax, absmax)
    _nf4_dequant_kernel[grid](
        packed, absmax, _pair_table(code) if pair_table else code, *extra, out,
        (numel + 1) // 2, numel, n_blocks,
        HALF_BS=half, ROWS=rows, BS2=int(blocksize2) if nested else 1, NESTED=nested,
        OUT_KIND=_OUT_KIND[out.dtype], PAIR=bool(pair_table), num_warps=num_warps,
        enable_fp_fusion=False,  # absmax = code2 * absmax2 + offset must round twice, as bitsandbytes does
    )
    return out


def dequantize_nf4_into(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        out: torch.Tensor, *, absmax2: torch.Tensor | None = None,
                        code2: torch.Tensor | None = None, blocksize2: int | None = None,
                        offset: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantise into `out` with the Triton kernel or the reference (`use_triton(out, backend)`)."""
    kw = dict(absmax2=absmax2, code2=code2, blocksize2=blocksize2, offset=offset)
    if use_triton(out, backend):
        return dequantize_nf4_triton(packed, absmax, code, blocksize, out, **kw)
    return dequantize_nf4_reference(packed, absmax, code, blocksize, out.shape, out.dtype, out=out, **kw)
