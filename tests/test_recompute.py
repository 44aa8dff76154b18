"""recompute.py: a checkpointed layer's recompute is marked, and the fused MLP then skips its down projection
(the output the recompute throws away) with gradients unchanged."""
import pytest
import torch

from conftest import nonzero_lora_b
from turbotune import FastModel
from turbotune.recompute import marking_recompute, recompute_scope, recomputing


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


def _loss_grads(folder, checkpointing, monkeypatch):
    import turbotune.models.llama_like as ll
    from turbotune.kernels.fused_lora import lora_mlp as real
    flags = []

    def spy(*args, **kwargs):
        flags.append(kwargs.get("output_unused", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(ll, "lora_mlp", spy)
    m, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, verbose=False)
    m = FastModel.get_peft_model(m, r=4, use_gradient_checkpointing=checkpointing, verbose=False, random_state=0)
    nonzero_lora_b(m)
    m.train()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return loss.detach(), grads, flags, m.config.num_hidden_layers


@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_recompute_skips_the_down_projection_with_equal_gradients(tiny_llama_dir, checkpointing, monkeypatch):
    ref_loss, ref_grads, ref_flags, layers = _loss_grads(tiny_llama_dir, False, monkeypatch)
    loss, grads, flags, _ = _loss_grads(tiny_llama_dir, checkpointing, monkeypatch)
    assert ref_flags == [False] * layers
    assert flags == [False] * layers + [True] * layers  # forward, then each layer's recompute
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
