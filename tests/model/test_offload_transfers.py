"""The offload's end of a captured forward (offload_transfers.SavedInputs.end_forward_capture), with stand-in
streams and events: the GPU test is tests/gpu/test_trainer_step_gpu.py."""
import weakref
from types import SimpleNamespace

import torch

from turbotune.model.offload_transfers import SavedInputs, _Saved


def test_end_forward_capture_waits_on_every_copy_once_and_drops_the_events(monkeypatch):
    waited = []
    stream = SimpleNamespace(wait_event=lambda event: waited.append(event))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    entries = []
    for i in range(3):
        entry = _Saved(i, torch.device("cpu"), 4)
        entry.d2h_event, entry.device_ref = f"event-{i}", object()
        entries.append(entry)
    saved = SavedInputs()
    saved._pending = [weakref.ref(e) for e in entries]
    saved._unjoined = entries[1:]  # the last two copies not joined by a later save yet
    saved.end_forward_capture()
    assert sorted(waited) == ["event-0", "event-1", "event-2"]
    assert all(e.d2h_event is None for e in entries) and saved._unjoined == []
    assert all(e.device_ref is None for e in entries[1:])
