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


def test_a_probe_inside_a_checkpointed_forward_keeps_the_recomputation_in_step(fresh):
    """The probe's autograd graph (forward and backward of a small case) runs on the first call only. Inside a
    non-reentrant checkpoint its saved tensors must not reach the checkpoint's hooks, or the recomputation, which
    does not probe, saves fewer tensors and the backward fails (Gemma 2's soft-capped attention on an H100)."""
    def probe():
        with torch.enable_grad():
            x = torch.randn(3, 3, requires_grad=True)
            (x.exp() * x.sin()).sum().backward()

    def layer(h):
        return flash_support.run_flash_or_reference("k", h, lambda: (h * h).tanh(), lambda: (h * h).tanh(),
                                                    "thing", first=probe)

    h = torch.randn(4, 8, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False).sum().backward()
    expected = torch.autograd.grad((h * h).tanh().sum(), h)[0]
    torch.testing.assert_close(h.grad, expected)


def test_the_checkpoints_early_stop_passes_through_and_is_not_remembered_as_a_failure(fresh):
    stop = getattr(torch.utils.checkpoint, "_StopRecomputationError", None)
    if stop is None:
        pytest.skip("this PyTorch has no early-stopping recomputation")

    def stopped():
        raise stop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(stop):
            flash_support.run_flash_or_reference("k", torch.zeros(1, 4, 2, 8), stopped, lambda: "R", "thing",
                                                 errors=(Exception,))
    assert flash_support._support == {}
