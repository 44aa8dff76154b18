"""flash_support.run_flash_or_reference: the probe runs on the first try only (a probe synchronises, which a CUDA
graph capture forbids: seen on an H200, twelfth session), a failure falls back for good, a capture never tries.
The GPU paths are stood in for by counters; the capture check by monkeypatch (a CPU build has no capture)."""
import warnings

import pytest
import torch

from turbotune.model.kernels import flash_support


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(flash_support, "_support", {})
    capturing = {"now": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    return capturing


def _calls():
    """Counters, and run(first=...) calling run_flash_or_reference with counting stand-ins ("F": flash ran)."""
    calls = {"first": 0, "flash": 0, "reference": 0}

    def bump(name, value):
        def f():
            calls[name] += 1
            return value
        return f

    def run(first=None):
        return flash_support.run_flash_or_reference("k", torch.zeros(1, 4, 2, 8), bump("flash", "F"),
                                                    bump("reference", "R"), "thing",
                                                    first=first or bump("first", None))
    return calls, run


def test_probe_runs_once_then_flash_is_called_alone(fresh):
    calls, run = _calls()
    assert [run() for _ in range(3)] == ["F"] * 3
    assert calls == {"first": 1, "flash": 3, "reference": 0}
    fresh["now"] = True  # known to run: a capture replays the kernel too, without the probe
    assert run() == "F" and calls["first"] == 1


def test_untried_inside_a_capture_takes_the_reference_and_tries_later(fresh):
    calls, run = _calls()
    fresh["now"] = True
    assert run() == "R" and calls == {"first": 0, "flash": 0, "reference": 1}
    fresh["now"] = False
    assert run() == "F" and calls["first"] == 1


def test_a_failing_probe_falls_back_for_good_with_one_warning(fresh):
    calls, run = _calls()

    def broken():
        raise RuntimeError("no kernel image for this GPU\nmore")
    with pytest.warns(UserWarning, match="no kernel image for this GPU"):
        assert run(first=broken) == "R"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(first=broken) == "R"
    assert calls == {"first": 0, "flash": 0, "reference": 2}
