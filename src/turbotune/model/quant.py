"""NF4 (QLoRA) storage: reading bitsandbytes' 4-bit weights and dequantising them into reused buffers.

bitsandbytes keeps a 4-bit weight as a `Params4bit` (packed uint8 data, two NF4 codes per byte) plus a
`QuantState` (blocksize, per-block absmax, shape, dtype and, with double quantisation, `state2` + `offset`).
`nf4_storage` reads those into an `NF4Storage` of plain tensors; `dequantize_nf4` is the one entry point that
turns them back into a dense [out, in] weight, bit-identical to `bitsandbytes.functional.dequantize_4bit`
(the Triton kernel in `turbotune.model.kernels.nf4_dequant` on CUDA, its PyTorch reference elsewhere).

Buffer reuse and its aliasing contract
--------------------------------------
Without `out=`, `dequantize_nf4` writes into ONE buffer per (shape, dtype, device), allocated on first use and
kept for the life of the process (or until `clear_dequant_buffers()`). Every layer of that shape shares it, so
no layer ever keeps a dequantised weight around, and the allocator never has to find (and fragment memory for)
a fresh [out, in] block on each forward and backward. The price is an alias: **the tensor returned is
overwritten by the next `dequantize_nf4` call with the same shape, dtype and device. Callers must be finished
with it (on CUDA: must have queued every kernel that reads it, on the same stream) before calling again, and
must never save it, return it, or let autograd save it.** Pass `out=` (or `.clone()` the result) to keep one.
Two weights of the same shape alive at once need two buffers: use `out=`, or a different `slot`
(`dequantize_nf4(..., slot="up")`), which keys a separate buffer.

On CUDA, the next dequantisation is queued on the same stream after the kernels that read the previous result,
so stream order makes the overwrite safe as soon as the reading kernels are *queued*; nothing waits on the host.
Memory: the buffers together hold one dense copy per distinct weight shape (for a Llama-3-8B-style model in
bf16: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336 -> about 0.3 GiB), instead of the
caching allocator's transient blocks of the same sizes.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

# Why FSDP2 cannot shard this storage: training/fsdp.py refuses it and the planner (planner/parallel.py) says so.
NF4_NOT_SHARDABLE = (
    "FSDP2 shards a parameter as rows of its tensor, and a bitsandbytes 4-bit weight is packed bytes that only mean "
    "something with its quant_state (the per-block scales, the original shape and dtype), which fully_shard neither "
    "splits nor gathers: the gathered weight would be bytes without scales")

import torch

from turbotune.model.kernels.nf4_dequant import OUT_DTYPES, dequantize_nf4_into

__all__ = ["NF4_CODE", "nf4_code", "NF4Storage", "nf4_storage", "dequantize_nf4", "dequant_buffer",
           "existing_dequant_buffer", "clear_dequant_buffers", "dequant_buffers_nbytes"]

# The 16 NF4 values (QLoRA's normal-float quantiles, as bitsandbytes hard-codes them; each is an exact fp32
# number, so a fp32 tensor of them equals bitsandbytes' table and the constants in its CUDA kernel).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_code(device) -> torch.Tensor:
    """The NF4 table as a fp32 [16] tensor on `device` (one per device, cached)."""
    device = torch.device(device)
    t = _CODE_CACHE.get(device)
    if t is None:
        t = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
        _CODE_CACHE[device] = t
    return t


# --------------------------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class NF4Storage:
    """A bitsandbytes NF4 weight as plain tensors (all on one device).

    packed     uint8 [(numel+1)//2]: element 2i in the high nibble, 2i+1 in the low nibble
    absmax     fp32 [n_blocks] scales, or (double quantisation) uint8 [n_blocks] codes decoded as
               absmax = code2[absmax] * absmax2[block // blocksize2] + offset
    blocksize  elements per absmax block (of the flattened weight)
    shape      the dense weight's shape ([out, in])
    dtype      quant_state.dtype: what bitsandbytes dequantises to by default
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int | None = None
    offset: torch.Tensor | None = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The underlying tensor of a Parameter subclass (Params4bit), so ops skip its __torch_function__."""
    return t.data if isinstance(t, torch.nn.Parameter) else t


# Reading a QuantState costs ~25 us of Python (a dozen small tensor ops); a training step dequantises every
# 4-bit weight twice, so the result is cached per QuantState object and reused while the packed data and absmax
# are still the same tensors (same data_ptr) and the flags are unchanged. QuantState defines __eq__ without
# __hash__, so the cache is keyed by id() and holds only a weak reference to it (the entry goes with it).
_STORAGE_CACHE: dict[int, tuple] = {}


def nf4_storage(weight, quant_state=None) -> NF4Storage:
    """Read a bitsandbytes NF4 weight: a `Params4bit` (its own `quant_state`), or its packed data plus the
    `QuantState`. Raises ValueError for anything that is not NF4 in bitsandbytes' standard layout."""
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("no quant_state: pass a bitsandbytes Params4bit or the packed weight and its QuantState")
    qs = quant_state
    key = (weight.data_ptr(), weight.device, qs.absmax.data_ptr(), qs.quant_type,
           getattr(qs, "packing_format_for_cpu", False), qs.nested)
    hit = _STORAGE_CACHE.get(id(qs))
    if hit is not None and hit[0]() is qs and hit[1] == key:
        return hit[2]
    st = _read_storage(weight, qs)
    try:
        ref = weakref.ref(qs, lambda _r, i=id(qs): _STORAGE_CACHE.pop(i, None))
    except TypeError:  # not weak-referenceable: no caching
        return st
    _STORAGE_CACHE[id(qs)] = (ref, key, st)
    return st


def _read_storage(weight, qs) -> NF4Storage:
    if qs.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type 'nf4', this weight is {qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("this 4-bit weight was repacked by bitsandbytes for CPU inference (packing_format_for_cpu);"
                         " its layout is not bitsandbytes' standard NF4 packing")
    packed = _plain(weight)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP): same bytes
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1)
    shape = torch.Size(qs.shape)
    blocksize = int(qs.blocksize)
    dev = packed.device
    if qs.nested:
        s2 = qs.state2
        if getattr(s2, "nested", False):
            raise ValueError("a doubly nested quant_state (state2 itself nested) is not supported")
        offset = qs.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=dev)
        elif offset.dtype != torch.float32 or offset.device != dev:
            offset = offset.to(device=dev, dtype=torch.float32)
        absmax2 = s2.absmax if s2.absmax.dtype == torch.float32 else s2.absmax.float()
        code2 = s2.code if s2.code.dtype == torch.float32 else s2.code.float()
        if code2.device != dev:
            code2 = code2.to(dev)  # bitsandbytes does the same (quant_state.code.to(A.device))
        return NF4Storage(packed, qs.absmax.reshape(-1), blocksize, shape, qs.dtype,
                          absmax2.reshape(-1), code2.reshape(-1), int(s2.blocksize), offset.reshape(1))
    absmax = qs.absmax if qs.absmax.dtype == torch.float32 else qs.absmax.float()  # as bitsandbytes does
    return NF4Storage(packed, absmax.reshape(-1), blocksize, shape, qs.dtype)


# --------------------------------------------------------------------------------------------- buffers
_BUFFERS: dict[tuple, torch.Tensor] = {}
_LOCK = threading.Lock()


def _buffer_key(shape, dtype: torch.dtype, device, slot) -> tuple:
    return (tuple(shape), dtype, torch.device(device), slot)


def dequant_buffer(shape, dtype: torch.dtype, device, slot=None) -> torch.Tensor:
    """The shared output buffer for (shape, dtype, device[, slot]), allocated once (see the aliasing contract in
    the module docstring)."""
    key = _buffer_key(shape, dtype, device, slot)
    buf = _BUFFERS.get(key)
    if buf is None:
        with _LOCK:
            buf = _BUFFERS.get(key)
            if buf is None:
                buf = torch.empty(key[0], dtype=dtype, device=key[2])
                _BUFFERS[key] = buf
    return buf


def existing_dequant_buffer(shape, dtype: torch.dtype, device, slot=None) -> torch.Tensor | None:
    """The buffer dequant_buffer would return, if it was allocated already (never allocates)."""
    return _BUFFERS.get(_buffer_key(shape, dtype, device, slot))


def clear_dequant_buffers() -> None:
    """Drop every shared dequantisation buffer (e.g. before inference or export, to give the memory back)."""
    with _LOCK:
        _BUFFERS.clear()


def dequant_buffers_nbytes(device=None) -> int:
    """Bytes held by the shared buffers (on `device`, or on all devices)."""
    dev = torch.device(device) if device is not None else None
    return sum(b.numel() * b.element_size() for k, b in list(_BUFFERS.items()) if dev is None or k[2] == dev)


# --------------------------------------------------------------------------------------------- entry point
def dequantize_nf4(weight, quant_state=None, out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   backend: str = "auto", slot=None) -> torch.Tensor:
    """Dense [out, in] weight of a bitsandbytes NF4 `Params4bit` (or packed data + `QuantState`).

    Bit-identical to bitsandbytes: for `dtype` = quant_state.dtype (the default) to
    `bitsandbytes.functional.dequantize_4bit(weight, quant_state)`; for another `dtype` to bitsandbytes' own
    dequantisation into that dtype (`torch.ops.bitsandbytes.dequantize_4bit(..., dtype)`, what its matmul_4bit
    does for an input of that dtype): the fp32 value code * absmax rounded once, to nearest even.

    out:     write here (contiguous, the weight's numel, bf16 / fp16 / fp32; its dtype wins over `dtype`) and
             return it. Without `out` the result is the shared buffer for (shape, dtype, device[, slot]) -- it is
             OVERWRITTEN by the next call for the same key: use it before calling again and never keep it.
    dtype:   output dtype, bf16 / fp16 / fp32 (default quant_state.dtype).
    backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton", "torch".
    slot:    any hashable; separates buffers for callers that need two same-shaped weights alive at once.
    """
    st = nf4_storage(weight, quant_state)
    if out is not None:
        dtype = out.dtype
    elif dtype is None:
        dtype = st.dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_nf4 writes bf16 / fp16 / fp32, not {dtype} (cast the result instead)")
    if out is None:
        out = dequant_buffer(st.shape, dtype, st.device, slot)
    elif out.device != st.device or out.numel() != st.numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {st.numel} elements on {st.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    return dequantize_nf4_into(st.packed, st.absmax, nf4_code(st.device), st.blocksize, out,
                               absmax2=st.absmax2, code2=st.code2, blocksize2=st.blocksize2, offset=st.offset,
                               backend=backend)


# --------------------------------------------------------------------------------------------- the model
def is_4bit_model(model) -> bool:
    """True when the (PEFT-wrapped or plain) model's base weights are bitsandbytes 4-bit: loaded with
    load_in_4bit, or a pre-quantised `*-bnb-4bit` folder loaded as it is."""
    from turbotune._compat import unwrap_peft
    base = unwrap_peft(model)
    if getattr(base, "is_loaded_in_4bit", False):
        return True
    return any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in base.modules())


# --------------------------------------------------------------------------------------------- bitsandbytes itself
def bnb_dequantize_flat(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' own dequantisation of a 4-bit weight, asked for over the flattened tensor, then reshaped.

    bitsandbytes defines its blocks over the flattened weight (block b holds elements b*blocksize ...). Its
    AVX-512 CPU kernel (0.50.x) instead looks the scale up per row (`absmax[row * (cols // blocksize) + col //
    blocksize]`), which is wrong whenever a row's length is not a multiple of the block size. Asked for a
    one-row shape, that kernel's two indexings agree, so this is bitsandbytes' arithmetic (the fp32 product
    code * absmax, rounded once to `dtype`) with the layout bitsandbytes itself defines, on every backend.
    """
    import bitsandbytes.functional as bnbF

    qs = quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    flat = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax.float(), qs.blocksize, qs.quant_type,
                                                  (qs.shape.numel(),), dtype or qs.dtype)
    return flat.view(qs.shape)


def bnb_cpu_dequant_misreads_rows() -> bool:
    """True when this machine's bitsandbytes dequantises a 4-bit weight on the CPU differently from its own
    block layout (`bnb_dequantize_flat`): the AVX-512 kernel's per-row scale lookup. A 32 x 96 weight with
    64-element blocks has rows that straddle blocks, which that kernel gets wrong."""
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=g) * torch.linspace(0.5, 4.0, 32).unsqueeze(1)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return not torch.equal(bnbF.dequantize_4bit(packed, qs), bnb_dequantize_flat(packed, qs))
