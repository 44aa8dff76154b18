"""Pinned host buffers that offloaded checkpointing reuses from step to step, so a step can be graph-captured.

A CUDA graph replays its copies to and from the very host addresses it saw while being captured, and pinned
memory can't be allocated from the caching host allocator in the middle of a capture. So with
`OffloadConfig(static_host_buffers=True)` each decoder layer's input goes to a buffer kept per
(layer, shape, dtype): allocated the first time (in an eager warm-up step, before any capture) and reused
afterwards.

A buffer is busy from the device->host copy into it until its layer's input has been queued back to the
device (`release`). Reuse is ordered by the streams: the next copy into a released buffer is queued on the
side stream after it has waited for everything queued on the compute stream, which includes the copy out of
it. Two forwards before one backward simply take a second buffer for the same key.

Exact sizes: torch's pinned allocator rounds every block up to a power of two, so a 2.9 GB layer input (llama3-8b
at 350k tokens) takes 4 GiB and 31 of them no longer fit a 128 GiB host (seen on the H100 machine: the worker was
killed for host memory). Buffers of `EXACT_PIN_BYTES` or more are therefore page-aligned host memory pinned in
place (`cudaHostRegister`), exactly their size, and unpinned by `clear()` once the device is idle. Offloaded
checkpointing routes such inputs through the pool in eager steps too (offload_transfers.py), so they are reused
from step to step instead of pinned anew. `limit_bytes` bounds what the pool holds in eager steps: a new buffer
that would pass it first drops the free buffers (shapes not seen lately), after waiting for the device.
"""
from __future__ import annotations

import os

import torch

EXACT_PIN_BYTES = 256 << 20
_PAGE = 4096


class HostBufferPool:
    def __init__(self, pin_memory: bool = True, limit_bytes: int | None = None):
        self.pin_memory = pin_memory
        self.limit_bytes = limit_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._registered: dict[int, torch.Tensor] = {}  # data_ptr -> its (exactly pinned) backing block
        self.allocated = 0  # buffers made so far
        self.bytes = 0      # host memory they hold

    @staticmethod
    def key(index: int, like: torch.Tensor) -> tuple:
        return index, tuple(like.shape), like.dtype

    def acquire(self, index: int, like: torch.Tensor, may_drop: bool = False) -> tuple[tuple, torch.Tensor]:
        """A host buffer shaped like `like` for layer `index`: a free one of that key, or a new one. may_drop:
        no CUDA graph holds the free buffers' addresses, so they may be dropped to stay within `limit_bytes`."""
        key = self.key(index, like)
        free = self._free.get(key)
        if free:
            return key, free.pop()
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("offloaded checkpointing needs a new pinned host buffer while a CUDA graph is being "
                               "captured; run the step eagerly once first (GraphedMicroStep does)")
        nbytes = like.numel() * like.element_size()
        if may_drop and self.limit_bytes is not None and self.bytes + nbytes > self.limit_bytes:
            self.drop_free()
        pin = self.pin_memory and torch.cuda.is_available()
        if pin and nbytes >= EXACT_PIN_BYTES:
            buf = self._exactly_pinned(like.shape, like.dtype, nbytes)
        else:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
        self.allocated += 1
        self.bytes += nbytes
        return key, buf

    def _exactly_pinned(self, shape, dtype, nbytes: int) -> torch.Tensor:
        """A host tensor of exactly `nbytes`, page-aligned, pinned in place; kept in `_registered` until clear()."""
        block = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
        start = -block.data_ptr() % _PAGE
        view = block[start:start + nbytes]
        err = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"pinning {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error {int(err)}); "
                               "the machine may be short of host memory: use recompute checkpointing or shorter "
                               "sequences")
        self._registered[view.data_ptr()] = block
        return view.view(dtype).view(shape)

    def release(self, key: tuple, buf: torch.Tensor) -> None:
        """`buf` may be written again (its contents have been queued back to the device)."""
        self._free.setdefault(key, []).append(buf)

    def drop_free(self) -> None:
        """Forget the free buffers (the next acquire of their keys allocates again), unpinning ours."""
        free = [b for bufs in self._free.values() for b in bufs]
        self._free.clear()
        self._unpin(free)
        self.bytes -= sum(b.numel() * b.element_size() for b in free)
        self.allocated -= len(free)

    def clear(self) -> None:
        """Forget every buffer. The caller must not use one afterwards."""
        self._free.clear()
        self._unpin(every=True)
        self.allocated = self.bytes = 0

    def _unpin(self, bufs=(), every: bool = False) -> None:
        ptrs = list(self._registered) if every else [b.data_ptr() for b in bufs if b.data_ptr() in self._registered]
        if not ptrs:
            return
        torch.cuda.synchronize()  # no copy may still read or write them
        for ptr in ptrs:
            torch.cuda.cudart().cudaHostUnregister(ptr)
            del self._registered[ptr]

    def __del__(self):
        try:
            if self._registered:
                self.clear()
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone; the memory goes with the process
            pass


def host_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
