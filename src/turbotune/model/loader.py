"""Loading a model for training: resolve the name, pick the dtype, optionally quantise to 4-bit, patch.

`load_model_and_tokenizer` is what `FastModel.from_pretrained` calls. The model that comes back is a plain
transformers `PreTrainedModel`; the family patch (turbotune.model.families) changes how some submodules compute,
never what the model is.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

import torch

from turbotune._compat import dtype_kwargs, is_available, supports_sdpa
from turbotune.errors import ModelLoadError

_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def is_bfloat16_supported() -> bool:
    """True when training in bf16 is both supported and fast here (a CUDA GPU of compute capability >= 8.0)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8 and torch.cuda.is_bf16_supported()


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype:
    """None picks bf16 where supported, else fp16 on a GPU, fp32 on the CPU."""
    device = device or default_device()
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if is_bfloat16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        chosen = _DTYPE_NAMES[dtype.lower()]
    else:
        raise ModelLoadError(f"dtype {dtype!r} is not one turbotune trains in; use one of bf16, fp16, fp32 (or None for automatic)")
    if chosen not in (torch.bfloat16, torch.float16, torch.float32):
        raise ModelLoadError(f"dtype {chosen} is not one turbotune trains in; use bf16, fp16 or fp32")
    if chosen == torch.bfloat16 and device.type == "cuda" and not is_bfloat16_supported():
        raise ModelLoadError("this GPU has no fast bf16 (compute capability < 8.0); use dtype=fp16 or leave dtype=None")
    return chosen


@lru_cache(None)
def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are `org/name` (or a bare legacy `name`); anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name: str | None, token=None) -> tuple[str, bool]:
    """(path or hub id, local_files_only). Fails early with a message that says what to do."""
    from turbotune.model.default_model import default_model_dir, is_default_alias

    if is_default_alias(name):
        return str(default_model_dir()), True
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(f"{expanded} is a folder but holds no config.json: point --model at a Hugging Face "
                                 "model folder (config.json + *.safetensors + tokenizer files)")
        return expanded, True
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder {expanded} does not exist; check the path (a hub id looks like 'org/name')")
    if not _hub_reachable():
        return name, True  # try the local hub cache; the error below explains if it is not there
    return name, False


def _offline_message(name: str) -> str:
    return (f"could not load '{name}': this machine looks offline (huggingface.co is unreachable) and the model is "
            "not in the local Hugging Face cache. On a connected machine run `huggingface-cli download "
            f"{name} --local-dir DIR`, copy DIR here and pass --model DIR (or FastModel.from_pretrained('DIR')).")


def load_config(path: str, local_only: bool, token=None, trust_remote_code=False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, token=token, trust_remote_code=trust_remote_code,
                                          local_files_only=local_only)
    except OSError as e:
        if local_only and not os.path.isdir(path):
            raise ModelLoadError(_offline_message(path)) from e
        raise ModelLoadError(f"could not read the config of '{path}': {e}") from e
    except ValueError as e:
        text = str(e)
        if "model_type" in text or "Unrecognized" in text or "does not recognize" in text:
            raise ModelLoadError(
                f"'{path}' has an architecture this transformers does not know ({text.splitlines()[0][:200]}). "
                "Upgrade transformers (pip install -U transformers); if the model ships its own code and you trust "
                "it, pass trust_remote_code=True (--trust-remote-code).") from e
        raise ModelLoadError(f"could not read the config of '{path}': {text}") from e


def _check_weight_format(path: str, allow_pickle: bool) -> None:
    """Weights load from safetensors; a pickle-only folder needs an explicit opt-in (pickle can run code)."""
    if not os.path.isdir(path):
        return
    names = os.listdir(path)
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) and "training_args" not in n for n in names)
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights (*.bin), which can run arbitrary code when loaded. Convert them to "
            "safetensors, or if you trust the source pass allow_pickle=True (--allow-pickle).")


def quantization_config_for(dtype: torch.dtype, double_quant: bool = True):
    if not is_available("bitsandbytes"):
        raise ModelLoadError("load_in_4bit needs bitsandbytes: pip install 'bitsandbytes>=0.45' (it has a CPU path too)")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def _is_prequantized_4bit(config) -> bool:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    return bool(q.get("load_in_4bit")) or q.get("quant_method") == "bitsandbytes" and q.get("_load_in_4bit", False)


def load_tokenizer(path: str, local_only: bool, token=None, trust_remote_code=False, max_seq_length=None):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, token=token, trust_remote_code=trust_remote_code,
                                            local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - any failure here is reported the same way
        raise ModelLoadError(f"could not load the tokenizer of '{path}': {e}. A model folder needs its tokenizer "
                             "files (tokenizer.json or tokenizer.model) beside config.json.") from e
    if tok.pad_token is None:
        # Padding never trains (labels are -100 there), so reusing an existing token is safe.
        tok.pad_token = tok.unk_token if getattr(tok, "unk_token", None) else tok.eos_token
    tok.padding_side = "right"
    if not getattr(tok, "chat_template", None):
        from turbotune.data.chat_templates import ensure_chat_template
        ensure_chat_template(tok)  # a base model without one gets ChatML, so chat data can be formatted
    if max_seq_length:
        tok.model_max_length = max_seq_length
    return tok


def load_model_and_tokenizer(model_name_or_path=None, max_seq_length=2048, dtype=None, load_in_4bit=False,
                             token=None, trust_remote_code=False, device_map=None, double_quant=True,
                             allow_pickle=False, attn_implementation="sdpa", patch=True, verbose=True,
                             full_finetuning=False):
    from transformers import AutoModelForCausalLM

    path, local_only = resolve_model_path(model_name_or_path, token)
    config = load_config(path, local_only, token, trust_remote_code)
    device = default_device() if device_map is None else None
    dtype = resolve_dtype(dtype, device or default_device())
    _check_weight_format(path, allow_pickle)

    notes = []
    if attn_implementation == "sdpa" and supports_sdpa(config) is False:
        # e.g. Gemma 2, whose attention soft-caps its logits: transformers refuses SDPA for it.
        attn_implementation = "eager"
        notes.append(f"attention: eager (transformers has no SDPA path for {config.model_type})")
    kwargs = dict(token=token, trust_remote_code=trust_remote_code, local_files_only=local_only,
                  attn_implementation=attn_implementation, **dtype_kwargs(dtype))
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    prequantized = _is_prequantized_4bit(config)
    if prequantized and not is_available("bitsandbytes"):
        raise ModelLoadError(f"{path} is a pre-quantised bitsandbytes checkpoint; install bitsandbytes to load it")
    if load_in_4bit and not prequantized:
        kwargs["quantization_config"] = quantization_config_for(dtype, double_quant)
    quantized = load_in_4bit or prequantized
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif quantized:
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(f"out of memory while loading '{path}' in {dtype}: try load_in_4bit=True "
                             "(--load-in-4bit) or a smaller model") from e
    except OSError as e:
        if local_only and not os.path.isdir(path):
            raise ModelLoadError(_offline_message(path)) from e
        raise ModelLoadError(f"could not load the weights of '{path}': {e}") from e
    if not quantized and device_map is None and device.type == "cuda":
        model.to(device)

    tokenizer = load_tokenizer(path, local_only, token, trust_remote_code, max_seq_length)
    model.max_seq_length = max_seq_length
    model.config.use_cache = False  # training default; for_inference turns it back on

    if patch:
        from turbotune.model.families import patch_model
        report = patch_model(model)
        notes.append(report.summary())
    if verbose:
        print(load_summary(model, path, dtype, quantized, notes), flush=True)
    return model, tokenizer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). A 4-bit Params4bit packs two weights per byte: count logical weights."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = int(getattr(p, "quant_state", None) and p.quant_state.shape.numel() or n * 2)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_summary(model, path, dtype, quantized, notes=()) -> str:
    _, total = count_parameters(model)
    device = next(model.parameters()).device
    dname = str(dtype).replace("torch.", "")
    line = (f"[turbotune] loaded {Path(path).name} ({model.config.model_type}, {total / 1e6:.1f}M parameters) "
            f"in {dname} on {device}")
    if quantized:
        line += "; base weights 4-bit NF4, embeddings and lm_head stay 16-bit"
    for n in notes:
        if n:
            line += f"\n[turbotune] {n}"
    return line
