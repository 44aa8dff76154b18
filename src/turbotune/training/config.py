"""The settings of a training run: one dataclass shared by the CLI flags, the YAML file and the library.

A YAML file holds the same keys as the flags (dashes or underscores); flags given on the command line
override it. Unknown keys and wrong types are rejected, all of them in one error, each unknown key with the
field it most likely means (`learning_rate` -> `lr`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from turbotune.errors import ConfigError


@dataclass
class TrainConfig:
    model: str | None = None            # folder or hub id; None = the embedded default (SmolLM2-135M-Instruct)
    data: str | None = None             # JSONL/JSON file; None = the packaged copywriting sample
    format: str = "auto"                # alpaca | sharegpt | messages | text | auto
    method: str = "sft"                 # sft (trainer.py) | dpo | kto | orpo | grpo (TRL's trainers, preference.py)
    beta: float | None = None           # dpo/kto: how far from the reference model; orpo: the odds-ratio weight λ;
                                        # grpo: the KL penalty's weight. None = TRL's default for the method
                                        # (default_beta), filled in by check_values
    reward_fn: str | None = None        # grpo: "rewards.py" or "rewards.py:name[,name2]" (training/rewards.py)
    num_generations: int = 8            # grpo: completions per prompt (TRL's defaults, these three)
    max_completion_length: int = 512    # grpo: longest completion in tokens
    temperature: float = 1.0            # grpo: sampling temperature of the completions
    output_dir: str = "outputs"
    load_in_4bit: bool = False
    double_quant: bool = True
    dtype: str | None = None            # bf16 | fp16 | fp32 | None (automatic)
    max_seq_length: int = 2048
    max_steps: int | None = None        # optimizer steps; None = train for `epochs`
    epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 2e-4
    warmup_steps: int = 5
    lr_scheduler: str = "linear"        # linear | cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int | None = None       # None = lora_r
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    gradient_checkpointing: bool | str = True   # true (recompute) | false | "offload" | "auto" (planner)
    packing: bool | None = None         # pack samples into rows of max_seq_length (packing.py); None = auto:
                                        # on for GPU runs whose attention supports it, off on the CPU
    train_on_responses_only: bool = True
    skip_bad_rows: bool = False
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 0                 # 0 = only at the end (and on interruption)
    save_total_limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    patch: bool = True                  # turbotune's fused forwards (False = stock transformers + PEFT)
    cuda_graphs: bool = True            # replay each micro-step's kernels from a CUDA graph (GPU, fixed shapes)
    adapter_precision: str = "peft"     # LoRA math: "peft" (exact PEFT dtypes) | "input" (compute dtype, faster)
    distributed: str = "ddp"            # under torchrun: "ddp" (a whole model per rank, distributed.py) | "fsdp"
                                        # (the model sharded over the ranks with FSDP2, fsdp.py)

    # Keys that describe *what* is trained: an output dir holding a run with other values is a different run.
    IDENTITY = ("model", "data", "format", "load_in_4bit", "max_seq_length", "lora_r", "lora_alpha",
                "target_modules", "seed", "batch_size", "grad_accum", "lr", "packing", "method")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in self.IDENTITY}


def identity_of(config: dict, keys: tuple[str, ...] = TrainConfig.IDENTITY) -> dict:
    """The identifying settings of a run's config as saved (run_config.json); a key an older file lacks (method)
    had its default then."""
    defaults = TrainConfig()
    return {k: config.get(k, getattr(defaults, k)) for k in keys}


# Spellings of transformers' TrainingArguments, TRL, PEFT and Unsloth (and a few common variants) for our
# fields: users bring configs from those tools, and difflib alone cannot see that `r` means `lora_r`.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "r": "lora_r", "rank": "lora_r", "lora_rank": "lora_r",
    "alpha": "lora_alpha", "lr_scheduler_type": "lr_scheduler", "scheduler": "lr_scheduler",
    "max_length": "max_seq_length", "max_seq_len": "max_seq_length", "seq_len": "max_seq_length",
    "use_gradient_checkpointing": "gradient_checkpointing", "model_name": "model", "model_name_or_path": "model",
    "dataset": "data", "dataset_path": "data", "data_path": "data", "train_file": "data",
    "dataset_format": "format", "data_format": "format", "torch_dtype": "dtype", "bf16": "dtype", "fp16": "dtype",
    "warmup_ratio": "warmup_steps", "num_warmup_steps": "warmup_steps", "random_state": "seed",
    "bnb_4bit_use_double_quant": "double_quant", "use_double_quant": "double_quant",
    "lora_target_modules": "target_modules", "resume_from_checkpoint": "resume",
    "overwrite_output_dir": "overwrite", "reward_funcs": "reward_fn", "reward_function": "reward_fn",
    "reward_functions": "reward_fn", "rewards": "reward_fn",
}

# Decimal notation, as YAML 1.1 (PyYAML) leaves `1e-4` (no dot) and `1.5e3` (no exponent sign) as strings.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def suggest_field(key: str) -> str | None:
    """The field an unknown key most likely means: a known alias, else the closest spelling."""
    k = normalise_key(key).lower()
    if k in ALIASES:
        return ALIASES[k]
    close = difflib.get_close_matches(k, field_names(), n=1, cutoff=0.6)
    return close[0] if close else None


def _as_number(value):
    """A YAML value as a finite float when it is a number in any notation ("1e-4" included), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _coerce(base, value):
    """`value` as type `base`, or raise ValueError. Bools stay strict: 1 or "yes" is no bool."""
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif base is float:
        number = _as_number(value)
        if number is not None:
            return number
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise ValueError


def _check_type(key: str, value):
    """Validate a value against the field's type annotation, reading numbers in any notation."""
    hint = typing.get_type_hints(TrainConfig)[key]
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    bases = [typing.get_origin(t) or t for t in allowed if t is not type(None)]
    # An exact type match first, so "16" stays a string for a str | int field, should one appear.
    for base in sorted(bases, key=lambda b: not isinstance(value, b)):
        try:
            return _coerce(base, value)
        except ValueError:
            continue
    names = " or ".join("null" if t is type(None) else getattr(typing.get_origin(t) or t, "__name__", str(t))
                        for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {type(value).__name__} ({value!r})")


def normalise_key(key: str) -> str:
    return key.replace("-", "_")


def _unknown_keys_message(keys: list[str]) -> str:
    parts = []
    for key in keys:
        hint = suggest_field(key)
        parts.append(f"'{key}'" + (f" (did you mean {hint}?)" if hint else ""))
    return f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(parts)}"


def validate_mapping(raw: dict, source: str = "config") -> dict:
    """Known keys with checked values; every unknown key and wrong type is reported in one ConfigError."""
    known = set(field_names())
    out, unknown, wrong = {}, [], []
    for key, value in raw.items():
        k = normalise_key(str(key))
        if k not in known:
            unknown.append(str(key))
            continue
        try:
            out[k] = _check_type(k, value)
        except ConfigError as e:
            wrong.append(str(e))
    problems = ([_unknown_keys_message(unknown)] if unknown else []) + wrong
    if problems:
        raise ConfigError(f"{source}: {'; '.join(problems)}")
    return out


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    return validate_mapping(raw, source=str(path))


def build_config(yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(validate_mapping(overrides or {}, source="arguments"))
    cfg = TrainConfig(**values)
    check_values(cfg)
    return cfg


def check_values(cfg: TrainConfig) -> None:
    positive = ["batch_size", "grad_accum", "max_seq_length", "lora_r", "logging_steps"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ConfigError(f"'lr' must be positive, got {cfg.lr}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        # 0 and -1 once meant "use epochs" silently; now a step count is a step count.
        raise ConfigError(f"'max_steps' must be positive, got {cfg.max_steps}; "
                          "to train by epochs leave it out and pass --epochs")
    if cfg.max_steps is None and cfg.epochs <= 0:
        raise ConfigError(f"'epochs' must be positive, got {cfg.epochs} (or give max_steps)")
    if isinstance(cfg.gradient_checkpointing, str):
        mode = cfg.gradient_checkpointing.lower()
        named = {"true": True, "recompute": True, "false": False, "none": False, "offload": "offload",
                 "auto": "auto"}
        if mode not in named:
            raise ConfigError(f"'gradient_checkpointing' must be true, false, offload or auto, got "
                              f"{cfg.gradient_checkpointing!r}")
        cfg.gradient_checkpointing = named[mode]
    if cfg.lr_scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"'lr_scheduler' must be linear, cosine or constant, got {cfg.lr_scheduler!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"'distributed' must be ddp or fsdp, got {cfg.distributed!r}")
    if cfg.distributed == "fsdp" and cfg.load_in_4bit:
        from turbotune.training.fsdp import FOUR_BIT_REFUSAL
        raise ConfigError(FOUR_BIT_REFUSAL)
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError("'save_total_limit' must be at least 1")
    _check_method(cfg)


METHODS = ("sft", "dpo", "kto", "orpo", "grpo")
# Settings of turbotune's own SFT loop, with their defaults: TRL's preference trainers have nothing to honour
# another value with, so one is refused rather than ignored.
_SFT_ONLY = {"format": "auto", "train_on_responses_only": True, "skip_nonfinite": False, "distributed": "ddp"}
# GRPO's own settings, with their defaults (TRL 1.16's): another method has no use for another value.
_GRPO_ONLY = {"reward_fn": None, "num_generations": 8, "max_completion_length": 512, "temperature": 1.0}


def default_beta(method: str) -> float:
    """TRL 1.16's beta: 0.1 for DPO, KTO and ORPO; 0.0 for GRPO (no KL term, so no reference model)."""
    return 0.0 if method == "grpo" else 0.1


def _check_method(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"'method' must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.beta is None:
        cfg.beta = default_beta(cfg.method)
    if cfg.method == "grpo":
        if not math.isfinite(cfg.beta) or cfg.beta < 0:
            raise ConfigError(f"'beta' must be 0 or more, got {cfg.beta}")
    elif not math.isfinite(cfg.beta) or cfg.beta <= 0:
        raise ConfigError(f"'beta' must be positive, got {cfg.beta}")
    if cfg.method != "grpo":
        for key, default in _GRPO_ONLY.items():
            if getattr(cfg, key) != default:
                raise ConfigError(f"'{key}' applies to --method grpo only, not {cfg.method}")
    if cfg.method == "sft":
        if cfg.beta != default_beta("sft"):
            raise ConfigError("'beta' applies to --method dpo, kto and orpo (the pull towards the reference model) "
                              "and grpo (its KL penalty), not sft")
        return
    if cfg.data is None:
        what = "prompts" if cfg.method == "grpo" else "preference rows"
        raise ConfigError(f"--method {cfg.method} needs --data: a file of {what} (the packaged sample is "
                          "SFT data); see README, Training with preferences")
    for key, default in _SFT_ONLY.items():
        if getattr(cfg, key) != default:
            raise ConfigError(f"'{key}' applies to --method sft only, not {cfg.method}")
    if cfg.packing:
        raise ConfigError(f"'packing' applies to --method sft only; under {cfg.method} turbotune removes padding "
                          "itself where it can")
    if cfg.method == "kto" and cfg.batch_size < 2:
        # TRL's KTO takes its KL estimate from the other completions of the same micro-batch.
        raise ConfigError(f"--method kto needs --batch-size 2 or more, got {cfg.batch_size}: KTO estimates its KL "
                          "term from the other rows of a micro-batch")
    if cfg.method == "grpo":
        _check_grpo(cfg)


def _check_grpo(cfg: TrainConfig) -> None:
    if not cfg.reward_fn:
        raise ConfigError("--method grpo needs --reward-fn rewards.py[:name]: the Python functions that score the "
                          "completions; see README, Training with preferences")
    if cfg.num_generations < 2:
        raise ConfigError(f"'num_generations' must be 2 or more, got {cfg.num_generations}: GRPO scores each "
                          "completion against the others of its prompt")
    if cfg.max_completion_length <= 0:
        raise ConfigError(f"'max_completion_length' must be positive, got {cfg.max_completion_length}")
    if not math.isfinite(cfg.temperature) or cfg.temperature <= 0:
        raise ConfigError(f"'temperature' must be positive, got {cfg.temperature}")
    # TRL generates every prompt's completions within one optimizer step: its batch (the micro-batches of one
    # step, over all ranks) must hold whole groups.
    world = int(os.environ.get("WORLD_SIZE") or 1)
    step = cfg.batch_size * cfg.grad_accum * world
    if step % cfg.num_generations:
        fits = [g for g in range(2, cfg.num_generations) if step % g == 0]
        ranks = f" × {world} ranks" if world > 1 else ""
        hint = (f"pass --num-generations {fits[-1]}, or" if fits else "pass") + \
            " a --batch-size or --grad-accum that makes it a multiple"
        raise ConfigError(f"--method grpo: --batch-size × --grad-accum{ranks} ({step}) must be a multiple of "
                          f"--num-generations ({cfg.num_generations}): each optimizer step generates whole groups of "
                          f"completions, one group per prompt; {hint}")


def dump(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
