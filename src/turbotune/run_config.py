"""The settings of a training run: one dataclass shared by the CLI flags, the YAML file and the library.

A YAML file holds the same keys as the flags (dashes or underscores); flags given on the command line
override it. Unknown keys and wrong types are rejected, naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError


@dataclass
class TrainConfig:
    model: str | None = None            # folder or hub id; None = the embedded default (SmolLM2-135M-Instruct)
    data: str | None = None             # JSONL/JSON file; None = the packaged copywriting sample
    format: str = "auto"                # alpaca | sharegpt | messages | text | auto
    output_dir: str = "outputs"
    load_in_4bit: bool = False
    double_quant: bool = True
    dtype: str | None = None            # bf16 | fp16 | fp32 | None (automatic)
    max_seq_length: int = 2048
    max_steps: int = -1                 # > 0 overrides epochs
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
    gradient_checkpointing: bool = True
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

    # Keys that describe *what* is trained: an output dir holding a run with other values is a different run.
    IDENTITY = ("model", "data", "format", "load_in_4bit", "max_seq_length", "lora_r", "lora_alpha",
                "target_modules", "seed", "batch_size", "grad_accum", "lr", "packing")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in self.IDENTITY}


def _check_type(key: str, value):
    """Validate (and gently coerce ints to floats) a YAML value against the field's type annotation."""
    hint = typing.get_type_hints(TrainConfig)[key]
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is type(None):
            continue
        base = typing.get_origin(t) or t
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    names = " or ".join("null" if t is type(None) else getattr(typing.get_origin(t) or t, "__name__", str(t))
                        for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {type(value).__name__} ({value!r})")


def normalise_key(key: str) -> str:
    return key.replace("-", "_")


def validate_mapping(raw: dict, source: str = "config") -> dict:
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        k = normalise_key(str(key))
        if k not in known:
            close = [n for n in known if n.startswith(k[:4])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        out[k] = _check_type(k, value)
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
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("give max_steps > 0 or epochs > 0")
    if cfg.lr_scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"'lr_scheduler' must be linear, cosine or constant, got {cfg.lr_scheduler!r}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError("'save_total_limit' must be at least 1")


def dump(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
