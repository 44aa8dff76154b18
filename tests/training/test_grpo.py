"""TRL's GRPOTrainer on a turbotune model, unmodified (training/grpo.py).

(a) The first three steps' losses, grad norms and every LoRA gradient equal the stock transformers + PEFT model's
under the same trainer (fp32, CPU, same seeds: both generate the same completions), with turbotune's fused head
serving GRPO's log-probs on packed rows, generation running on the KV cache with the adapter on, and gradient
checkpointing back on after every generation. (b) GRPO really trains the real SmolLM2-135M-Instruct: the mean
reward of the last steps is above that of the first."""
import re
import time

import pytest
import torch
from transformers import TrainerCallback

from turbotune import FastModel
from turbotune._compat import has_cache, is_checkpointing, unwrap_peft
from turbotune.training import padding as padding_mod
from turbotune.training import trainer_step

from conftest import nonzero_lora_b

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tests.training.test_preference_trainers import assert_same_lora_grads  # noqa: E402


def _model(folder, patch):
    """The tiny model with LoRA (B away from zero) and checkpointing chosen, not planned: GRPO switches it off and
    on around every generation."""
    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=256, patch=patch, verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407, use_gradient_checkpointing=True,
                                     verbose=False)
    return nonzero_lora_b(model), tok


def _prompts(n=16):
    return [{"prompt": [{"role": "user", "content": f"Item {i}?" + " more" * (i % 5)}]} for i in range(n)]


def _length_reward(completions, **kwargs):
    """Differs between the completions of a group (random tokens of a random model): advantages are not zero."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def _watch(model, patch, monkeypatch):
    """Records, for the run: each decoding step of generation (KV cache passed, adapter on), checkpointing and
    grad at every call of turbotune's head, whether the head served TRL's and whether rows were packed."""
    seen = {"decode": [], "checkpointing": [], "served": [], "packed": []}
    lora = next(m for m in model.modules() if hasattr(m, "lora_A"))

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_grad_enabled() and has_cache(kwargs) and ids is not None and ids.shape[1] == 1:
            seen["decode"].append(not lora.disable_adapters)

    unwrap_peft(model).model.register_forward_pre_hook(before, with_kwargs=True)
    if patch:
        real_head, real_remove = trainer_step.fused_head_forward, padding_mod.remove_padding

        def head(*args, **kwargs):
            seen["checkpointing"].append((torch.is_grad_enabled(), is_checkpointing(model)))
            out = real_head(*args, **kwargs)
            seen["served"].append(out is not None)
            return out

        def remove(batch, **kwargs):
            out = real_remove(batch, **kwargs)
            seen["packed"].append(out is not batch)
            return out

        monkeypatch.setattr(trainer_step, "fused_head_forward", head)
        monkeypatch.setattr(padding_mod, "remove_padding", remove)
    return seen


def _train(folder, tmp_path, patch, monkeypatch, **config):
    model, tok = _model(folder, patch)
    seen = _watch(model, patch, monkeypatch)
    rollouts = []

    def reward(completions, **kwargs):
        rollouts.append([c[0]["content"] for c in completions])
        return _length_reward(completions)

    args = trl.GRPOConfig(output_dir=str(tmp_path / f"grpo-{patch}"), per_device_train_batch_size=4,
                          num_generations=4, gradient_accumulation_steps=2, max_steps=3, max_completion_length=8,
                          learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[], save_strategy="no",
                          bf16=False, fp16=False, seed=7, **config)
    grads = []  # every LoRA gradient at each optimizer step (SGD: see test_preference_trainers.py)

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if "lora_" in n and p.grad is not None})

    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_prompts()),
                              processing_class=tok, reward_funcs=reward, callbacks=[Grads()])
    trainer.train()
    assert is_checkpointing(model), "gradient checkpointing did not come back after generation"
    return model, [h for h in trainer.state.log_history if "loss" in h], grads, rollouts, seen


@pytest.mark.parametrize("config", [{}, dict(temperature=0.7, beta=0.04, num_iterations=2)],
                         ids=["defaults", "temperature_kl_iterations"])
def test_grpo_equals_stock(tiny_llama_dir, tmp_path, monkeypatch, config):
    model, ours, grads, completions, seen = _train(tiny_llama_dir, tmp_path, True, monkeypatch, **config)
    assert trainer_step.trainer_step_of(model).keep_rows
    assert seen["served"] and all(seen["served"]) and all(seen["packed"]) and len(seen["packed"]) == 6
    # restored after each generation, before the training calls (the no-grad log-prob passes run paused)
    assert all(on for grad, on in seen["checkpointing"] if grad)
    # beta > 0 and two iterations: the reference and old-policy log-probs (no grad) on turbotune's head too
    assert {grad for grad, _ in seen["checkpointing"]} == ({True, False} if config else {True})
    assert seen["decode"] and all(seen["decode"])  # generation on the KV cache, adapter on
    monkeypatch.undo()
    _, stock, stock_grads, stock_completions, _ = _train(tiny_llama_dir, tmp_path, False, monkeypatch, **config)
    assert completions == stock_completions  # the same rollouts, so the same losses are owed
    assert len(ours) == len(stock) == 3
    for a, b in zip(ours, stock):
        # GRPO's loss sums O(1) advantage terms that cancel (0 on policy with beta 0): compared with an absolute
        # floor of a few float32 ulps of those terms (the policy and reference log-probs both on turbotune's head
        # round differently from TRL's: -1.0e-7 against 0.0 at step 1 of the KL case)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=5e-7), (ours, stock)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a.get("reward") == b.get("reward")  # logged at the steps that generated
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    assert_same_lora_grads(grads, stock_grads)


def test_head_serves_grpo_rows(tiny_llama_dir, monkeypatch):
    """GRPO's call (rows: a left-padded prompt, then a completion, right-padded where it ended early; TRL's head set
    up with the sampling temperature) through the hook: rows rotated and packed, log-probs, entropies and LoRA
    gradients equal TRL's head on the padded rows. A temperature on soft-capped logits keeps TRL's head."""
    from trl.trainer.utils import add_fused_lm_head

    packed = []
    real_remove = padding_mod.remove_padding
    monkeypatch.setattr(padding_mod, "remove_padding",
                        lambda b, **k: (lambda out: packed.append(out is not b) or out)(real_remove(b, **k)))
    model, _ = _model(tiny_llama_dir, True)
    causal_lm = unwrap_peft(model)
    add_fused_lm_head(causal_lm, temperature=0.7, outputs=("log_probs", "entropy"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a shorter prompt
    mask[1, -4:] = 0  # a completion that ended early
    mask[2, :2], mask[2, -3:] = 0, 0  # both
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt is not scored
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=gen)
    model.train()
    trainer_step.trainer_step_of(model).keep_rows = True  # as the trainer wrap sets it for GRPO

    def run(forward):
        model.zero_grad()
        out = forward(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs * weights).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    ours, our_grads = run(model)
    assert packed == [True]
    theirs, their_grads = run(causal_lm)  # TRL's head, under the PEFT wrapper and its hook
    for name in ("log_probs", "entropy", "label_mask"):
        assert torch.allclose(getattr(ours, name).float(), getattr(theirs, name).float(), rtol=1e-5, atol=1e-6), name
    for n, g in our_grads.items():
        assert (g - their_grads[n]).norm() <= 1e-5 * their_grads[n].norm() + 1e-9, n
    causal_lm.config.final_logit_softcapping = 30.0
    assert "temperature" in trainer_step.fused_head_refusal(model)


def test_checkpointing_comes_back_after_a_pause(tiny_llama_dir):
    """The checkpointing off switch is a pause that the trainer's on switch ends (TRL around generation); a
    deliberate switch-off (for_inference) stays off when a trainer later switches it on."""
    model, _ = _model(tiny_llama_dir, True)
    model.train()
    assert is_checkpointing(model)
    model.gradient_checkpointing_disable()  # TRL's unwrap_model_for_generation
    assert not is_checkpointing(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
    assert is_checkpointing(model)
    FastModel.for_inference(model)
    model.train()
    model.gradient_checkpointing_enable()
    assert not is_checkpointing(model)


def _rewards(trainer):
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


def test_grpo_learns_on_smollm2(smol_dir, tmp_path, monkeypatch):
    """GRPO on the real SmolLM2-135M-Instruct, CPU-sized: addition questions that ask for "a number only", reward
    1 for a completion that starts with a digit (the answer's format, not its correctness, which stayed near 0
    for a dozen steps: a format is what a 135M model learns in ten steps on a CPU). Seed 0's rewards per step:
    0.125 0.375 0.5 0.625 0.875 0.875 0.875 1 1 1 (seeds 1 and 2: first three 0.5 and 0.46 on average, last 1)."""
    served = []
    real_head = trainer_step.fused_head_forward
    monkeypatch.setattr(trainer_step, "fused_head_forward",
                        lambda *a, **k: (lambda out: served.append(out is not None) or out)(real_head(*a, **k)))
    start = time.perf_counter()
    model, tok = FastModel.from_pretrained(str(smol_dir), max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=False, verbose=False)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}? Answer with a number only."}]}
            for a in range(1, 8) for b in range(1, 8)]

    def starts_with_digit(completions, **kwargs):
        return [1.0 if re.match(r"\s*\d", c[0]["content"]) else 0.0 for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo-smol"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, max_steps=10, learning_rate=1e-3, lr_scheduler_type="constant",
                          logging_steps=1, report_to=[], save_strategy="no", bf16=False, fp16=False, use_cpu=True,
                          seed=0)
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok, reward_funcs=starts_with_digit)
    trainer.train()
    rewards = _rewards(trainer)
    print(f"GRPO on SmolLM2-135M: {time.perf_counter() - start:.0f} s, rewards per step {rewards}")
    assert served and all(served)  # turbotune's head served GRPO's log-probs
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, rewards
