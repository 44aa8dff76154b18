"""A turbotune model works where users already train: transformers' Trainer and TRL's SFTTrainer."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbotune import FastModel
def test_sfttrainer_tutorial_script(tiny_llama_dir, tmp_path):
    """The shape of the usual tutorial: FastModel + get_peft_model + datasets + SFTTrainer(SFTConfig)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    model, tokenizer = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=128, verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, verbose=False)
    rows = [{"messages": [{"role": "user", "content": f"Name product {i}."},
                          {"role": "assistant", "content": f"Product {i} is the best."}]} for i in range(16)]
    dataset = datasets.Dataset.from_list(rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
                           report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert changed, "SFTTrainer did not update the LoRA weights"
    trainer.save_model(str(tmp_path / "sft-adapter"))
    assert (tmp_path / "sft-adapter" / "adapter_model.safetensors").is_file()


def test_transformers_trainer(tiny_llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from turbotune.data.dataset import DataCollator, prepare_dataset

    model, tokenizer = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, verbose=False)
    rows = [{"instruction": f"Say {i}.", "output": f"{i}!"} for i in range(8)]
    data, _ = prepare_dataset(rows, tokenizer, max_seq_length=64)
    data = [{"input_ids": d["input_ids"], "labels": d["labels"]} for d in data]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollator(tokenizer))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sft_trainer.py"


def readme_python_block(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"README has no section {title!r}"
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"README section {title!r} should hold one python block, found {len(blocks)}"
    return blocks[0]


@pytest.mark.slow
def test_readme_sfttrainer_script_runs_as_written(smol_dir, tmp_path):
    """The README's SFTTrainer script is examples/sft_trainer.py, and it runs on the installed TRL with the
    embedded model and no hub, leaving the files the README lists."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    assert readme_python_block("Training with TRL's SFTTrainer") == EXAMPLE.read_text(encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    steps = 2
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(steps)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    out = tmp_path / "outputs" / "sft"
    checkpoint = out / f"checkpoint-{steps}"
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json", "training_args.bin", "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), f"{checkpoint.name}/{name} missing: {sorted(os.listdir(checkpoint))}"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"):
        assert (out / "adapter" / name).is_file(), name
    assert not (out / "adapter" / "optimizer.pt").exists()
    assert not (out / "last_checkpoint").exists()

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses

    from safetensors.torch import load_file
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b), "training did not move the adapter off its init"
