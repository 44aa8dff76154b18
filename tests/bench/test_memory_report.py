"""--memory-report's analysis (bench/memory_report.py) on a recorded-looking allocator trace; the recording
itself needs a GPU (run by the bench there)."""
from turbotune.bench.memory_report import format_report, peak_breakdown, site_of

TORCH = {"filename": "/venv/lib/python3.12/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call"}


def _frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


def _alloc(addr, size, *frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": [TORCH, *frames]}


def _free(addr):
    return {"action": "free_completed", "addr": addr}


ATTN = _frame("/w/src/turbotune/model/kernels/softcap_attention.py", 210, "forward")
ADAM = _frame("/venv/lib/python3.12/site-packages/transformers/trainer.py", 99, "_inner_training_loop")


def test_the_live_blocks_at_the_peak_by_site():
    trace = [_alloc(1, 100, ADAM), _alloc(2, 300, ATTN), _alloc(3, 200, ATTN), _free(2),
             _alloc(4, 250, ATTN),  # 550 live, below the 600 peak after event 2
             _free(3), _free(4)]
    out = peak_breakdown(trace, allocated_now=1100)  # 1,000 allocated before the trace's first event
    assert out["peak_bytes"] == 1000 + 600 and out["baseline_bytes"] == 1000 and out["peak_event"] == 2
    assert out["sites"] == [["turbotune/model/kernels/softcap_attention.py:210 forward", 500, 2],
                            ["transformers/trainer.py:99 _inner_training_loop", 100, 1]]
    text = format_report("turbotune", dict(out, max_memory_allocated=1600))
    assert "softcap_attention.py:210 forward" in text.splitlines()[5]


def test_frees_of_blocks_from_before_the_trace_are_ignored():
    out = peak_breakdown([_free(7), _alloc(1, 10, ATTN)], allocated_now=10)
    assert out["peak_bytes"] == 10 and out["baseline_bytes"] == 0


def test_site_skips_pytorch_frames():
    assert site_of([TORCH]) == "(PyTorch internals)"
    assert site_of([TORCH, ADAM]) == "transformers/trainer.py:99 _inner_training_loop"


def test_recording_turns_checkpoint_early_stop_off_until_finish(monkeypatch, tmp_path):
    """start() also runs recompute without early stop (see its comment) and finish() restores it; the CUDA
    recording itself is stood in for (a CPU build has none)."""
    import torch
    import torch.utils.checkpoint as ckpt

    from turbotune.bench import memory_report
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"device_traces": [[]]})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    assert ckpt._enable_checkpoint_early_stop is not False
    memory_report.start()
    assert ckpt._enable_checkpoint_early_stop is False
    memory_report.finish(str(tmp_path), "m")
    assert ckpt._enable_checkpoint_early_stop is not False
    assert (tmp_path / "memory-m.txt").exists()
