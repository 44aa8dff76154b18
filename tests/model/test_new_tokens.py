"""New tokens trained on the fused path (text-to-speech codec tokens and the like): the vocabulary grown with
`resize_token_embeddings`, the new rows trained through PEFT's `trainable_token_indices`, the loss through the fused
head. Same loss and gradients as the stock transformers + PEFT model, and after training only the new rows moved."""
import pytest
import torch

from conftest import make_tiny_model, nonzero_lora_b
from turbotune import FastModel

NEW = 16  # codec tokens added to the vocabulary


def _model(folder, tokenizer_len, patch, tied):
    model, _ = FastModel.from_pretrained(str(folder), verbose=False, patch=patch)
    model.resize_token_embeddings(tokenizer_len + NEW)
    new_ids = list(range(tokenizer_len, tokenizer_len + NEW))
    tti = new_ids if tied else {"embed_tokens": new_ids, "lm_head": new_ids}
    peft = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1, verbose=False,
                                    trainable_token_indices=tti, use_gradient_checkpointing=False)
    nonzero_lora_b(peft)
    with torch.no_grad():  # new rows that differ from their initial values, so they matter to the loss
        for name, p in peft.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    return peft, new_ids


def _batch(vocab, new_ids):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 20), generator=g)
    ids[:, 10:] = torch.tensor(new_ids)[torch.randint(0, len(new_ids), (2, 10), generator=g)]  # "text -> codec"
    return ids


@pytest.mark.parametrize("tied", [True, False])
def test_new_token_rows_train_on_the_fused_head(tmp_path, smol_tokenizer, tied):
    folder = make_tiny_model(tmp_path / "m", smol_tokenizer, "llama", tie_word_embeddings=tied)
    n = len(smol_tokenizer)
    stock, new_ids = _model(folder, n, False, tied)
    fast, _ = _model(folder, n, True, tied)
    ids = _batch(n, new_ids)
    stock.train(), fast.train()
    out_s, out_f = stock(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
    assert out_f.logits is None  # the fused head ran, with the trained rows in its weight
    assert abs(out_f.loss.item() - out_s.loss.item()) <= 1e-5 * out_s.loss.item()
    out_s.loss.backward(), out_f.loss.backward()
    grads_s = {k: p.grad for k, p in stock.named_parameters() if p.requires_grad}
    grads_f = {k: p.grad for k, p in fast.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in k for k in grads_f) and grads_s.keys() == grads_f.keys()
    for k in grads_s:
        assert ((grads_f[k] - grads_s[k]).norm() / grads_s[k].norm()).item() < 1e-5, k


def test_only_the_new_rows_change(tmp_path, smol_tokenizer):
    folder = make_tiny_model(tmp_path / "m", smol_tokenizer, "llama", tie_word_embeddings=False)
    n = len(smol_tokenizer)
    model, new_ids = _model(folder, n, True, tied=False)
    base = model.get_base_model()
    before_in = base.get_input_embeddings().weight.detach().clone()
    before_out = base.get_output_embeddings().weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=_batch(n, new_ids), labels=_batch(n, new_ids)).loss.backward()
        opt.step(), opt.zero_grad()
    after = (base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    for before, now in zip((before_in, before_out), after):
        changed = (now.detach() != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == new_ids
