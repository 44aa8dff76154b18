"""padding.grow_packed: a packed row's call grown to a longer graph's length gives the same loss and gradients
(the stand-in graphs of graphed_call.py); the rest of padding.py is tested with the trainer hook
(test_trainer_step.py)."""
import pytest
import torch

from turbotune import FastModel
from turbotune.training.padding import IGNORE_INDEX, grow_packed, remove_padding
from turbotune.training.trainer_step import _split


def _packed_call(pad_id=0):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 120, (3, 40), generator=g)
    lengths = torch.tensor([40, 23, 9])
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
    return _split(remove_padding(batch, pad_id=pad_id))


@pytest.mark.parametrize("varlen", ["1", "0"])
def test_grown_call_layout(monkeypatch, varlen):
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", varlen)
    tensors, others = _packed_call()
    assert tensors["input_ids"].shape == (1, 256)  # 72 real tokens in the smallest bucket
    grown, rest = grow_packed(tensors, others, 384, pad_id=0)
    assert grown["input_ids"].shape == grown["labels"].shape == grown["position_ids"].shape == (1, 384)
    assert torch.equal(grown["input_ids"][:, :256], tensors["input_ids"])
    assert (grown["input_ids"][0, 256:] == 0).all() and (grown["labels"][0, 256:] == IGNORE_INDEX).all()
    assert grown["position_ids"][0, 256:].tolist() == list(range(128))
    if varlen == "1":
        before, after = tensors["cu_seq_lens_q"].tolist(), grown["cu_seq_lens_q"].tolist()
        assert before[:5] == [0, 40, 63, 72, 256] and after[:5] == [0, 40, 63, 72, 384]
        assert set(after[4:]) == {384} and len(after) == len(before)
        assert rest["max_length_q"] == rest["max_length_k"] == 384
    else:
        assert "cu_seq_lens_q" not in grown and "max_length_q" not in rest


def test_grow_refuses_what_it_does_not_know():
    tensors, others = _packed_call()
    assert grow_packed(tensors, others, 256) is None  # not longer
    assert grow_packed({**tensors, "token_type_ids": tensors["input_ids"]}, others, 384) is None
    rows = {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long),
            "position_ids": torch.zeros(2, 8, dtype=torch.long)}
    assert grow_packed(rows, {}, 16) is None  # two rows: not a packed row
    assert grow_packed(tensors, {**others, "max_length_q": 100}, 384) is None


@pytest.mark.parametrize("varlen", ["1", "0"])
def test_grown_call_has_the_same_loss_and_gradients(tiny_llama_dir, monkeypatch, varlen):
    """fp32 on the CPU, the patched model: the packed call and the same call grown to a longer length."""
    from conftest import nonzero_lora_b
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", varlen)
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
    model = FastModel.get_peft_model(model, r=4, random_state=0, verbose=False, use_gradient_checkpointing=False)
    nonzero_lora_b(model)
    model.train()
    tensors, others = _packed_call()

    def run(t, o):
        model.zero_grad(set_to_none=True)
        loss = model(**t, **o).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(tensors, others)
    grown_loss, grown_grads = run(*grow_packed(tensors, others, 512, pad_id=0))
    torch.testing.assert_close(grown_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grown_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grown_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
