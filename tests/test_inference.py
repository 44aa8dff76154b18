"""After training: the adapter folder loads through plain transformers, and generation works."""
import torch

from turbotune import FastModel
from turbotune.inference import generate_reply, load_for_inference
from turbotune.training.config import TrainConfig
from turbotune.cli.train import run_training


def _train(tiny_dir, out):
    cfg = TrainConfig(model=str(tiny_dir), output_dir=str(out), max_steps=2, batch_size=2, grad_accum=1,
                      max_seq_length=96, lora_r=4, lr=1e-2)
    run_training(cfg, progress=False)
    return out / "last_checkpoint"


def test_adapter_loads_with_automodel(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _train(tiny_llama_dir, tmp_path / "run")
    plain = AutoModelForCausalLM.from_pretrained(str(adapter))  # peft installed: base + adapter
    assert any("lora_A" in n for n, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    ref = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits)
        # the trained adapter changes the output (B is no longer zero)
        assert not torch.allclose(base.get_base_model()(ids).logits if hasattr(base, "get_base_model")
                                  else AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))(ids).logits,
                                  ref(ids).logits)


def test_generate_with_adapter(tiny_llama_dir, tmp_path):
    adapter = _train(tiny_llama_dir, tmp_path / "gen")
    model, tok = load_for_inference(None, str(adapter), verbose=False)
    assert not model.training
    reply = generate_reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=5)
    assert isinstance(reply, str)


def test_for_inference_turns_cache_on(tiny_llama_dir):
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, verbose=False)
    FastModel.for_inference(model)
    assert not model.training and model.get_base_model().config.use_cache
