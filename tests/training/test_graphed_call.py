"""graphed_call's schedule of eager calls before a shape is captured (the captures themselves: tests/gpu)."""
import pytest

from turbotune.training.graphed_call import eager_calls_before_capture


@pytest.mark.parametrize("captured_before, first_sight, offload, expected", [
    (False, True, False, 2),   # the first shape: the warm-up (lazy initialisation, Triton compilation)
    (False, True, True, 2),
    (True, True, False, 0),    # later shapes: captured at first sight
    (True, False, False, 1),   # TURBOTUNE_CAPTURE_FIRST_SIGHT=0
    (True, True, True, 1),     # offloaded checkpointing pins a new shape's host buffers in an eager call
    (True, False, True, 1),
])
def test_eager_calls_before_capture(captured_before, first_sight, offload, expected):
    assert eager_calls_before_capture(2, captured_before, first_sight, offload) == expected


def test_offload_needs_an_eager_call_even_without_warmup():
    assert eager_calls_before_capture(0, False, True, True) == 1
    assert eager_calls_before_capture(0, False, True, False) == 0
