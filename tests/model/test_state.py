"""One TurboState per model (state.py): one accessor for a PEFT wrapper and its base, no other `_turbotune_*`
keys on the model, and per-model choices that stay per model."""
from types import SimpleNamespace

import torch
from torch import nn

from turbotune import FastModel
from turbotune.model.kernels import lora_parts
from turbotune.model.families import unpatch_model
from turbotune.model.state import turbo_state


def _model(folder, checkpointing="auto"):
    model, _ = FastModel.from_pretrained(str(folder), verbose=False)
    return FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=checkpointing, verbose=False)


def _turbotune_keys(obj) -> set:
    return {k for k in obj.__dict__ if k.startswith("_turbotune_")}


def test_one_state_for_the_wrapper_and_its_base(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    state = turbo_state(model)
    assert state is turbo_state(model.get_base_model()) is turbo_state(model.base_model.model)
    assert state.toggles is not None and state.patches and state.checkpointing == "auto"
    assert not state.quantized and state.quant_type is None and state.double_quant is None


def test_no_other_keys_on_the_model(tiny_llama_dir):
    for mode in ("auto", "offload"):
        model = _model(tiny_llama_dir, mode)
        assert _turbotune_keys(model) == set() and _turbotune_keys(model.base_model) == set()
        # The one key: the state itself. Per-submodule markers (an offloaded layer's saved forward, a LoRA
        # linear's cached part) stay on those submodules.
        assert _turbotune_keys(model.get_base_model()) == {"_turbotune_state"}
        if mode == "offload":
            assert turbo_state(model).offload is not None


def test_fp32_adapter_backend_is_per_model(tiny_llama_dir, monkeypatch):
    a, b = _model(tiny_llama_dir, False), _model(tiny_llama_dir, False)
    assert lora_parts.set_fp32_adapter_backend("bf16x3", a) == "auto"
    assert lora_parts.set_fp32_adapter_backend("torch", b.get_base_model()) == "auto"
    assert turbo_state(a).fp32_adapter_backend == "bf16x3" and turbo_state(b).fp32_adapter_backend == "torch"

    seen = []
    route = lora_parts._route
    monkeypatch.setattr(lora_parts, "_route", lambda w, ld, part: seen.append(part.fp32_backend) or route(w, ld, part))
    ids = torch.randint(0, a.config.vocab_size, (1, 8))
    for model, backend in ((a, "bf16x3"), (b, "torch")):
        seen.clear()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert seen and set(seen) == {backend}  # every rank-r product of this model routed on its own choice


def test_unpatch_clears_the_patch_record(tiny_llama_dir):
    model = _model(tiny_llama_dir, False)
    n = len(turbo_state(model).patches)
    assert unpatch_model(model.get_base_model()) == n > 0
    state = turbo_state(model)
    assert state.patches == {} and state.toggles is None


def test_quantisation_is_read_from_the_weights():
    linear = nn.Linear(4, 4)
    linear.weight.quant_state = SimpleNamespace(quant_type="nf4", nested=True)  # what bitsandbytes keeps there
    state = turbo_state(nn.Sequential(linear))
    assert state.quantized and (state.quant_bits, state.quant_type, state.double_quant) == (4, "nf4", True)
