"""Saving results: the LoRA adapter as it is, or merged into 16-bit base weights (safetensors).

A 4-bit base is dequantised before merging, so the merged model is a plain 16-bit checkpoint that any
transformers install loads. GGUF export is not implemented yet; llama.cpp's convert_hf_to_gguf.py turns the
merged folder into GGUF.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import write_atomically
from .errors import TurbotuneError


def export(adapter, out, how="merged", base=None, dtype=None) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise TurbotuneError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    if how == "adapter":
        return _copy_adapter(adapter, Path(out))
    if how == "merged":
        return merge_adapter(adapter, Path(out), base=base, dtype=dtype)
    raise TurbotuneError(f"unknown export kind {how!r}: use 'adapter' or 'merged'")


def _copy_adapter(adapter: Path, out: Path) -> Path:
    import shutil

    def write(tmp: Path):
        for f in adapter.iterdir():
            if f.is_file() and not f.name.startswith("trainer_state"):
                shutil.copy2(f, tmp / f.name)

    return write_atomically(out, write)


def merge_adapter(adapter: Path, out: Path, base=None, dtype=None) -> Path:
    """W' = W + s·B·A for every LoRA layer, saved as 16-bit safetensors with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ._compat import dtype_kwargs
    from .loader import load_tokenizer, resolve_dtype, resolve_model_path

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = base or cfg.get("base_model_name_or_path")
    path, local_only = resolve_model_path(base)
    dt = resolve_dtype(dtype)
    if dt == torch.float32 and torch.cuda.is_available():
        dt = torch.bfloat16
    # Load the base unquantised: merging into NF4 would round the update away.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **dtype_kwargs(dt))
    qcfg = getattr(model.config, "quantization_config", None)
    if qcfg is not None:
        raise TurbotuneError(f"{base} is a pre-quantised checkpoint; merge into its 16-bit original instead "
                             "(pass --model with the unquantised base)")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else path
    tok = load_tokenizer(tok_src, True if tok_src == str(adapter) else local_only)

    def write(tmp: Path):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return write_atomically(out, write)
