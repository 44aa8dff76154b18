"""Saving results: the LoRA adapter as it is, or merged into 16-bit base weights (safetensors).

The merge is computed in fp32 and rounded once, when written: in the base checkpoint's own dtype when that is
bf16 or fp16, else in bf16 (fp32's exponent range, so nothing overflows); `dtype=` overrides. A 4-bit base is dequantised before merging, so the merged model is a plain 16-bit checkpoint that any
transformers install loads. GGUF export is not implemented yet; llama.cpp's convert_hf_to_gguf.py turns the
merged folder into GGUF.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .checkpoints import write_atomically
from .errors import TurbotuneError


def export(adapter, out, how="merged", base=None, dtype=None, stream=None) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise TurbotuneError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    if how == "adapter":
        return _copy_adapter(adapter, Path(out))
    if how == "merged":
        return merge_adapter(adapter, Path(out), base=base, dtype=dtype, stream=stream)
    raise TurbotuneError(f"unknown export kind {how!r}: use 'adapter' or 'merged'")


def _copy_adapter(adapter: Path, out: Path) -> Path:
    import shutil

    def write(tmp: Path):
        for f in adapter.iterdir():
            if f.is_file() and not f.name.startswith("trainer_state"):
                shutil.copy2(f, tmp / f.name)

    return write_atomically(out, write)


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in, from its config (`dtype`, formerly `torch_dtype`)."""
    value = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def choose_export_dtype(requested, stored: torch.dtype | None) -> tuple[torch.dtype, str]:
    """(dtype to write, why) for a merged export."""
    from .loader import resolve_dtype

    if requested is not None:
        return resolve_dtype(requested, torch.device("cpu")), "as --dtype asked"
    if stored in _SIXTEEN_BIT:
        return stored, "the base checkpoint's own dtype"
    was = f"stored in {str(stored).replace('torch.', '')}" if stored is not None else "of unrecorded dtype"
    return torch.bfloat16, (f"the base checkpoint is {was}; bf16 halves the size and keeps fp32's exponent range, "
                            "so nothing overflows (--dtype fp32 keeps full precision)")


def merge_adapter(adapter: Path, out: Path, base=None, dtype=None, stream=None) -> Path:
    """W' = W + s·B·A for every LoRA layer, computed in fp32, saved as 16-bit safetensors with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ._compat import dtype_kwargs
    from .loader import load_config, load_tokenizer, resolve_model_path

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = base or cfg.get("base_model_name_or_path")
    path, local_only = resolve_model_path(base)
    target, why = choose_export_dtype(dtype, checkpoint_dtype(load_config(path, local_only)))
    # Load the base unquantised and in fp32: merging into NF4 or 16 bits would round the update away.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **dtype_kwargs(torch.float32))
    qcfg = getattr(model.config, "quantization_config", None)
    if qcfg is not None:
        raise TurbotuneError(f"{base} is a pre-quantised checkpoint; merge into its 16-bit original instead "
                             "(pass --model with the unquantised base)")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(target)
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else path
    tok = load_tokenizer(tok_src, True if tok_src == str(adapter) else local_only)

    def write(tmp: Path):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    written = write_atomically(out, write)
    print(f"[turbotune] merged weights written in {str(target).replace('torch.', '')} ({why})",
          file=stream or sys.stdout, flush=True)
    return written
