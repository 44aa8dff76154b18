"""recompute.py: a checkpointed layer's recompute is marked, and the fused MLP then skips its down projection
(the output the recompute throws away) with gradients unchanged."""
import pytest
import torch

from conftest import nonzero_lora_b
from turbotune import FastModel
from turbotune.model.recompute import marking_recompute, recompute_scope, recomputing


def test_second_call_of_the_checkpointed_function_is_the_recompute():
    seen = []

    def checkpoint(fn, *args):  # a stand-in for torch.utils.checkpoint: forward, then recompute
        fn(*args)
        return fn(*args)

    wrapped = marking_recompute(checkpoint)
    assert marking_recompute(wrapped) is wrapped
    wrapped(lambda: seen.append(recomputing()))
    assert seen == [False, True] and recomputing() is False
    with recompute_scope():
        assert recomputing()
    assert not recomputing()


def _spy(monkeypatch, module, name, record):
    """Replace module.name by a wrapper that calls record(kwargs) first; returns the list it appends to."""
    seen = []
    real = getattr(module, name)
    real = getattr(real, "__wrapped__", real)  # not an earlier call's spy

    def spy(*args, **kwargs):
        seen.append(record(kwargs))
        return real(*args, **kwargs)

    spy.__wrapped__ = real
    monkeypatch.setattr(module, name, spy)
    return seen


def _one_step(folder, checkpointing, seen, **load):
    """Loss and LoRA grads of one fp32 step of a tiny Llama (what `seen` recorded is cleared first)."""
    m, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, verbose=False, **load)
    m = FastModel.get_peft_model(m, r=4, use_gradient_checkpointing=checkpointing, verbose=False, random_state=0)
    nonzero_lora_b(m)
    m.train()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    seen.clear()  # count the training step only
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return loss.detach(), grads, seen, m.config.num_hidden_layers


def _loss_grads(folder, checkpointing, monkeypatch):
    import turbotune.model.families.llama_like as ll
    flags = _spy(monkeypatch, ll, "lora_mlp", lambda kw: kw.get("output_unused", False))
    return _one_step(folder, checkpointing, flags)


@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_recompute_skips_the_down_projection_with_equal_gradients(tiny_llama_dir, checkpointing, monkeypatch):
    ref_loss, ref_grads, ref_flags, layers = _loss_grads(tiny_llama_dir, False, monkeypatch)
    loss, grads, flags, _ = _loss_grads(tiny_llama_dir, checkpointing, monkeypatch)
    assert ref_flags == [False] * layers
    assert flags == [False] * layers + [True] * layers  # forward, then each layer's recompute
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def _qlora_loss_grads(folder, checkpointing, monkeypatch):
    """4-bit tiny Llama (fp32 compute): loss, LoRA grads and the NF4 dequantisations (their slots) of one step."""
    pytest.importorskip("bitsandbytes")
    import turbotune.model.quant as quant
    calls = _spy(monkeypatch, quant, "dequantize_nf4", lambda kw: kw.get("slot"))
    return _one_step(folder, checkpointing, calls, load_in_4bit=True)


@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_qlora_recompute_keeps_gate_and_up_for_the_backward(tiny_llama_dir, checkpointing, monkeypatch):
    """The recompute's dequantised gate and up weights serve the backward: per layer 7 dequantisations in the
    forward, 6 in the recompute (down is skipped) and 5 in the backward instead of 7; and the gradients are
    those of the step without checkpointing."""
    ref_loss, ref_grads, ref_calls, layers = _qlora_loss_grads(tiny_llama_dir, False, monkeypatch)
    loss, grads, calls, _ = _qlora_loss_grads(tiny_llama_dir, checkpointing, monkeypatch)
    # without checkpointing: 7 forward and 7 backward per layer, less q/k/v's dx in the first layer (its input
    # needs no gradient; checkpointing makes the embeddings' output require one)
    assert len(ref_calls) == 14 * layers - 3
    assert len(calls) == (7 + 6 + 5) * layers
    assert calls.count("mlp-up-held") == layers  # up kept in a buffer of its own; gate in the shared one
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
