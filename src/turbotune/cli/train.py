"""A whole run from settings: load → LoRA → data → train. Also the embedded demo."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from turbotune.training.config import TrainConfig, check_values

# Not in the sample data: the demo asks them before and after fine-tuning. Both are English: after 20 CPU
# steps the 135M model has picked up the house style (headline, body, "→" call to action) in English, while
# its Chinese is too weak to show it (it tends to echo the instruction), though half the data is Chinese.
DEMO_PROMPTS = [
    "Write a tagline for a bamboo bluetooth speaker.",
    "Write a short product description for a solar-powered camping lantern.",
]


def read_training_rows(cfg: TrainConfig):
    """(normalised rows, LoadReport): every row read and checked without a tokenizer, so a malformed row
    is reported in seconds rather than after a model load that can take minutes."""
    from turbotune.data.dataset import load_rows, sample_data_path

    return load_rows(cfg.data or str(sample_data_path()), format=cfg.format, skip_bad_rows=cfg.skip_bad_rows)


def check_model_path(cfg: TrainConfig) -> None:
    """Fail on a missing model folder (a quick look, no load) before the data is read: both errors then
    come before anything slow, the model's first as it is named first on the command line."""
    from turbotune.model.default_model import is_default_alias
    from turbotune.model.loader import resolve_model_path

    if not is_default_alias(cfg.model):  # the embedded model may need converting: leave that to the loader
        resolve_model_path(cfg.model)


def load_everything(cfg: TrainConfig, stream=None):
    """(model with LoRA, tokenizer, tokenized dataset, data report)."""
    from turbotune.data.dataset import DataReport, tokenize_examples

    stream = stream or sys.stdout
    check_model_path(cfg)
    rows, load_report = read_training_rows(cfg)
    model, tokenizer = load_base(cfg)
    dataset, tok_report = tokenize_examples(rows, tokenizer, max_seq_length=cfg.max_seq_length,
                                            train_on_responses_only=cfg.train_on_responses_only)
    report = DataReport(load=load_report, tokenize=tok_report)
    print(f"[turbotune] data {load_report.source}: {report.summary()}", file=stream, flush=True)
    return add_lora(cfg, model), tokenizer, dataset, report


def load_base(cfg: TrainConfig):
    """(model, tokenizer) as every method loads them."""
    from turbotune.fast_model import FastModel

    return FastModel.from_pretrained(
        cfg.model, max_seq_length=cfg.max_seq_length, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
        double_quant=cfg.double_quant, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
        patch=cfg.patch)


def add_lora(cfg: TrainConfig, model):
    from turbotune.fast_model import FastModel

    return FastModel.get_peft_model(model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r,
                                    lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                                    use_gradient_checkpointing=cfg.gradient_checkpointing, random_state=cfg.seed,
                                    adapter_precision=cfg.adapter_precision)


def run_preference(cfg: TrainConfig, stream, progress=None):
    """--method dpo|kto|orpo|grpo: every row (and GRPO's reward functions) checked and the output folder claimed
    before the model loads, then TRL's trainer (training/preference.py)."""
    from turbotune.data.preference import load_preference_rows
    from turbotune.training.preference import prepare_output_dir, train_preference
    from turbotune.training.rewards import check_columns, describe, load_reward_functions, split_spec

    check_model_path(cfg)
    rewards = load_reward_functions(cfg.reward_fn) if cfg.method == "grpo" else None
    rows, report = load_preference_rows(cfg.data, cfg.method, skip_bad_rows=cfg.skip_bad_rows)
    print(f"[turbotune] data {report.source}: {report.summary()}", file=stream, flush=True)
    if rewards is not None:
        check_columns(rewards, report.columns, cfg.reward_fn)
        print(f"[turbotune] reward functions: {describe(rewards)} ({split_spec(cfg.reward_fn)[0]})", file=stream,
              flush=True)
    resume = prepare_output_dir(cfg)
    model, tokenizer = load_base(cfg)
    model = add_lora(cfg, model)
    result = train_preference(cfg, model, tokenizer, rows, resume=resume, stream=stream, progress=progress,
                              reward_funcs=rewards)
    return result, model, tokenizer


def run_training(cfg: TrainConfig, stream=None, progress=None):
    import torch

    from turbotune.training.trainer import Trainer

    check_values(cfg)  # before anything slow: a config built in code skips build_config's checks
    from turbotune.training.distributed import init_from_env
    world = init_from_env()  # under torchrun: the process group, and on GPUs this rank's device, before the load
    stream = world.quiet(stream or sys.stdout)  # only rank 0 prints
    torch.manual_seed(cfg.seed)
    if cfg.method != "sft":
        return run_preference(cfg, stream, progress)
    model, tokenizer, dataset, _ = load_everything(cfg, stream)
    trainer = Trainer(cfg, model, tokenizer, dataset, progress=progress, stream=stream)
    result = trainer.train()
    return result, model, tokenizer


def demo_config(output_dir="outputs/demo", **overrides) -> TrainConfig:
    """Settings that show a visible loss drop on a 2-core CPU in well under three minutes."""
    # No gradient checkpointing: host memory is plentiful and recomputation would cost a quarter of the time.
    values = dict(model=None, data=None, output_dir=output_dir, max_seq_length=256, batch_size=4, grad_accum=1,
                  max_steps=20, lr=2e-3, warmup_steps=2, lora_r=16, lora_alpha=32, logging_steps=2,
                  gradient_checkpointing=False, packing=False, overwrite=True)
    values.update(overrides)
    cfg = TrainConfig(**values)
    check_values(cfg)
    return cfg


def run_demo(output_dir="outputs/demo", max_steps=None, stream=None, progress=None) -> int:
    from turbotune.inference import generate_reply

    stream = stream or sys.stdout
    t0 = time.perf_counter()
    overrides = {"max_steps": max_steps} if max_steps is not None else {}
    cfg = demo_config(output_dir, **overrides)
    print("[turbotune] demo: LoRA fine-tune of SmolLM2-135M-Instruct on the packaged product-copywriting sample, "
          "on this machine's CPU/GPU, no hub needed", file=stream, flush=True)

    model, tokenizer, dataset, _ = load_everything(cfg, stream)
    before = [_answer(model, tokenizer, p, generate_reply) for p in DEMO_PROMPTS]

    from turbotune.training.trainer import Trainer
    trainer = Trainer(cfg, model, tokenizer, dataset, progress=progress, stream=stream)
    result = trainer.train()
    after = [_answer(model, tokenizer, p, generate_reply) for p in DEMO_PROMPTS]

    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    print("\n" + "=" * 78, file=stream)
    print(f"loss {first:.3f} → {last:.3f} over {result.steps} steps; plot: {Path(cfg.output_dir) / 'loss.png'}",
          file=stream)
    for prompt, b, a in zip(DEMO_PROMPTS, before, after):
        print("-" * 78, file=stream)
        print(f"instruction (not in the training data): {prompt}", file=stream)
        print(f"\n  before fine-tuning:\n{_indent(b)}\n\n  after fine-tuning:\n{_indent(a)}", file=stream)
    print("=" * 78, file=stream)
    print(f"adapter: {result.last_checkpoint}  (try: turbotune chat --adapter {result.last_checkpoint})", file=stream)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s", file=stream, flush=True)
    return 0


def _answer(model, tokenizer, prompt, generate_reply):
    from turbotune.fast_model import FastModel
    FastModel.for_inference(model)
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=64)
    FastModel.for_training(model, use_gradient_checkpointing=False)
    return reply


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in (text or "(empty)").splitlines())
