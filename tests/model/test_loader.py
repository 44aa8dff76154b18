"""Loading: folders in fp32 and 4-bit, dtype choice, clear errors, safetensors by default."""
import math

import pytest
import torch

from turbotune import FastModel, is_bfloat16_supported
from turbotune.errors import ModelLoadError
from turbotune.model.loader import resolve_dtype


def test_load_folder_fp32(tiny_llama_dir):
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    assert model.dtype == torch.float32  # CPU default
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.max_seq_length == 2048
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_load_in_4bit(tiny_llama_dir):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, verbose=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.nested  # double quantisation of the absmax
    assert q.weight.quant_state.quant_type == "nf4"
    assert q.compute_dtype == torch.float32
    # embeddings and lm_head stay 16/32-bit
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_prequantized_folder_loads(tiny_llama_dir, tmp_path):
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, verbose=False, patch=False)
    model.save_pretrained(str(tmp_path / "bnb-4bit"))
    tok.save_pretrained(str(tmp_path / "bnb-4bit"))
    again, _ = FastModel.from_pretrained(str(tmp_path / "bnb-4bit"), verbose=False)
    assert again.model.layers[0].mlp.up_proj.__class__.__name__ == "Linear4bit"


def test_transformers_bnb_4bit_checkpoint_loads_and_trains(tiny_llama_dir, tmp_path):
    """A `*-bnb-4bit` folder as the hub has them: quantised by transformers + bitsandbytes (NF4, double quant),
    saved, then loaded here without load_in_4bit; LoRA on it trains and the base stays 4-bit and frozen."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    folder = tmp_path / "tiny-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), quantization_config=cfg).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(folder))

    model, tok = FastModel.from_pretrained(str(folder), verbose=False)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, bnb.nn.Linear4bit) and up.weight.quant_state.nested
    packed = up.weight.data.clone()
    torch.manual_seed(0)  # LoRA's A init
    model = FastModel.get_peft_model(model, r=4, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert torch.equal(model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.data, packed)
    # Loaded without load_in_4bit, it is still a 4-bit model: memory predictions and OOM advice say so.
    from turbotune.model.quant import is_4bit_model
    from turbotune.training.config import TrainConfig
    from turbotune.training.trainer import oom_message
    assert is_4bit_model(model)
    message = oom_message(TrainConfig(load_in_4bit=False), 1, 128, is_4bit_model(model))
    assert "4-bit base: yes" in message and "--load-in-4bit" not in message
    plain, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    assert not is_4bit_model(plain)


def test_dtype_choice():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert is_bfloat16_supported() == (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        FastModel.from_pretrained(str(tmp_path / "nope"), verbose=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        FastModel.from_pretrained(str(tmp_path), verbose=False)


def test_offline_hub_id_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from turbotune.model import loader
    loader._hub_reachable.cache_clear()
    with pytest.raises(ModelLoadError, match="offline"):
        FastModel.from_pretrained("someorg/not-a-cached-model", verbose=False)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "definitely_not_a_model", "hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="architecture"):
        FastModel.from_pretrained(str(tmp_path), verbose=False)


def test_pickle_needs_opt_in(tiny_llama_dir, tmp_path):
    import shutil
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style pickle checkpoint
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".jinja", "config.json")):
            shutil.copy(f, tmp_path / f.name)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="pickle"):
        FastModel.from_pretrained(str(tmp_path), verbose=False)
    model, _ = FastModel.from_pretrained(str(tmp_path), verbose=False, allow_pickle=True)
    assert model is not None


def test_trust_remote_code_off_by_default(tiny_llama_dir, monkeypatch):
    seen = {}
    import transformers
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True
