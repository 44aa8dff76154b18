"""Export: merged 16-bit weights equal base + adapter; the adapter copy is a plain PEFT adapter."""
import torch

from turbotune.export import export
from turbotune.run_config import TrainConfig
from turbotune.runner import run_training


def test_merge_and_copy(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model=str(tiny_llama_dir), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
                      grad_accum=1, max_seq_length=64, lora_r=4, lr=1e-2)
    run_training(cfg, progress=False)
    adapter = tmp_path / "run" / "last_checkpoint"

    merged_dir = export(adapter, tmp_path / "merged", how="merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(adapter))
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer_config.json").is_file()

    copy_dir = export(adapter, tmp_path / "copy", how="adapter")
    assert (copy_dir / "adapter_model.safetensors").is_file()
    assert not (copy_dir / "trainer_state.pt").exists()
