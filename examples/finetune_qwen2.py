"""QLoRA fine-tuning of Qwen2-1.5B-Instruct, the way the usual tutorial does it, with turbotune.

    python examples/finetune_qwen2.py                                  # hub model (needs internet once)
    python examples/finetune_qwen2.py --model /path/to/local/folder    # a local copy (offline)
    python examples/finetune_qwen2.py --data my.jsonl --max-steps 200

Loads the model in 4-bit NF4, adds LoRA (r=16 on all seven projections), formats an alpaca-style JSONL with
the model's chat template (answers only are trained), trains 50 steps with a log table, saves the adapter
and asks the fine-tuned model something.
"""
import argparse

from turbotune import FastModel
from turbotune.data.dataset import prepare_dataset, sample_data_path
from turbotune.inference import generate_reply
from turbotune.training.config import TrainConfig
from turbotune.training.trainer import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen2-1.5B-Instruct")
    ap.add_argument("--data", default=str(sample_data_path()))
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--output-dir", default="outputs/qwen2-qlora")
    ap.add_argument("--no-4bit", action="store_true")
    args = ap.parse_args()

    # 1. Load in 4-bit (NF4 + double quantisation); dtype picks bf16 on modern GPUs.
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.max_seq_length,
                                                 load_in_4bit=not args.no_4bit)
    # 2. LoRA on q, k, v, o, gate, up, down.
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, use_gradient_checkpointing=True,
                                     random_state=3407)
    # 3. Data: alpaca rows → chat template → labels on the answers only.
    dataset, report = prepare_dataset(args.data, tokenizer, max_seq_length=args.max_seq_length)
    print("data:", report.summary())
    # 4. Train: micro-batch 2 × accumulation 4, lr 2e-4, 5 warm-up steps, linear decay.
    cfg = TrainConfig(model=args.model, data=args.data, output_dir=args.output_dir, max_steps=args.max_steps,
                      batch_size=2, grad_accum=4, lr=2e-4, warmup_steps=5, max_seq_length=args.max_seq_length,
                      load_in_4bit=not args.no_4bit, lora_r=16, overwrite=True)
    result = Trainer(cfg, model, tokenizer, dataset).train()
    print(f"loss {result.history[0]['loss']:.4f} -> {result.history[-1]['loss']:.4f}; adapter in {result.last_checkpoint}")
    # 5. Ask it something.
    FastModel.for_inference(model)
    print(generate_reply(model, tokenizer, [{"role": "user", "content": "Write a tagline for a travel mug."}],
                         max_new_tokens=64))


if __name__ == "__main__":
    main()
