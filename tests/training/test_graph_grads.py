"""graph_grads: how replayed gradients reach .grad, the grads modes and their switches."""
import pytest
import torch

from turbotune.training.graph_grads import (accumulate_foreach, graph_grads_mode, grads_are, grads_in_place,
                                            views_of_one_buffer)


@pytest.mark.parametrize("one_allocation", [False, True])
def test_replayed_gradients_reach_grad_as_autograd_would(one_allocation):
    """Two passes of one optimizer step: the first pass's gradients become .grad (copies: the replay's buffers are
    overwritten by the next backward), the second's are added; a parameter without a gradient keeps none."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (5,), (2, 2)]]
    first = [torch.randn(4, 3), torch.randn(5), None]
    second = [torch.randn(4, 3), torch.randn(5), None]
    accumulate_foreach(params, first, one_allocation=one_allocation)
    kept = [g.clone() for g in first[:2]]
    for g in first[:2]:
        g.fill_(7.0)  # the shared buffers, overwritten by the next backward replay
    accumulate_foreach(params, second, one_allocation=one_allocation)
    for p, a, b in zip(params, kept, second):
        torch.testing.assert_close(p.grad, a + b)
    assert params[2].grad is None
    if one_allocation:  # the fresh gradients are views of one buffer
        assert params[0].grad.untyped_storage().data_ptr() == params[1].grad.untyped_storage().data_ptr()


def test_views_of_one_buffer_per_dtype():
    like = [torch.zeros(3, 2), torch.zeros(4, dtype=torch.float64), torch.zeros(5)]
    out = views_of_one_buffer(like)
    assert [t.shape for t in out] == [t.shape for t in like] and [t.dtype for t in out] == [t.dtype for t in like]
    assert out[0].untyped_storage().data_ptr() == out[2].untyped_storage().data_ptr()
    assert out[1].untyped_storage().data_ptr() != out[0].untyped_storage().data_ptr()
    out[0].fill_(1.0)
    out[2].fill_(2.0)
    assert out[0].sum() == 6 and out[2].sum() == 10  # no overlap


def test_graph_grads_mode_switch(monkeypatch):
    monkeypatch.delenv("TURBOTUNE_GRAPH_GRADS", raising=False)
    assert graph_grads_mode() == "adopt"
    for mode in ("foreach", "flat", "autograd"):
        monkeypatch.setenv("TURBOTUNE_GRAPH_GRADS", mode)
        assert graph_grads_mode() == mode
    monkeypatch.setenv("TURBOTUNE_GRAPH_GRADS", "fast")
    with pytest.raises(ValueError, match="foreach, flat, adopt or autograd"):
        graph_grads_mode()


def test_grads_are_the_buffers_only_when_every_grad_is_its_buffer():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    bufs = views_of_one_buffer(params)
    assert not grads_are(params, bufs) and not grads_are(params, None) and not grads_are([], [])
    params[0].grad = bufs[0]
    assert not grads_are(params, bufs)
    params[1].grad = torch.zeros(3)  # a .grad of its own, not the buffer
    assert not grads_are(params, bufs)
    params[1].grad = bufs[1]
    assert grads_are(params, bufs)


def test_in_place_capture_switch(monkeypatch):
    monkeypatch.delenv("TURBOTUNE_CAPTURE_GRADS_IN_PLACE", raising=False)
    assert grads_in_place()  # the default
    monkeypatch.setenv("TURBOTUNE_CAPTURE_GRADS_IN_PLACE", "0")
    assert not grads_in_place()


def test_autograd_adds_into_grads_that_are_the_buffers_in_place():
    """What the in-place capture (grads_in_place) rests on: when every .grad is a view of the shared buffer,
    autograd's accumulation adds into that memory (so a captured backward writes the buffers) and leaves the
    .grads the buffers."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    bufs = views_of_one_buffer(params)
    eager = [torch.randn(3, 2), torch.randn(2)]
    torch._foreach_copy_(bufs, eager)
    for p, b in zip(params, bufs):
        p.grad = b
    x = torch.randn(4, 3)
    out = (x @ params[0] + params[1]).square().sum()
    expected = torch.autograd.grad(out, params, retain_graph=True)
    torch.autograd.backward([out], grad_tensors=[torch.ones(())], inputs=params)
    assert grads_are(params, bufs)
    for p, e, g in zip(params, eager, expected):
        torch.testing.assert_close(p.grad, e + g)
