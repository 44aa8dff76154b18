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
    calls = {"first": 0, "flash": 0, "reference": 0}

    def bump(name, value):
        def f():
            calls[name] += 1
            return value
        return f
    return calls, bump


def test_probe_runs_once_then_flash_is_called_alone(fresh):
    q = torch.zeros(1, 4, 2, 8)
    calls, bump = _calls()
    for _ in range(3):
        out = flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "x",
                                                   first=bump("first", None))
        assert out == "F"
    assert calls == {"first": 1, "flash": 3, "reference": 0}
    fresh["now"] = True  # known to run: a capture replays the kernel too, without the probe
    assert flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "x",
                                                first=bump("first", None)) == "F"
    assert calls["first"] == 1


def test_untried_inside_a_capture_takes_the_reference_and_tries_later(fresh):
    q = torch.zeros(1, 4, 2, 8)
    calls, bump = _calls()
    fresh["now"] = True
    assert flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "x",
                                                first=bump("first", None)) == "R"
    assert calls == {"first": 0, "flash": 0, "reference": 1}
    fresh["now"] = False
    assert flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "x",
                                                first=bump("first", None)) == "F"
    assert calls["first"] == 1


def test_a_failing_probe_falls_back_for_good_with_one_warning(fresh):
    q = torch.zeros(1, 4, 2, 8)
    calls, bump = _calls()

    def broken():
        raise RuntimeError("no kernel image for this GPU\nmore")
    with pytest.warns(UserWarning, match="no kernel image for this GPU"):
        assert flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "thing",
                                                    first=broken) == "R"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flash_support.run_flash_or_reference("k", q, bump("flash", "F"), bump("reference", "R"), "thing",
                                                    first=broken) == "R"
    assert calls == {"first": 0, "flash": 0, "reference": 2}
