"""TURBOTUNE_DEFER_BACKWARD=1 (deferred_backward.py): the step's last backward runs when transformers first asks
for the gradients, so the per-step losses, grad norms and trained weights are those of the stock transformers +
PEFT model; it defers only inside transformers' own loop, and an abandoned step's backward is dropped."""
import pytest
import torch

from turbotune.training import deferred_backward as db
from turbotune.training import trainer_step

from tests.training.test_step_coalescing import _train
from tests.training.test_trainer_step import assert_same_logs

pytest.importorskip("trl")


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("max_length", [128, 96])  # 96: a step needs several passes, the last one deferred
def test_same_logs_and_weights_with_the_backward_deferred(tiny_llama_dir, tmp_path, monkeypatch, max_length):
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "1")
    before = db.launched
    model, deferred = _train(tiny_llama_dir, tmp_path, True, f"defer{max_length}", max_length=max_length)
    assert db.launched - before == 3, "each of the 3 optimizer steps should have deferred its last backward"
    assert trainer_step.trainer_step_of(model).window.steps == 3
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "0")
    plain_model, plain = _train(tiny_llama_dir, tmp_path, True, f"now{max_length}", max_length=max_length)
    assert db.launched - before == 3
    assert [h["loss"] for h in deferred] == [h["loss"] for h in plain]
    assert [h["grad_norm"] for h in deferred] == [h["grad_norm"] for h in plain]
    a, b = _lora(model), _lora(plain_model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert_same_logs(deferred, _train(tiny_llama_dir, tmp_path, False, f"stock{max_length}",
                                      max_length=max_length)[1], steps=3)


class _Trainer:
    """Just what deferred_backward reads of a trainer."""

    class args:
        optim = "adamw_torch"

    def __init__(self):
        self.accelerator = type("Acc", (), {"num_processes": 1, "backward": lambda self, loss: None})()

    _get_grad_norm = db._flushing(lambda self, model, grad_norm=None: grad_norm)


def test_defers_only_inside_the_training_loop_and_when_switched_on(monkeypatch):
    t = _Trainer()
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "1")
    assert not db.can_defer(t)  # a script calling training_step itself: the backward runs at once
    seen = []
    db._marking_the_loop(lambda self: seen.append(db.can_defer(self)))(t)
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "0")
    db._marking_the_loop(lambda self: seen.append(db.can_defer(self)))(t)
    assert seen == [True, False] and not db.can_defer(t)
    monkeypatch.delenv("TURBOTUNE_DEFER_BACKWARD")
    assert db.deferred_backward_enabled()  # on by default (measured, fifteenth session)

    class Own(_Trainer):  # a trainer whose gradient norm is its own (or a transformers without one): no flush
        def _get_grad_norm(self, model, grad_norm=None):
            return grad_norm
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "1")
    seen.clear()
    db._marking_the_loop(lambda self: seen.append(db.can_defer(self)))(Own())
    del Own._get_grad_norm, _Trainer._get_grad_norm
    db._marking_the_loop(lambda self: seen.append(db.can_defer(self)))(Own())
    _Trainer._get_grad_norm = db._flushing(lambda self, model, grad_norm=None: grad_norm)
    assert seen == [False, False]


def test_deferring_records_the_call_and_a_flush_runs_it_once():
    t = _Trainer()
    calls = []
    t.accelerator.backward = lambda loss, **k: calls.append((loss, k))  # an instance attribute: restored after
    own = t.accelerator.backward
    with db.deferring(t):
        t.accelerator.backward("loss", scale=2)
        assert calls == []
    assert t.accelerator.backward is own
    t._get_grad_norm(None)  # transformers' first look at the gradients runs it
    t._get_grad_norm(None)
    assert calls == [("loss", {"scale": 2})]
    plain = _Trainer()
    with db.deferring(plain):
        pass
    assert "backward" not in plain.accelerator.__dict__  # the class's method again


def test_a_step_abandoned_by_an_exception_drops_its_backward():
    t = _Trainer()
    ran = []

    def loop(self):
        with db.deferring(self):
            self.accelerator.backward("loss")
        raise KeyboardInterrupt

    t.accelerator.backward = lambda loss, **k: ran.append(loss)
    with pytest.raises(KeyboardInterrupt):
        db._marking_the_loop(loop)(t)
    db.flush(t)
    assert ran == [] and not t.__dict__.get(db._IN_LOOP)


def test_without_clipping_the_grad_norm_call_runs_the_backward(tiny_llama_dir, tmp_path, monkeypatch):
    """max_grad_norm 0: transformers skips _clip_grad_norm and asks _get_grad_norm for the norm only; the deferred
    backward runs there, before the optimizer step."""
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "1")
    before = db.launched
    model, deferred = _train(tiny_llama_dir, tmp_path, True, "noclip-defer", max_grad_norm=0.0)
    assert db.launched - before == 3
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "0")
    plain_model, plain = _train(tiny_llama_dir, tmp_path, True, "noclip-now", max_grad_norm=0.0)
    assert [h["loss"] for h in deferred] == [h["loss"] for h in plain]
    a, b = _lora(model), _lora(plain_model)
    assert all(torch.equal(a[n], b[n]) for n in a)
