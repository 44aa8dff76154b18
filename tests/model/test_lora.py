"""LoRA: parameter counts, defaults, the one-call form, seeding."""
import pytest
import torch

import turbotune
from turbotune import FastModel
from turbotune.errors import ConfigError
from turbotune.model.loader import count_parameters


def _expected_lora_params(cfg, r):
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = r * (h + q) + 2 * r * (h + kv) + r * (q + h) + 2 * r * (h + i) + r * (i + h)
    return per_layer * cfg.num_hidden_layers


def test_lora_parameter_count(tiny_llama_dir, capsys):
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    total_before = sum(p.numel() for p in model.parameters())
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16)
    trainable, total = count_parameters(model)
    assert trainable == _expected_lora_params(model.config, 8)
    assert total == total_before + trainable
    names = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"} or names <= {"default"}  # PEFT names: ...lora_A.default.weight
    out = capsys.readouterr().out
    assert f"trainable {trainable:,}" in out


def test_default_targets_are_all_seven(tiny_llama_dir):
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, verbose=False)
    assert set(model.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 16


def test_random_state_makes_init_reproducible(tiny_llama_dir):
    def init(seed):
        m, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
        m = FastModel.get_peft_model(m, r=4, random_state=seed, verbose=False)
        return m.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(init(1), init(1))
    assert not torch.equal(init(1), init(2))


def test_one_call_form(tiny_llama_dir):
    model, tok = turbotune.get_peft_model(model_name=str(tiny_llama_dir), max_seq_length=128, load_in_4bit=True,
                                          r=4, verbose=False)
    assert model.peft_config["default"].r == 4
    assert tok.model_max_length == 128
    trainable, _ = count_parameters(model)
    assert trainable == _expected_lora_params(model.config, 4)


def test_bad_targets(tiny_llama_dir):
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    with pytest.raises(ConfigError, match="none of the target modules"):
        FastModel.get_peft_model(model, target_modules=["wq", "wk"], verbose=False)


def test_note_when_fused_lora_cannot_apply(tiny_llama_dir, capsys):
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    FastModel.get_peft_model(model, r=4, lora_dropout=0.1)
    assert "fused LoRA off (lora_dropout=0.1 > 0)" in capsys.readouterr().out
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    FastModel.get_peft_model(model, r=4, use_dora=True)
    assert "fused LoRA off (DoRA)" in capsys.readouterr().out
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    FastModel.get_peft_model(model, r=4)
    assert "fused LoRA off" not in capsys.readouterr().out


def test_one_lora_alpha_default(tiny_llama_dir):
    """Both entry points: lora_alpha left out means alpha = r (scale 1)."""
    for r in (4, 8):
        model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
        a = FastModel.get_peft_model(model, r=r, verbose=False)
        b, _ = turbotune.get_peft_model(model_name=str(tiny_llama_dir), r=r, verbose=False)
        assert a.peft_config["default"].lora_alpha == b.peft_config["default"].lora_alpha == r
