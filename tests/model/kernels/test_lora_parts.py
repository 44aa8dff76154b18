"""lora_parts' state key: the fast read of PEFT's attributes gives what PEFT's own properties give, in every state
that must change it (the fused forwards re-read a module's LoRA part when the key changes)."""
import contextlib

import pytest
import torch

peft = pytest.importorskip("peft")

from turbotune.model.kernels import lora_parts  # noqa: E402


def _slow_key(m):
    base = m.get_base_layer()
    return (m.disable_adapters, m.merged, tuple(m.active_adapters), len(m.lora_A), id(base.weight),
            base.weight.requires_grad, id(getattr(base.weight, "quant_state", None)))


@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], lora_alpha=4, init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    model.add_adapter("other", config)
    return model


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A")]


def test_fast_key_equals_peft_properties_in_every_state(lora_model):
    layers = _layers(lora_model)
    assert layers and all(lora_parts._lora_state_fast(m) is not None for m in layers)  # the fast path is taken
    seen = []

    def check():
        keys = [lora_parts.lora_state_key(m) for m in layers]
        assert keys == [_slow_key(m) for m in layers]
        seen.append(keys[0])

    check()
    with lora_model.disable_adapter():
        check()
    check()
    lora_model.set_adapter("other")
    check()
    lora_model.set_adapter("default")
    layers[0].merge()
    check()
    layers[0].unmerge()
    layers[0].get_base_layer().weight.requires_grad_(True)
    check()
    layers[0].get_base_layer().weight = torch.nn.Parameter(torch.zeros(8, 8))  # a replaced base weight
    check()
    assert len(set(seen)) == 6 and seen[0] == seen[2]  # each change changed the key; undoing one restored it


def test_modules_without_peft_attributes_take_the_slow_path():
    plain = torch.nn.Linear(3, 3)
    assert lora_parts._lora_state_fast(plain) is None
    assert lora_parts.lora_state_key(plain) == (id(plain.weight), True)


def test_cached_part_follows_the_key(lora_model):
    layer = _layers(lora_model)[0]
    first = lora_parts.cached_lora_part(layer)
    assert lora_parts.cached_lora_part(layer) is first
    with contextlib.ExitStack() as stack:
        stack.enter_context(lora_model.disable_adapter())
        assert lora_parts.cached_lora_part(layer) is not first
