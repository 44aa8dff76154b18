"""Device debugging aid: runs pytest arguments in-process while sys.monitoring (Python 3.12+) records every
exception raised during CUDA stream capture (type, message, where), so an exception swallowed inside a capture
(the cause of "operation failed due to a previous error during capture") can be named.
    python3 bench/gpu_debug_capture.py tests/gpu/test_cuda_graphs_gpu.py -k packed_rows
"""
import sys
import traceback

import pytest
import torch

seen: dict = {}


def on_raise(code, offset, exc):
    try:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001 - asking may itself fail mid-capture
        capturing = True
    if not capturing:
        return
    key = (code.co_filename, code.co_name, type(exc).__name__)
    if key not in seen:
        seen[key] = (str(exc).splitlines()[0][:240] if str(exc) else "", "".join(traceback.format_stack(limit=14)))


mon = sys.monitoring
mon.use_tool_id(3, "capture-debug")
mon.register_callback(3, mon.events.RAISE, on_raise)
mon.set_events(3, mon.events.RAISE)
rc = pytest.main(sys.argv[1:] + ["-p", "no:cacheprovider"])
mon.set_events(3, 0)
print(f"\n== {len(seen)} distinct exceptions raised during capture")
for (f, fn, t), (msg, stack) in list(seen.items())[:12]:
    print(f"-- {t} in {fn} ({f}): {msg}\n{stack}")
sys.exit(rc)
