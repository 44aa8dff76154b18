"""Gemma 2 with TURBOTUNE_SOFTCAP_ATTENTION=1: whole sequences reach the patched attention as PLAIN_CAUSAL (no
[B, 1, L, L] mask) and run the soft-capped attention (kernels/softcap_attention.py; its reference on the CPU);
values and LoRA gradients equal the stock model's eager attention with transformers' masks."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import assert_same_loss_and_lora_grads, make_tiny_model, nonzero_lora_b  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune.model.families import llama_like  # noqa: E402


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, smol_tokenizer):
    # a cap small enough to bind on a tiny random model's scores; a sliding-window layer shorter than the batch
    return make_tiny_model(tmp_path_factory.mktemp("gemma2-cap"), smol_tokenizer, "gemma2", head_dim=16,
                           sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=0.5)


def _model(folder, patch, checkpointing):
    model, _ = FastModel.from_pretrained(str(folder), verbose=False, patch=patch)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, random_state=5, verbose=False,
                                     use_gradient_checkpointing=checkpointing)
    return nonzero_lora_b(model)


@pytest.fixture
def spied(monkeypatch):
    calls = []
    real = llama_like.softcap_attention
    monkeypatch.setattr(llama_like, "softcap_attention", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_sequences_take_the_softcap_attention(gemma2_dir, checkpointing, monkeypatch, spied):
    monkeypatch.setenv("TURBOTUNE_SOFTCAP_ATTENTION", "1")
    stock, fast = _model(gemma2_dir, False, checkpointing), _model(gemma2_dir, True, checkpointing)
    ids = torch.randint(0, stock.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_same_loss_and_lora_grads(stock, fast, input_ids=ids, labels=ids)
    # both layer kinds, forward (and the recompute with checkpointing): the sliding layer with its window
    assert set(spied) == {None, 8} and len(spied) == (4 if checkpointing else 2)


@pytest.mark.parametrize("varlen", ["0", "1"])
def test_padded_batches(gemma2_dir, monkeypatch, spied, varlen):
    """A right-padded batch: with the varlen offsets (the default) the padding is removed and each sample runs on
    the kernels (both layer kinds); with TURBOTUNE_FLASH_VARLEN=0 transformers' masks are kept (no kernels).
    Either way the loss and LoRA gradients are the stock model's."""
    monkeypatch.setenv("TURBOTUNE_SOFTCAP_ATTENTION", "1")
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", varlen)
    stock, fast = _model(gemma2_dir, False, False), _model(gemma2_dir, True, False)
    ids = torch.randint(0, stock.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    assert_same_loss_and_lora_grads(stock, fast, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert (set(spied) == {None, 8}) if varlen == "1" else spied == []


def test_off_by_default(gemma2_dir, monkeypatch, spied):
    monkeypatch.delenv("TURBOTUNE_SOFTCAP_ATTENTION", raising=False)
    fast = _model(gemma2_dir, True, False)
    fast.train()
    ids = torch.randint(0, fast.config.vocab_size, (1, 12))
    fast(input_ids=ids, labels=ids).loss.backward()
    assert spied == []


def test_packed_rows_under_sfttrainer_take_the_kernels_per_sample(gemma2_dir, tmp_path, monkeypatch, spied,
                                                                 smol_tokenizer):
    """SFTTrainer's padded batches become packed rows with sample offsets (TURBOTUNE_FLASH_VARLEN=1): Gemma 2's
    soft-capped attention then runs per sample from the offsets; the logged losses equal the stock model's."""
    import datasets
    import trl

    def run(patch):
        model = _model(gemma2_dir, patch, False)
        rows = [{"text": " ".join(["alpha", "beta", "gamma"][(i + j) % 3] for j in range(3 + (i * 5) % 17))}
                for i in range(16)]
        args = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{patch}"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, max_steps=3, learning_rate=5e-3, logging_steps=1,
                             report_to=[], save_strategy="no", bf16=False, fp16=False, seed=7, max_length=64)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=smol_tokenizer)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    monkeypatch.setenv("TURBOTUNE_SOFTCAP_ATTENTION", "1")
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1")
    ours = run(True)
    assert spied, "the packed rows did not reach the soft-capped attention"
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "0")
    stock = run(False)
    assert ours == pytest.approx(stock, rel=1e-5)
