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


def test_step_notes_put_the_timeline_and_capture_split_in_the_json(monkeypatch):
    from types import SimpleNamespace

    from turbotune.bench import sft
    from turbotune.training import trainer_step
    from turbotune.training.step_coalescing import Window

    summary = {"forward": 15.0, "forward_to_backward": 2.0, "backward": 30.0, "to_next_pass": 40.0, "passes": 9}
    graphs = SimpleNamespace(disabled_reason=None, replays=9, eager_calls=2, captures=2, capture_s=0.8,
                             capture_parts=[(0.2, 0.5), (0.1, 0.4)], standins=3,
                             timeline=SimpleNamespace(summary=lambda: summary))
    step = SimpleNamespace(graphs=graphs, window=Window(), no_grad_graphs=SimpleNamespace(
        replays=0, captures=0, disabled_reason=None))
    monkeypatch.setattr(trainer_step, "trainer_step_of", lambda model: step)
    result = {}
    notes = sft._step_notes(object(), {}, result)
    assert result["pass_timeline_ms"] == summary and result["capture_parts_s"] == [[0.2, 0.5], [0.1, 0.4]]
    assert any("40.0 ms until the next pass" in n for n in notes)
    assert any("forward capture 200 ms, backward 500 ms; 3 replays in a longer graph" in n for n in notes), notes
