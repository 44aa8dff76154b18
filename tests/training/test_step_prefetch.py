"""TURBOTUNE_PREFETCH_STEP=1 (step_prefetch.py): the next step's micro-batches are pulled before the trainer's log
waits for the device; the trainer sees the same batches in the same order, across epochs whose last step is
short, and logs the same losses as without it and as the stock transformers + PEFT model."""
import pytest

from turbotune.training import step_prefetch as sp

from tests.training.test_step_coalescing import _train
from tests.training.test_trainer_step import assert_same_logs

trl = pytest.importorskip("trl")


def _recording():
    seen = []

    class Recording(trl.SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            seen.append(inputs["input_ids"].tolist())
            return super().training_step(model, inputs, *args, **kwargs)
    return Recording, seen


def _run(folder, tmp_path, patch, name, **config):
    cls, seen = _recording()
    config = {"max_steps": -1, "num_train_epochs": 2, **config}
    model, logs = _train(folder, tmp_path, patch, name, trainer_cls=cls, rows=22, **config)
    return logs, seen


def test_same_batches_and_losses_with_the_next_step_pulled_ahead(tiny_llama_dir, tmp_path, monkeypatch):
    """22 rows, 2 a micro-batch, 4 a step: 11 micro-batches an epoch, so each epoch ends with a step of 3."""
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "1")
    before = sp.prefetches
    ahead, seen_ahead = _run(tiny_llama_dir, tmp_path, True, "ahead")
    # pulled after steps 1, 2 (3 batches: the loader's last), 4 and 5; after step 3 the epoch's loader is spent
    # and after step 6 training stops
    assert sp.prefetches - before == 4
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "0")
    plain, seen_plain = _run(tiny_llama_dir, tmp_path, True, "plain")
    assert sp.prefetches - before == 4
    assert len(seen_ahead) == 22 and seen_ahead == seen_plain
    assert [h["loss"] for h in ahead] == [h["loss"] for h in plain] and len(ahead) == 6
    assert [h["grad_norm"] for h in ahead] == [h["grad_norm"] for h in plain]
    assert_same_logs(ahead, _run(tiny_llama_dir, tmp_path, False, "stock")[0], steps=6)


def test_not_pulled_before_a_step_that_saves(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "1")
    before = sp.prefetches
    logs, seen = _run(tiny_llama_dir, tmp_path, True, "saves", num_train_epochs=1, save_strategy="steps",
                      save_steps=2)
    assert sp.prefetches - before == 1  # after step 1 only: step 2 saves, step 3 ends training
    assert len(seen) == 11 and len(logs) == 3
    assert (tmp_path / "saves-True" / "checkpoint-2").is_dir()


class _Control:
    should_log, should_save, should_evaluate, should_training_stop, should_epoch_stop = True, False, False, False, False


class _Trainer:
    """What step_prefetch reads of a trainer, with a plain iterator as the loop's."""

    def __init__(self, ga=3):
        self.args = type("Args", (), {"gradient_accumulation_steps": ga})()
        self.control = _Control()
        self.state = type("State", (), {"global_step": 1, "max_steps": 10})()
        self.model = object()

    def _get_num_items_in_batch(self, batches, device):
        return sum(batches)

    def get_batch_samples(self, it, n, device):
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                break
        return out, self._get_num_items_in_batch(out, device)


def test_serving_kept_batches_first_then_the_iterator(monkeypatch):
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "1")
    t = _Trainer(ga=3)
    serve = sp._serving(_Trainer.get_batch_samples)
    it = (x for x in range(1, 9))  # a generator, as accelerate's loader is (weak references)
    assert serve(t, it, 2, "cpu") == ([1, 2], 3)
    sp._pull(t)  # 3, 4, 5 kept
    assert serve(t, it, 2, "cpu") == ([3, 4], 7)  # fewer asked than kept: 5 waits
    assert serve(t, it, 3, "cpu") == ([5, 6, 7], 18)  # more asked: the rest from the iterator
    sp._pull(t)  # 8, then the iterator's end
    assert serve(t, iter([20, 30]), 2, "cpu") == ([20, 30], 50)  # a new iterator (a new epoch): kept ones dropped


def test_should_pull_only_where_a_log_waits(monkeypatch):
    from turbotune.training import trainer_step

    t = _Trainer()
    monkeypatch.setattr(trainer_step, "trainer_step_of", lambda model: object())
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "1")
    assert not sp._should_pull(t)  # no iterator read yet
    it = (x for x in range(5))
    sp._serving(_Trainer.get_batch_samples)(t, it, 1, "cpu")
    assert sp._should_pull(t)
    for flag, value in (("should_log", False), ("should_save", True), ("should_evaluate", True),
                        ("should_training_stop", True), ("should_epoch_stop", True)):
        setattr(t.control, flag, value)
        assert not sp._should_pull(t), flag
        setattr(t.control, flag, not value)
    monkeypatch.setattr(trainer_step, "trainer_step_of", lambda model: None)  # not turbotune's model
    assert not sp._should_pull(t)
    monkeypatch.setattr(trainer_step, "trainer_step_of", lambda model: object())
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "0")
    assert not sp._should_pull(t)
    monkeypatch.delenv("TURBOTUNE_PREFETCH_STEP")
    assert not sp.step_prefetch_enabled()  # off by default until measured on a GPU
