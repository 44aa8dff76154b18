"""bench/sft.py's steady rate: real tokens/s over the timed steps that paid no one-off cost."""
import pytest

from turbotune.bench.sft import steady_rate


def test_steps_that_captured_are_left_out():
    times = [0.10, 0.10, 0.45, 0.10, 0.30]  # two steps captured a new length
    tokens = [2000, 2000, 3000, 2000, 2500]
    rate, steps = steady_rate(times, tokens)
    assert steps == 3 and rate == pytest.approx(6000 / 0.30)


def test_all_steps_kept_when_none_stands_out_and_empty_gives_none():
    rate, steps = steady_rate([0.10, 0.12, 0.11], [1000, 1200, 1100])
    assert steps == 3 and rate == pytest.approx(3300 / 0.33)
    assert steady_rate([], []) is None


def test_capture_split_note():
    from turbotune.bench.sft import _capture_split
    assert _capture_split([]) == ""
    assert _capture_split([(0.1, 0.3), (0.2, 0.5), (0.15, 0.4)]) == \
        "; per graph, medians: forward capture 150 ms, backward 400 ms"
