"""A turbotune model works where users already train: transformers' Trainer and TRL's SFTTrainer."""
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

    from turbotune.data import DataCollator, prepare_dataset

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
