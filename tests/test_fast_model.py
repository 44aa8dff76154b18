"""FastModel's entry points under Unsloth's spellings: the same meaning is accepted, the rest says what to use."""
import pytest
import torch

import turbotune
from turbotune import FastModel
from turbotune._compat import is_checkpointing
from turbotune.errors import ConfigError


def lora_weights(model, kind="lora_A"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if kind in n}


def test_model_name_is_model_name_or_path(tiny_llama_dir):
    by_keyword, tok = FastModel.from_pretrained(model_name=str(tiny_llama_dir), max_seq_length=64, verbose=False)
    positional, _ = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=64, verbose=False)
    assert by_keyword.config.to_dict() == positional.config.to_dict() and tok is not None
    for (n, a), (_, b) in zip(by_keyword.state_dict().items(), positional.state_dict().items()):
        assert torch.equal(a, b), n


def test_model_name_twice_or_unknown_arguments_are_type_errors(tiny_llama_dir):
    with pytest.raises(TypeError, match="both model_name_or_path and model_name"):
        FastModel.from_pretrained(str(tiny_llama_dir), model_name=str(tiny_llama_dir))
    with pytest.raises(TypeError, match=r"unexpected arguments \['max_seq_len'\]"):
        FastModel.from_pretrained(model_name=str(tiny_llama_dir), max_seq_len=64)


@pytest.mark.parametrize("option, hint", [
    (dict(load_in_8bit=True), "load_in_4bit=True"),
    (dict(full_finetuning=True), "LoRA adapters only"),
    (dict(fast_inference=True), "for_inference"),
    (dict(load_in_16bit=True, load_in_4bit=True), "contradict"),
    (dict(use_gradient_checkpointing="sometimes"), "'unsloth'"),
])
def test_unsloth_load_options_without_a_counterpart_say_what_to_use(tiny_llama_dir, option, hint):
    with pytest.raises(ConfigError, match=hint):
        FastModel.from_pretrained(model_name=str(tiny_llama_dir), verbose=False, **option)


def test_unsloth_load_options_with_the_same_meaning_load(tiny_llama_dir):
    model, _ = FastModel.from_pretrained(model_name=str(tiny_llama_dir), max_seq_length=64, dtype=None,
                                         load_in_4bit=False, load_in_8bit=False, load_in_16bit=True,
                                         full_finetuning=False, fast_inference=False,
                                         use_gradient_checkpointing="unsloth", token=None, verbose=False)
    assert not getattr(model, "is_loaded_in_4bit", False)


def test_unsloth_get_peft_model_keywords(tiny_llama_dir):
    """The tutorial call: bias="none", use_gradient_checkpointing="unsloth" (recompute), random_state (the
    adapters' seed), use_rslora, loftq_config=None, and max_seq_length / temporary_location, unused there too."""
    def build(seed, **extra):
        base, _ = FastModel.from_pretrained(model_name=str(tiny_llama_dir), verbose=False)
        return FastModel.get_peft_model(
            base, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=seed,
            use_rslora=False, loftq_config=None, max_seq_length=64, temporary_location="_unsloth_tmp",
            verbose=False, **extra)

    model = build(3407)
    assert is_checkpointing(model)
    config = model.peft_config["default"]
    assert config.bias == "none" and not config.use_rslora and config.r == 8 and config.lora_alpha == 16
    again, other = lora_weights(build(3407)), lora_weights(build(1))
    first = lora_weights(model)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)

    rslora = FastModel.get_peft_model(FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)[0], r=4,
                                      lora_alpha=8, use_rslora=True, verbose=False)
    q = rslora.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


@pytest.mark.parametrize("option, hint", [
    (dict(qat_scheme="int4"), "quantisation-aware"),
    (dict(finetune_last_n_layers=2), "layers_to_transform"),
])
def test_unsloth_lora_options_without_a_counterpart(tiny_llama_dir, option, hint):
    base, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    with pytest.raises(ConfigError, match=hint):
        FastModel.get_peft_model(base, r=4, verbose=False, **option)


def test_one_call_form_routes_unsloth_options(tiny_llama_dir):
    model, tok = turbotune.get_peft_model(model_name=str(tiny_llama_dir), max_seq_length=64, r=4, bias="none",
                                          use_gradient_checkpointing="unsloth", random_state=7, loftq_config=None,
                                          verbose=False)
    assert model.peft_config["default"].r == 4 and tok is not None
    with pytest.raises(ConfigError, match="load_in_4bit=True"):
        turbotune.get_peft_model(model_name=str(tiny_llama_dir), load_in_8bit=True, r=4, verbose=False)


def test_checkpointing_is_planned_unless_chosen(tiny_llama_dir):
    """FastModel.get_peft_model without use_gradient_checkpointing leaves the mode to the planner ("auto": recompute
    until a trainer's first batch gives the shapes); a choice stays the caller's."""
    from turbotune.model.state import turbo_state
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    peft_model = FastModel.get_peft_model(model, r=4, verbose=False)
    assert turbo_state(peft_model).checkpointing == "auto" and is_checkpointing(peft_model)
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    peft_model = FastModel.get_peft_model(model, r=4, verbose=False, use_gradient_checkpointing=True)
    assert turbo_state(peft_model).checkpointing is None and is_checkpointing(peft_model)


def test_for_training_after_for_inference_checkpoints_again(tiny_llama_dir):
    """for_inference switches checkpointing off; for_training(model, True) switches it back on, also with the
    trainer hook standing in for the PEFT wrapper's switch."""
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    peft_model = FastModel.get_peft_model(model, r=4, verbose=False, use_gradient_checkpointing=True)
    FastModel.for_inference(peft_model)
    assert not is_checkpointing(peft_model) and not peft_model.training
    FastModel.for_training(peft_model, True)
    assert is_checkpointing(peft_model) and peft_model.training
