"""The micro-batches of one optimizer step as fewer passes (step_coalescing.py): the same per-step losses, grad
norms and TRL metrics as the stock transformers + PEFT model one micro-batch at a time, passes bounded by the
budget, and micro-batches left alone where the loss is not a sum over the step's targets."""
import pytest
import torch

from turbotune.training import step_coalescing as sc
from turbotune.training import trainer_step

from tests.training.test_trainer_step import _model, _rows, assert_same_logs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_plan_passes_keeps_order_and_budget():
    assert sc.plan_passes([100, 200, 300, 50, 400], 500) == [[0, 1], [2, 3], [4]]
    assert sc.plan_passes([600, 10], 500) == [[0], [1]]  # one over the budget runs alone
    assert sc.plan_passes([], 500) == []


def test_merge_padded_pads_each_key_with_its_own_value():
    a = {"input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]), "attention_mask": torch.tensor(
        [[1, 1, 1, 0, 0], [1] * 5]), "labels": torch.tensor([[-100, 6, 7, -100, -100], [5, 6, 7, 8, 9]])}
    b = {"input_ids": torch.tensor([[3, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
         "labels": torch.tensor([[3, 4, -100]])}
    out = sc.merge_padded([a, b], pad_id=0)
    assert out["input_ids"].tolist()[2] == [3, 4, 0, 0, 0]
    assert out["attention_mask"].tolist()[2] == [1, 1, 0, 0, 0]
    assert out["labels"].tolist()[2] == [3, 4, -100, -100, -100]
    assert sc._real_lengths([a, b]) == [[3, 5], [2]]
    left = {**b, "attention_mask": torch.tensor([[0, 1, 1]])}
    assert sc._real_lengths([a, left]) is None  # left padding: not merged


def _train(folder, tmp_path, patch, name, trainer_kwargs=None, trainer_cls=None, rows=24, **config):
    model, tok = _model(folder, patch)
    settings = dict(max_steps=3, max_length=128, save_strategy="no")
    args = trl.SFTConfig(output_dir=str(tmp_path / f"{name}-{patch}"), per_device_train_batch_size=2,
                         gradient_accumulation_steps=4, learning_rate=5e-3, logging_steps=1, report_to=[],
                         bf16=False, fp16=False, seed=11, **{**settings, **config})
    trainer = (trainer_cls or trl.SFTTrainer)(model=model, args=args, processing_class=tok,
                                              train_dataset=datasets.Dataset.from_list(_rows(rows)),
                                              **(trainer_kwargs or {}))
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def test_budget_splits_a_step_into_passes_with_the_same_losses(tiny_llama_dir, tmp_path, monkeypatch):
    """max_length 96 x 2 rows: at most 192 real tokens a pass, so a step's 4 micro-batches need several."""
    tokens = []
    real = sc.merge_padded
    monkeypatch.setattr(sc, "merge_padded", lambda bs, **k: tokens.append(
        sum(int(b["attention_mask"].sum()) for b in bs)) or real(bs, **k))
    model, ours = _train(tiny_llama_dir, tmp_path, True, "budget", max_length=96)
    window = trainer_step.trainer_step_of(model).window
    assert window.steps == 3 and window.micro_batches == 12 and 3 < window.passes < 12, vars(window)
    assert tokens and max(tokens) <= 192
    assert_same_logs(ours, _train(tiny_llama_dir, tmp_path, False, "budget", max_length=96)[1], steps=3)


def test_a_loss_function_of_the_users_keeps_micro_batches_apart(tiny_llama_dir, tmp_path):
    def loss_func(outputs, labels, num_items_in_batch=None):  # a mean per micro-batch: merging would change it
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    model, ours = _train(tiny_llama_dir, tmp_path, True, "func", trainer_kwargs=dict(compute_loss_func=loss_func))
    window = trainer_step.trainer_step_of(model).window
    assert window.steps == 0 and "not a sum" in window.off_reason
    stock = _train(tiny_llama_dir, tmp_path, False, "func", trainer_kwargs=dict(compute_loss_func=loss_func))[1]
    assert [h["loss"] for h in ours] == pytest.approx([h["loss"] for h in stock], rel=1e-5)


def test_turned_off_by_the_environment(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOTUNE_COALESCE", "0")
    model, _ = _train(tiny_llama_dir, tmp_path, True, "off")
    window = trainer_step.trainer_step_of(model).window
    assert window.steps == 0 and window.off_reason == "TURBOTUNE_COALESCE=0"


def test_a_trainer_with_its_own_compute_loss_is_left_alone(tiny_llama_dir, tmp_path):
    class Custom(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model, tok = _model(tiny_llama_dir, True)
    args = trl.SFTConfig(output_dir=str(tmp_path / "custom"), per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, max_steps=1, report_to=[], save_strategy="no",
                         bf16=False, fp16=False, max_length=64)
    Custom(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(8)), processing_class=tok).train()
    window = trainer_step.trainer_step_of(model).window
    assert window.steps == 0 and "Custom's loss is not known" in window.off_reason


@pytest.mark.parametrize("setting, expected", [(None, 2 * 96), ("settings", 2 * 96), ("seen", 2 * 40),
                                              ("real", 55)])
def test_pass_budget_from_the_settings_or_from_the_batches_seen(monkeypatch, setting, expected):
    """The pass budget: per_device_train_batch_size x max_length by default; TURBOTUNE_PASS_BUDGET=seen: the largest
    padded micro-batch seen so far; =real: the most real tokens one micro-batch has had (both only grow)."""
    from types import SimpleNamespace
    if setting is None:
        monkeypatch.delenv("TURBOTUNE_PASS_BUDGET", raising=False)
    else:
        monkeypatch.setenv("TURBOTUNE_PASS_BUDGET", setting)
    hook = SimpleNamespace(window=sc.Window(), max_seq_length=lambda: 512)
    trainer = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=2, max_length=96))
    batches = [{"input_ids": torch.zeros(2, n, dtype=torch.long)} for n in (12, 40, 7)]
    assert sc._budget(trainer, batches, hook, [20, 55, 7]) == expected
    assert sc._budget(trainer, batches[:1], hook, [12]) == expected  # a later, shorter step keeps the largest seen


def test_pass_budget_switch_is_checked(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setenv("TURBOTUNE_PASS_BUDGET", "padded")
    hook = SimpleNamespace(window=sc.Window(), max_seq_length=lambda: 512)
    trainer = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=2, max_length=96))
    with pytest.raises(ValueError, match="settings, seen or real"):
        sc._budget(trainer, [{"input_ids": torch.zeros(2, 8, dtype=torch.long)}], hook, [10])
