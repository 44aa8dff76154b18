"""TRL's preference trainers on a turbotune model, unmodified: the first steps' losses, grad norms and every LoRA
gradient equal the stock transformers + PEFT model's under the same trainer (fp32, CPU). Their losses
need each sample's own row (per-sequence log-probs), so the hook keeps rows for them (trainer_step.keep_rows):
padding is removed where turbotune's fused head serves TRL's (DPO's mean logits included) and its per-token outputs
go back in rows."""
import pytest
import torch
from transformers import TrainerCallback

from turbotune.training import padding as padding_mod
from turbotune.training import trainer_step

from tests.training.test_trainer_step import _model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


def _say(i, n):
    return [{"role": "assistant", "content": " ".join(WORDS[(i + j) % 8] for j in range(n))}]


def _dpo_rows(n=16):
    return [{"prompt": [{"role": "user", "content": f"Item {i}?"}], "chosen": _say(i, 2 + i % 5),
             "rejected": _say(3 * i, 1 + i % 7)} for i in range(n)]


def _kto_rows(n=16):
    return [{"prompt": [{"role": "user", "content": f"Item {i}?"}], "completion": _say(i, 1 + i % 6),
             "label": i % 3 != 0} for i in range(n)]


def _train(folder, tmp_path, patch, trainer_cls, config_cls, rows, **extra):
    model, tok = _model(folder, patch)
    args = config_cls(output_dir=str(tmp_path / f"{trainer_cls.__name__}-{patch}"), per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5, optim="sgd", logging_steps=1,
                      report_to=[], save_strategy="no", bf16=False, fp16=False, seed=7, **extra)
    # SGD: Adam's normalisation would turn float-order noise in near-zero gradients into full-size steps, and
    # the later steps would compare different weights
    grads = []  # every LoRA gradient at each optimizer step, as the optimizer gets it

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if "lora_" in n and p.grad is not None})

    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Grads()])
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h], grads


def _orpo_classes():
    from turbotune.errors import ConfigError
    from turbotune.training.preference import trl_classes
    try:
        return trl_classes("orpo")  # trl.experimental.orpo in TRL 1.x
    except ConfigError as e:
        pytest.skip(str(e))


def test_orpo_trainer_equals_stock(tiny_llama_dir, tmp_path):
    """ORPOTrainer calls the model without labels and computes its own log-probs from the logits: turbotune's
    patched layers run, the stock head gives the logits; losses and every LoRA gradient equal the stock model's."""
    trainer_cls, config_cls = _orpo_classes()
    model, ours, grads = _train(tiny_llama_dir, tmp_path, True, trainer_cls, config_cls, _dpo_rows(),
                                remove_unused_columns=False)
    assert trainer_step.trainer_step_of(model) is not None
    _, stock, stock_grads = _train(tiny_llama_dir, tmp_path, False, trainer_cls, config_cls, _dpo_rows(),
                                   remove_unused_columns=False)
    _assert_equal_steps(ours, stock, grads, stock_grads)


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_preference_trainer_equals_stock(tiny_llama_dir, tmp_path, name, monkeypatch):
    trainer_cls, config_cls, rows = {"dpo": (trl.DPOTrainer, trl.DPOConfig, _dpo_rows()),
                                     "kto": (trl.KTOTrainer, trl.KTOConfig, _kto_rows())}[name]
    served, packed = [], []
    real_head, real_remove = trainer_step.fused_head_forward, padding_mod.remove_padding
    monkeypatch.setattr(trainer_step, "fused_head_forward", lambda *a, **k: (
        lambda out: served.append((out is not None, torch.is_grad_enabled())) or out)(real_head(*a, **k)))
    monkeypatch.setattr(padding_mod, "remove_padding",
                        lambda b, **k: (lambda out: packed.append(out is not b) or out)(real_remove(b, **k)))
    model, ours, grads = _train(tiny_llama_dir, tmp_path, True, trainer_cls, config_cls, rows)
    step = trainer_step.trainer_step_of(model)
    assert step is not None and step.keep_rows and step.window.steps == 0  # rows kept, micro-batches apart
    assert served and all(ok for ok, _ in served) and any(packed)  # turbotune's head (DPO's mean_logits too)
    # the policy's calls (with grad) and the reference passes (without) both on turbotune's head
    assert {grad for _, grad in served} == {True, False}
    _, stock, stock_grads = _train(tiny_llama_dir, tmp_path, False, trainer_cls, config_cls, rows)
    _assert_equal_steps(ours, stock, grads, stock_grads)


def _assert_equal_steps(ours, stock, grads, stock_grads):
    """Three logged steps with equal losses and grad norms, and every LoRA gradient equal at each optimizer step."""
    assert len(ours) == len(stock) == 3
    for a, b in zip(ours, stock):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (ours, stock)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_same_lora_grads(grads, stock_grads)


def assert_same_lora_grads(grads, stock_grads):
    """Three optimizer steps, each LoRA tensor's gradient equal to stock's within 1e-5 of its size."""
    assert len(grads) == len(stock_grads) == 3 and len(grads[0]) > 0
    for i, (step_grads, stock_step) in enumerate(zip(grads, stock_grads)):
        assert step_grads.keys() == stock_step.keys()
        for n, g in step_grads.items():
            assert (g - stock_step[n]).norm() <= 1e-5 * stock_step[n].norm() + 1e-9, (i, n)
