"""pass_timeline's summary, with stand-ins for CUDA events (the events themselves: a GPU)."""
from turbotune.training import pass_timeline
from turbotune.training.pass_timeline import PassTimeline, timeline_line


class _At:
    """An event that happened at `t` ms."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):
        return other.t - self.t


def _timeline(starts, calls, monkeypatch):
    monkeypatch.setattr(pass_timeline.torch.cuda, "synchronize", lambda: None)
    t = PassTimeline()
    for call, s in zip(calls, starts):  # forward 10 ms, 2 ms to the backward, backward 20 ms
        t.passes.append((call, [_At(s), _At(s + 10), _At(s + 12), _At(s + 32)]))
    return t


def test_summary_splits_each_pass_and_the_gap_to_the_next(monkeypatch):
    t = _timeline([0, 50, 100, 150], [1, 2, 3, 4], monkeypatch)
    got = t.summary(skip_fraction=0)
    assert got == {"forward": 10, "forward_to_backward": 2, "backward": 20, "to_next_pass": 18, "passes": 4}
    line = timeline_line(got)
    assert "18.0 ms until the next pass" in line and "busy 60%" in line


def test_gaps_across_eager_calls_are_left_out(monkeypatch):
    """Call 3 ran eagerly (a capture, or a new shape): the gap from pass 2 to pass 4 is not a step's gap."""
    t = _timeline([0, 50, 400], [1, 2, 4], monkeypatch)
    assert t.summary(skip_fraction=0)["to_next_pass"] == 18


def test_early_passes_are_skipped_and_too_few_give_none(monkeypatch):
    t = _timeline([0, 1000, 1050, 1100], [1, 2, 3, 4], monkeypatch)
    assert t.summary(skip_fraction=0.5)["to_next_pass"] == 18  # the 968 ms gap after pass 1 is warm-up
    assert _timeline([0], [1], monkeypatch).summary(skip_fraction=0) is None
    assert timeline_line(None) is None


def test_incomplete_passes_are_ignored(monkeypatch):
    t = _timeline([0, 50, 100], [1, 2, 3], monkeypatch)
    t.passes.append((4, [_At(150)]))  # a forward whose backward never ran
    assert t.summary(skip_fraction=0)["passes"] == 3
