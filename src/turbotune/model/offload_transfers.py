"""Where an offloaded checkpoint's layer inputs wait between forward and backward (see turbotune.model.checkpointing).

`SavedInputs` is the half of `OffloadedCheckpointing` that stores and brings back each decoder layer's input:
`_save` (forward: copy to pinned host memory on a side stream, or keep on the device), `_take` (backward: the
input back on the device, then the prefetch of the layer before it), and the CUDA copies and stream / event
calls behind them (`_to_host`, `_prefetch`, `_restore`, the capture-time joins). It is a mixin: the state it
uses (`config`, `stats`, `_pending`, `_streams`, `_host_pool`, `_unjoined`, `_last_index`) is set up by
`OffloadedCheckpointing.__init__` and `apply`.
"""
from __future__ import annotations

import weakref

import torch

from turbotune.model.host_buffers import EXACT_PIN_BYTES

_INPLACE_MESSAGE = ("a decoder layer's input was modified in place (by the layer or after its forward); offloaded "
                    "checkpointing cannot recompute that layer from its saved input")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _Saved:
    """One layer input saved for the recompute: on the host, or kept on the device."""
    __slots__ = ("tensor", "device", "on_host", "copied", "d2h_event", "prefetched", "h2d_event", "version",
                 "index", "nbytes", "pool_key", "device_ref", "__weakref__")

    def __init__(self, index, device, nbytes):
        self.index, self.device, self.nbytes = index, device, nbytes
        self.tensor = None       # the host copy (offloaded), or the input itself (kept / CPU)
        self.on_host = False     # counted as offloaded (on the CPU: already on the host, not copied)
        self.copied = False      # a real device->host copy was made (CUDA)
        self.d2h_event = None    # CUDA event: the device->host copy finished
        self.prefetched = None   # device tensor being filled by a prefetch
        self.h2d_event = None    # CUDA event: the prefetch finished
        self.version = None      # version counter of a tensor kept without copying (in-place edits are errors)
        self.pool_key = None     # the host buffer came from the owner's HostBufferPool under this key
        self.device_ref = None   # (capture) the device input, alive until the compute stream waited for its copy


class SavedInputs:
    """Saving, offloading, prefetching and restoring layer inputs (a mixin of OffloadedCheckpointing)."""

    def _stream(self, device: torch.device):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _save(self, x: torch.Tensor, index: int) -> _Saved:
        cfg = self.config
        nbytes = x.numel() * x.element_size()
        entry = _Saved(index, x.device, nbytes)
        offload = (cfg.enabled and nbytes >= cfg.min_offload_bytes
                   and not (cfg.keep_last_on_gpu and index == self._last_index))
        self._join_copies()
        if offload and x.device.type == "cuda":
            entry.tensor, entry.d2h_event = self._to_host(x, entry)
            entry.on_host = entry.copied = True
        else:
            # Kept on the device, or (CPU) already on the host: no copy, so in-place edits must be caught.
            entry.tensor, entry.version = x, x._version
            entry.on_host = offload and x.device.type == "cpu"
        self.stats["saved_inputs"] += 1
        if entry.on_host:
            self.stats["offloaded_inputs"] += 1
            self.stats["offloaded_bytes"] += nbytes
        else:
            self.stats["kept_on_device"] += 1
        self._pending = [r for r in self._pending if r() is not None]
        self._pending.append(weakref.ref(entry))
        return entry

    def _to_host(self, x: torch.Tensor, entry: _Saved):
        """CUDA: copy `x` into a (pinned) host buffer on the side stream. Returns (host tensor, done event)."""
        pin = self.config.pin_memory
        x = x.contiguous()
        compute, side = torch.cuda.current_stream(x.device), self._stream(x.device)
        capturing = _capturing(x)
        # Large inputs go through the pool in eager steps too: exactly pinned, reused (host_buffers.py).
        static = self.config.static_host_buffers or capturing
        if static or (pin and entry.nbytes >= EXACT_PIN_BYTES):
            entry.pool_key, host = self._host_pool.acquire(entry.index, x, may_drop=not static)
        else:
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pin)
        side.wait_stream(compute)               # x is written by kernels queued on the compute stream
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=pin)
            done = torch.cuda.Event()
            done.record(side)
        if capturing:
            # record_stream has no place in a graph: keep x alive until the compute stream has waited for the
            # copy (at the next layer's save, or the backward), which also joins the side stream to the capture.
            entry.device_ref = x
            self._unjoined.append(entry)
        else:
            x.record_stream(side)               # x's memory is not reused before the copy has read it
        return host, done

    def _join_copies(self) -> None:
        """(capture) Make the compute stream wait for the copies to the host queued so far; drop their inputs."""
        for entry in self._unjoined:
            torch.cuda.current_stream(entry.device).wait_event(entry.d2h_event)
            entry.device_ref = None
        self._unjoined = []

    def end_forward_capture(self) -> None:
        """(capture of a forward alone: trainer_step's graphs, whose backward is another graph) The compute stream
        waits for every copy to the host before the forward graph ends, and the backward no longer waits on their
        events: a graph may not wait on an event recorded in another graph, and once the forward graph has
        replayed, every copy is done."""
        for ref in self._pending:  # every saved entry, the ones not joined yet (self._unjoined) among them
            entry = ref()
            if entry is None:
                continue
            if entry.d2h_event is not None:
                torch.cuda.current_stream(entry.device).wait_event(entry.d2h_event)
                entry.d2h_event = None
            entry.device_ref = None
        self._unjoined = []

    def _release_host(self, entry: _Saved) -> None:
        """The host copy has been queued back to the device: its pooled buffer may take another input."""
        if entry.pool_key is not None:
            self._host_pool.release(entry.pool_key, entry.tensor)
            entry.pool_key = None

    # -- backward ----------------------------------------------------------------------------------------------
    def _take(self, entry: _Saved) -> torch.Tensor:
        """Layer input for the recompute, on its device; then prefetch the input of the layer before it."""
        self._join_copies()
        live = [r for r in self._pending if r() is not None]
        position = next((i for i, r in enumerate(live) if r() is entry), None)
        previous = live[position - 1]() if position else None
        if position is not None:
            del live[position]
        self._pending = live
        x = self._restore(entry)
        if previous is not None:
            self._prefetch(previous)  # issued before the recompute below is queued, so the two overlap
        return x

    def _restore(self, entry: _Saved) -> torch.Tensor:
        if entry.prefetched is not None:
            x, entry.prefetched = entry.prefetched, None
            if entry.h2d_event is not None:
                torch.cuda.current_stream(entry.device).wait_event(entry.h2d_event)
                entry.h2d_event = None
            self.stats["prefetch_hits"] += 1
            return x
        if entry.copied:
            compute = torch.cuda.current_stream(entry.device)
            if entry.d2h_event is not None:  # None: joined at the end of a captured forward
                compute.wait_event(entry.d2h_event)
            self.stats["sync_restores"] += 1
            x = entry.tensor.to(entry.device, non_blocking=self.config.pin_memory)
            self._release_host(entry)
            return x
        if entry.tensor._version != entry.version:
            raise RuntimeError(_INPLACE_MESSAGE)
        if entry.on_host:
            self.stats["sync_restores"] += 1
        return entry.tensor

    def _prefetch(self, entry: _Saved) -> None:
        if entry.prefetched is not None or not entry.on_host:
            return  # already on its way, or never left the device
        self.stats["prefetches"] += 1
        if not entry.copied:
            entry.prefetched = self._restore_kept(entry)  # CPU: the tensor is on the host already
            return
        device = entry.device
        compute, side = torch.cuda.current_stream(device), self._stream(device)
        # Allocated on the compute stream (where it will be read and freed); the side stream first waits for
        # the compute work queued so far, since that work may still use the memory the allocator hands us.
        buffer = torch.empty(entry.tensor.shape, dtype=entry.tensor.dtype, device=device)
        side.wait_stream(compute)
        if entry.d2h_event is not None:  # None: joined at the end of a captured forward
            side.wait_event(entry.d2h_event)
        with torch.cuda.stream(side):
            buffer.copy_(entry.tensor, non_blocking=self.config.pin_memory)
            done = torch.cuda.Event()
            done.record(side)
        if not _capturing(buffer):  # (a captured step always waits for `done` before using or freeing it)
            buffer.record_stream(side)  # if the graph is dropped before this layer's backward, no early reuse
        entry.prefetched, entry.h2d_event = buffer, done
        self._release_host(entry)

    @staticmethod
    def _restore_kept(entry: _Saved) -> torch.Tensor:
        if entry.tensor._version != entry.version:
            raise RuntimeError(_INPLACE_MESSAGE)
        return entry.tensor
