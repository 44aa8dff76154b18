"""graphed_call's schedule of eager calls before a shape is captured, and its replay's autograd plumbing with each
grads mode (the captures themselves: tests/gpu)."""
import pytest
import torch

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


class _FakeGraph:
    def __init__(self, run):
        self.replay = run


def _fake_entry(params, grads_mode):
    """An _Entry whose "graphs" run on the CPU: forward out = 2 * x, backward grads = upstream sum times 1, 2."""
    from turbotune.training.graphed_call import _Entry

    x = torch.arange(3.0)
    out = {"logits": torch.zeros(3).requires_grad_()}  # as a captured forward's output
    entry = _Entry(out, {"x": x}, params)
    entry.grads = [torch.zeros_like(p) for p in params]

    def forward():
        entry.outputs[0].copy_(2 * x)

    def backward():  # "adopt" graphs add into the shared buffers, the others overwrite them
        for k, g in enumerate(entry.grads):
            value = float(entry.grad_inputs[0].sum()) * (k + 1)
            g.add_(value) if grads_mode == "adopt" else g.fill_(value)

    entry.fwd, entry.bwd, entry.grads_mode = _FakeGraph(forward), _FakeGraph(backward), grads_mode
    entry.detach_outputs()
    return entry


@pytest.mark.parametrize("mode", ["autograd", "foreach", "flat", "adopt"])
def test_replay_autograd_plumbing(mode):
    """The replay's autograd Function in each gradients mode: outputs require grad, the backward hands autograd
    one gradient per input, and .grad ends up the same (two backwards: added)."""
    from turbotune.training.graphed_call import GraphedCall, _Replay

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    model = torch.nn.Module()
    call = GraphedCall(lambda **kw: None, model)
    entry = _fake_entry(params, mode)
    inputs = call._autograd_inputs(entry)
    assert len(inputs) == (1 if mode in ("flat", "adopt") else 2)
    for _ in range(2):
        (out,) = _Replay.apply(entry, None, *inputs)
        assert out.requires_grad
        torch.testing.assert_close(out, 2 * torch.arange(3.0))
        out.sum().backward()  # upstream gradient: ones, sum 3
    torch.testing.assert_close(params[0].grad, torch.full((2,), 6.0))
    torch.testing.assert_close(params[1].grad, torch.full((3,), 12.0))
    if mode == "adopt":  # the buffers are the .grads: no second set
        assert all(p.grad is b for p, b in zip(params, entry.grads))


def _replay_step(entry, inputs):
    from turbotune.training.graphed_call import _Replay
    (out,) = _Replay.apply(entry, None, *inputs)
    out.sum().backward()


def test_adopted_grads_start_from_zero_each_step_and_add_to_foreign_grads():
    """"adopt": after zero_grad (set to None) the next step starts from zeroed buffers, not the last step's sums;
    zero_grad(set_to_none=False) keeps accumulating into them; a .grad that is not the buffer (an eager pass made
    it, or the user set it) gets the replay's gradients added, and the buffers are not handed over."""
    from turbotune.training.graphed_call import GraphedCall
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    model = torch.nn.Module()
    model.a, model.b = params
    entry = _fake_entry(params, "adopt")
    inputs = GraphedCall(lambda **kw: None, model)._autograd_inputs(entry)
    for _ in range(2):
        _replay_step(entry, inputs)
    model.zero_grad()  # set_to_none: a new step
    _replay_step(entry, inputs)
    torch.testing.assert_close(params[1].grad, torch.full((3,), 6.0))
    model.zero_grad(set_to_none=False)  # zeros in place: still the buffers, accumulating
    _replay_step(entry, inputs)
    assert params[1].grad is entry.grads[1]
    torch.testing.assert_close(params[1].grad, torch.full((3,), 6.0))
    model.zero_grad()
    own = [torch.ones(2), None]  # a foreign .grad on one parameter, none on the other
    params[0].grad = own[0]
    _replay_step(entry, inputs)
    assert params[0].grad is own[0] and params[1].grad is not entry.grads[1]
    torch.testing.assert_close(params[0].grad, torch.full((2,), 4.0))
    torch.testing.assert_close(params[1].grad, torch.full((3,), 6.0))
    _replay_step(entry, inputs)  # the buffers are zeroed again before they are added to the .grads
    torch.testing.assert_close(params[0].grad, torch.full((2,), 7.0))
    torch.testing.assert_close(params[1].grad, torch.full((3,), 12.0))


def test_eager_grads_move_into_the_shared_buffers_before_a_capture():
    """"adopt", at a capture: the .grads of this step's eager calls become the shared buffers (values kept, the old
    tensors dropped), so the capture does not hold two sets; the replay then adds into them. Not when some
    parameter has no .grad (a zero buffer is not "no gradient" to an optimizer), nor twice."""
    from turbotune.training.graph_grads import adopt_eager_grads, views_of_one_buffer
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    bufs = [b.zero_() for b in views_of_one_buffer(params)]
    params[0].grad = torch.tensor([1.0, 2.0])
    assert not adopt_eager_grads(params, bufs) and params[0].grad is not bufs[0]
    params[1].grad = torch.tensor([3.0, 4.0, 5.0])
    assert adopt_eager_grads(params, bufs)
    assert all(p.grad is b for p, b in zip(params, bufs))
    torch.testing.assert_close(params[1].grad, torch.tensor([3.0, 4.0, 5.0]))
    assert not adopt_eager_grads(params, bufs)  # already adopted
    entry = _fake_entry(params, "adopt")
    entry.grads = bufs
    from turbotune.training.graphed_call import GraphedCall
    model = torch.nn.Module()
    model.a, model.b = params
    _replay_step(entry, GraphedCall(lambda **kw: None, model)._autograd_inputs(entry))
    assert params[1].grad is bufs[1]  # added in place: the eager part and the replay's
    torch.testing.assert_close(params[1].grad, torch.tensor([9.0, 10.0, 11.0]))


def test_capture_into_is_torchs_graph_context_unless_lean(monkeypatch):
    from turbotune.training import graphed_call
    made = []
    monkeypatch.setattr(graphed_call.torch.cuda, "graph",
                        lambda g, pool, capture_error_mode: made.append((g, pool, capture_error_mode)) or "ctx")
    monkeypatch.delenv("TURBOTUNE_LEAN_CAPTURE", raising=False)
    assert graphed_call.capture_into("g", "pool") == "ctx" and made == [("g", "pool", "thread_local")]


@pytest.mark.parametrize("fails, mode", [(False, "1"), (True, "1"), (False, "host"), (True, "host")])
def test_lean_capture_begins_and_ends_on_the_capture_stream(monkeypatch, fails, mode):
    """TURBOTUNE_LEAN_CAPTURE=1: capture_begin (pool, thread_local) on torch.cuda.graph's capture stream, and
    capture_end also when the captured code raises; no cache is emptied (=host: the device cache is, first)."""
    import contextlib
    from types import SimpleNamespace

    from turbotune.training import graphed_call
    events = []
    fake_cuda = SimpleNamespace(
        graph=SimpleNamespace(default_capture_stream="capture-stream"),
        synchronize=lambda: events.append("sync"),
        stream=lambda s: contextlib.nullcontext(events.append(("stream", s))),
        empty_cache=lambda: events.append("empty_cache"))
    monkeypatch.setattr(graphed_call.torch, "cuda", fake_cuda)
    monkeypatch.setenv("TURBOTUNE_LEAN_CAPTURE", mode)
    graph = SimpleNamespace(capture_begin=lambda pool, capture_error_mode: events.append(("begin", pool,
                                                                                          capture_error_mode)),
                            capture_end=lambda: events.append("end"))
    with contextlib.suppress(RuntimeError):
        with graphed_call.capture_into(graph, "pool"):
            events.append("body")
            if fails:
                raise RuntimeError("captured code failed")
    emptied = ["empty_cache"] if mode == "host" else []
    assert events == ["sync", *emptied, ("stream", "capture-stream"), ("begin", "pool", "thread_local"), "body",
                      "end"]


def test_lean_capture_switch_is_checked(monkeypatch):
    from turbotune.training import graphed_call
    monkeypatch.setenv("TURBOTUNE_LEAN_CAPTURE", "yes")
    with pytest.raises(ValueError, match="0, 1 or host"):
        graphed_call.capture_into("g", "pool")


def test_stand_in_replays_a_longer_graph_until_the_kth_sighting(monkeypatch):
    """TURBOTUNE_GRAPH_STANDIN=k: a length without a graph of its own takes the shortest longer graph its call can
    grow into, for its first k - 1 sightings; then (and with the switch off, or nothing longer) it is left to the
    capture schedule. The keying is tested on the CPU with the device check taken out of graph_key."""
    from turbotune.training import graphed_call
    from turbotune.training.padding import grow_packed

    monkeypatch.setattr(graphed_call, "graph_key", lambda tensors, others: tuple(
        [(k, tuple(v.shape)) for k, v in sorted(tensors.items())] + sorted(others.items())))

    def call(length):
        ones = torch.ones(1, length, dtype=torch.long)
        return {"input_ids": ones, "labels": ones, "position_ids": torch.arange(length)[None]}, {"use_cache": False}

    class Entry:
        def __init__(self, length):
            self.length = length

    g = graphed_call.GraphedCall(lambda **kw: None, torch.nn.Linear(2, 2))
    g.disabled_reason = None
    g._entries = {g._key(*call(n)): Entry(n) for n in (512, 1024)}
    key = g._key(*call(300))
    monkeypatch.setenv("TURBOTUNE_GRAPH_STANDIN", "0")
    assert g._stand_in(key, *call(300), grow_packed) is None
    monkeypatch.setenv("TURBOTUNE_GRAPH_STANDIN", "3")
    for sighting in (1, 2):
        tensors, others, entry = g._stand_in(key, *call(300), grow_packed)
        assert entry.length == 512 and tensors["input_ids"].shape == (1, 512) and g._seen[key] == sighting
    assert g._stand_in(key, *call(300), grow_packed) is None  # the third sighting: its own capture
    assert g.standins == 2
    assert g._stand_in(g._key(*call(2000)), *call(2000), grow_packed) is None  # nothing longer
    g._offload = True  # offloaded checkpointing: a length's capture needs an eager call of its own first
    assert g._stand_in(g._key(*call(400)), *call(400), grow_packed) is None
    monkeypatch.setenv("TURBOTUNE_GRAPH_STANDIN", "two")
    with pytest.raises(ValueError, match="TURBOTUNE_GRAPH_STANDIN"):
        graphed_call.standin_sightings()


@pytest.mark.parametrize("any_shape", ["0", "1"])
def test_first_capture_waits_for_warm_up_calls(monkeypatch, any_shape):
    """Three shapes in a row, none seen before: by default each runs eagerly (the first capture waits for two eager
    calls of its own shape); with TURBOTUNE_WARMUP_ANY_SHAPE=1 the third is captured at first sight, the two eager
    calls before it having warmed the code paths. (Captures are recorded, not made: CPU.)"""
    from turbotune.training import graphed_call
    monkeypatch.setenv("TURBOTUNE_WARMUP_ANY_SHAPE", any_shape)
    monkeypatch.setattr(graphed_call, "graph_key", lambda tensors, others: tuple(
        (k, tuple(v.shape)) for k, v in sorted(tensors.items())))
    g = graphed_call.GraphedCall(lambda **kw: None, torch.nn.Linear(2, 2))
    g._params, g.disabled_reason = [torch.zeros(1)], None
    captured = []
    monkeypatch.setattr(g, "_capture", lambda key, tensors, others, params: captured.append(key) and None)
    for length in (8, 16, 24):
        g({"input_ids": torch.zeros(1, length)}, {})
    assert captured == ([(("input_ids", (1, 24)),)] if any_shape == "1" else [])
    assert g.eager_calls == 3  # the recorded capture made no graph: its call ran eagerly
