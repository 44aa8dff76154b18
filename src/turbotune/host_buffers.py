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
"""
from __future__ import annotations

import torch


class HostBufferPool:
    def __init__(self, pin_memory: bool = True):
        self.pin_memory = pin_memory
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.allocated = 0  # buffers made so far
        self.bytes = 0      # host memory they hold

    @staticmethod
    def key(index: int, like: torch.Tensor) -> tuple:
        return index, tuple(like.shape), like.dtype

    def acquire(self, index: int, like: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """A host buffer shaped like `like` for layer `index`: a free one of that key, or a new one."""
        key = self.key(index, like)
        free = self._free.get(key)
        if free:
            return key, free.pop()
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("offloaded checkpointing needs a new pinned host buffer while a CUDA graph is being "
                               "captured; run the step eagerly once first (GraphedMicroStep does)")
        buf = torch.empty(like.shape, dtype=like.dtype, device="cpu",
                          pin_memory=self.pin_memory and torch.cuda.is_available())
        self.allocated += 1
        self.bytes += buf.numel() * buf.element_size()
        return key, buf

    def release(self, key: tuple, buf: torch.Tensor) -> None:
        """`buf` may be written again (its contents have been queued back to the device)."""
        self._free.setdefault(key, []).append(buf)

    def clear(self) -> None:
        self._free.clear()
        self.allocated = self.bytes = 0
