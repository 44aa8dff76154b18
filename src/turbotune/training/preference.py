"""`turbotune train --method dpo|kto|orpo|grpo`: TRL's preference trainers around the model the SFT path loads.

The model is the PEFT model of `FastModel.get_peft_model`, which TRL's trainers take unmodified
(tests/training/test_preference_trainers.py, tests/training/test_grpo.py). DPO and KTO get no reference model:
with a PEFT model TRL uses the policy with its adapters switched off, the base as it was before training. ORPO
needs none, nor does GRPO with beta 0 (its default); GRPO's rewards come from the user's functions (rewards.py).

TrainConfig maps onto TRL's config (`trl_arguments`); the settings of turbotune's own SFT loop that TRL cannot
honour are refused in config.check_values. The run folder looks like an SFT run's: run_config.json,
training_log.json, loss.png and last_checkpoint/ (adapter_model.safetensors, tokenizer, trainer_state.json), so
`turbotune chat` and `turbotune export` take it. `--save-steps N` adds TRL's own checkpoint-N folders, which
`--resume` continues from.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import sys
from pathlib import Path

from turbotune._compat import unwrap_peft
from turbotune.errors import ConfigError, TrainingStopped
from turbotune.training import checkpoints as ckpt
from turbotune.training.config import TrainConfig, dump, identity_of
from turbotune.training.log import plot_losses, write_log
from turbotune.training.trainer import TrainResult
from turbotune.training.trainer_step import trainer_step_of

# method -> (trainer class, config class, the modules that have held them, newest first). TRL moves trainers
# between its stable and experimental packages from release to release.
TRL_CLASSES = {
    "dpo": ("DPOTrainer", "DPOConfig", ("trl", "trl.experimental.dpo")),
    "kto": ("KTOTrainer", "KTOConfig", ("trl", "trl.experimental.kto")),
    "orpo": ("ORPOTrainer", "ORPOConfig", ("trl.experimental.orpo", "trl")),
    "grpo": ("GRPOTrainer", "GRPOConfig", ("trl",)),
}
# The TrainConfig fields that make two runs in one folder the same run, beyond the SFT loop's own.
IDENTITY = TrainConfig.IDENTITY + ("beta", "reward_fn", "num_generations", "max_completion_length", "temperature")
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # ours hold after warm-up


def trl_classes(method: str):
    """(trainer class, config class) for `method` from wherever the installed TRL keeps them."""
    trainer_name, config_name, places = TRL_CLASSES[method]
    try:
        import trl
    except ImportError:
        raise ConfigError(f"--method {method} needs TRL: pip install trl") from None
    for place in places:
        try:
            module = importlib.import_module(place)
            return getattr(module, trainer_name), getattr(module, config_name)
        except (ImportError, AttributeError, RuntimeError):  # RuntimeError: TRL's lazy module failing to import
            continue
    raise ConfigError(f"--method {method}: TRL {getattr(trl, '__version__', '(unknown version)')} has no "
                      f"{trainer_name} (looked in {', '.join(places)}); install a TRL that has it (1.16 does)")


def trl_arguments(cfg: TrainConfig, config_cls, model, progress: bool | None = None):
    """TRL's config for this run, from TrainConfig."""
    import torch

    dtype = unwrap_peft(model).dtype
    values = dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1, num_train_epochs=cfg.epochs,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type=SCHEDULERS[cfg.lr_scheduler],
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        logging_steps=cfg.logging_steps, max_length=cfg.max_seq_length, beta=cfg.beta,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit, report_to="none",
        # Autocast in the dtype the model was loaded in (TRL's configs turn bf16 on by default, which
        # transformers refuses on a CPU); use_cpu where there is no GPU, as transformers asks for bf16 there.
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # the rows hold only what the trainer reads (ORPO's collator asks for it)
        # TRL zeroes every dropout so policy and reference log-probs match; a --lora-dropout asked for stays.
        disable_dropout=not cfg.lora_dropout,
        # transformers logs a window's mean in place of a NaN/inf loss: the log must show it, to stop on it.
        logging_nan_inf_filter=False,
        disable_tqdm=not (sys.stderr.isatty() if progress is None else progress),
    )
    if cfg.method == "grpo":  # GRPOConfig has no max_length: prompts are not truncated, completions are
        values.update(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature)
    # TRL releases differ in which of these their configs take; beta and max_length all of them do.
    known = {f.name for f in dataclasses.fields(config_cls)}
    # get_peft_model already applied --gradient-checkpointing; the trainer switching on its own would replace it.
    # transformers 5.2x renamed the switch (the old name still works, with a warning).
    values["activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"] = False
    return config_cls(**{k: v for k, v in values.items() if k in known})


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Claim the output folder before the model loads: refuse another run's, and with --resume return TRL's newest
    checkpoint-N there (None: nothing to resume, start afresh)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out)
    run_file = out / "run_config.json"
    checkpoints = [p for p in out.glob("checkpoint-*") if p.is_dir()]
    has_work = bool(checkpoints) or (out / ckpt.LAST).exists()
    if run_file.is_file() and not cfg.overwrite:
        theirs = identity_of(json.loads(run_file.read_text(encoding="utf-8")), IDENTITY)
        ours = identity_of(cfg.to_dict(), IDENTITY)
        if theirs != ours:
            diff = [k for k in IDENTITY if theirs[k] != ours[k]]
            raise ConfigError(f"{out} already holds a different run (differs in: {', '.join(diff)}); "
                              "choose another --output-dir, or pass --overwrite to replace it")
        if has_work and not cfg.resume:
            raise ConfigError(f"{out} already holds this run; pass --resume to continue it, or --overwrite to start "
                              "over")
    if cfg.overwrite and not cfg.resume:
        for p in checkpoints + [out / ckpt.LAST, out / "training_log.json", out / "loss.png"]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    ckpt.write_json_atomically(run_file, cfg.to_dict())
    return get_last_checkpoint(str(out)) if cfg.resume else None


def _stop_on_nonfinite(losses: list):
    """A TrainerCallback that stops training at the first NaN/inf logged loss, noting it in `losses`."""
    from transformers import TrainerCallback

    class StopOnNonfinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                losses.append((state.global_step, loss))
                control.should_training_stop = True

    return StopOnNonfinite()


def _reference(cfg: TrainConfig, model) -> str:
    if cfg.method == "orpo":
        return "none (ORPO has none)"
    if cfg.method == "grpo" and cfg.beta == 0:
        return "none (beta 0: no KL penalty)"
    if "ref" in getattr(model, "peft_config", {}):
        # TRL 1.x copies the starting adapter as "ref"; LoRA starts with B = 0, so that is the base model's output.
        return "the starting adapter, frozen (= the base model)"
    return "the model with its adapters off"


def _history(log_history: list[dict]) -> list[dict]:
    """TRL's log entries of training steps (loss, learning rate, the method's rewards and log-probs)."""
    return [dict(h) for h in log_history if "loss" in h and "step" in h]


def _grpo_note(cfg: TrainConfig, reward_funcs) -> str:
    from turbotune.training.rewards import describe

    names = describe(reward_funcs or [])
    return (f"; {cfg.num_generations} completions per prompt, up to {cfg.max_completion_length} tokens, temperature "
            f"{cfg.temperature:g}; rewards: {names}")


def train_preference(cfg: TrainConfig, model, tokenizer, rows: list[dict], resume: str | None = None,
                     stream=None, progress: bool | None = None, reward_funcs: list | None = None) -> TrainResult:
    """Train `model` (a PEFT model) on checked preference rows (data/preference.py) with TRL's trainer for
    cfg.method, then write the run folder. GRPO takes `reward_funcs` (rewards.load_reward_functions)."""
    import datasets

    stream = stream or sys.stdout
    trainer_cls, config_cls = trl_classes(cfg.method)
    bad = []
    extra = {"reward_funcs": reward_funcs} if cfg.method == "grpo" else {}
    trainer = trainer_cls(model=model, args=trl_arguments(cfg, config_cls, model, progress),
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[_stop_on_nonfinite(bad)], **extra)
    hook = trainer_step_of(model)  # turbotune's step inside the trainer (absent with --no-patch)
    if hook is not None and not cfg.cuda_graphs:
        hook.graphs.disabled_reason = "--no-cuda-graphs"
    reference = _reference(cfg, model)
    print(f"[turbotune] {cfg.method}: TRL's {trainer_cls.__name__}, beta {cfg.beta:g}, reference model: {reference}"
          + (_grpo_note(cfg, reward_funcs) if cfg.method == "grpo" else "")
          + (f"; resuming from {resume}" if resume else ""), file=stream, flush=True)
    trainer.train(resume_from_checkpoint=resume)
    history, state = _history(trainer.state.log_history), trainer.state
    if bad:
        step, loss = bad[0]
        raise TrainingStopped(f"the loss became {loss} at step {step}; nothing saved at the end. Likely causes: a "
                              f"learning rate too high (now {cfg.lr:g}; try a tenth), fp16 overflow (use bf16 or "
                              f"fp32), or a broken row.")
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # TRL's frozen copy of the starting adapter: not part of what was trained
    out = Path(cfg.output_dir)
    last = None
    if trainer.is_world_process_zero():
        last = _save_final(cfg, model, tokenizer, trainer, history)
    summary = {"steps": state.global_step, "method": cfg.method, "last_checkpoint": str(last)}
    if trainer.is_world_process_zero():
        write_log(out, history, summary)
        plot_losses(out, history, title=f"{cfg.method} loss")
    final = f", final loss {history[-1]['loss']:.4f}" if history else ""
    if history and "reward" in history[-1]:
        final += f", mean reward {history[-1]['reward']:.4f}"
    print(f"[turbotune] done: {state.global_step} {cfg.method} steps{final}; adapter + tokenizer in {last}",
          file=stream, flush=True)
    return TrainResult(state.global_step, history, out, last, summary=summary)


def _save_final(cfg: TrainConfig, model, tokenizer, trainer, history: list[dict]) -> Path:
    """last_checkpoint/ as the SFT loop writes it (no optimizer state: TRL's checkpoint-N folders hold that)."""
    state = trainer.state
    trained = {"step": state.global_step, "epoch": state.epoch, "total_steps": state.max_steps,
               "history": history, "config": cfg.to_dict(), "world_size": trainer.args.world_size,
               "method": cfg.method,
               # what a 4-bit base was dequantised to: the export merges into exactly those weights
               "compute_dtype": str(unwrap_peft(model).dtype).replace("torch.", "")}
    return ckpt.save_checkpoint(Path(cfg.output_dir) / ckpt.LAST, model, None, None, trained, tokenizer=tokenizer,
                                extra_files={"run_config.json": dump(cfg)})
