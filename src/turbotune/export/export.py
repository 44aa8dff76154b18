"""Saving results: the LoRA adapter as it is, or merged into 16-bit base weights (safetensors).

The merge is computed in fp32 and rounded once, when written: in the base checkpoint's own dtype when that is
bf16 or fp16, else in bf16 (fp32's exponent range, so nothing overflows); `dtype=` overrides. An adapter trained
on a 4-bit base is merged into that base as training saw it (NF4, dequantised; merge.py), unless
`merge_into="original"`; either way the merged model is a plain 16-bit checkpoint that any transformers install
loads, and the export prints how far its logits are from the adapter's on the base it was trained against.
`how="gguf"` merges the same way (in fp32) and writes one llama.cpp GGUF file (`quant=`: F16, BF16, Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0; k-quants through llama.cpp) for the Llama-shaped families (export/gguf.py); `how="ollama"` writes
that GGUF plus an Ollama Modelfile beside it: its chat template in Ollama's syntax and every end-of-turn token as a
stop (export/ollama.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from turbotune.training.checkpoints import write_atomically
from turbotune.errors import TurbotuneError


def export(adapter, out, how="merged", base=None, dtype=None, stream=None, merge_into="auto", quant=None,
           overwrite=False) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise TurbotuneError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    if not overwrite and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise TurbotuneError(f"{out} exists and is not empty: nothing was written. Choose another --out, or pass "
                             "--overwrite (overwrite=True) to replace it")
    if how == "adapter":
        return _copy_adapter(adapter, Path(out))
    if quant is not None and how not in ("gguf", "ollama"):
        raise TurbotuneError(f"quant={quant!r} is for GGUF export (how='gguf' or 'ollama'), not {how!r}")
    if how == "merged":
        return merge_adapter(adapter, Path(out), base=base, dtype=dtype, stream=stream, merge_into=merge_into)
    if how in ("gguf", "ollama"):
        if dtype is not None:
            raise TurbotuneError("dtype is for merged exports; a GGUF's tensor types come from quant= "
                                 "(f16, bf16, q8_0, q4_0, ...)")
        if how == "ollama":
            from turbotune.export.ollama import export_ollama as write
        else:
            from turbotune.export.gguf import export_gguf as write
        return write(adapter, Path(out), quant=quant or "f16", base=base, stream=stream, merge_into=merge_into)
    raise TurbotuneError(f"unknown export kind {how!r}: use 'adapter', 'merged', 'gguf' or 'ollama'")


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
    from turbotune.model.loader import resolve_dtype

    if requested is not None:
        return resolve_dtype(requested, torch.device("cpu")), "as --dtype asked"
    if stored in _SIXTEEN_BIT:
        return stored, "the base checkpoint's own dtype"
    was = f"stored in {str(stored).replace('torch.', '')}" if stored is not None else "of unrecorded dtype"
    return torch.bfloat16, (f"the base checkpoint is {was}; bf16 halves the size and keeps fp32's exponent range, "
                            "so nothing overflows (--dtype fp32 keeps full precision)")


def trained_settings(adapter: Path) -> dict:
    """The run's settings turbotune saved beside the adapter (trainer_state.json), or {} for another tool's."""
    state = adapter / "trainer_state.json"
    if not state.is_file():
        return {}
    data = json.loads(state.read_text(encoding="utf-8"))
    return {**data.get("config", {}), **({"compute_dtype": data["compute_dtype"]} if "compute_dtype" in data else {})}


def _compute_dtype(trained: dict) -> tuple[torch.dtype, str]:
    """The dtype the 4-bit weights were dequantised to in training: recorded, else bf16 (the GPU default)."""
    from turbotune.model.loader import resolve_dtype
    name = trained.get("compute_dtype") or trained.get("dtype")
    if name:
        return resolve_dtype(name, torch.device("cpu")), "as the run recorded"
    return torch.bfloat16, "bf16 assumed: the run did not record its compute dtype"


def _load_base(path: str, local_only: bool, four_bit: bool, prequantized: bool, trained: dict):
    """The base in fp32: as stored, or (four_bit) quantised to NF4 as training loaded it, then dequantised."""
    from transformers import AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs
    from turbotune.export.merge import dequantised_base

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **dtype_kwargs(torch.float32))
    from turbotune.model.loader import quantization_config_for
    compute, _ = _compute_dtype(trained)
    kwargs = {"device_map": {"": "cpu"}, **dtype_kwargs(compute)}
    if not prequantized:
        kwargs["quantization_config"] = quantization_config_for(compute, trained.get("double_quant", True))
    model4 = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **kwargs)
    return dequantised_base(model4, compute)


def merge_adapter(adapter: Path, out: Path, base=None, dtype=None, stream=None, merge_into="auto") -> Path:
    """W' = W + s·B·A for every LoRA layer, W the base the adapter was trained against (merge.py), computed in
    fp32, saved as 16-bit safetensors with the tokenizer; prints the dtype and the logit difference."""
    from peft import PeftModel

    from turbotune.model.loader import _is_prequantized_4bit, load_config, load_tokenizer, resolve_model_path
    from turbotune.export.merge import logit_difference, logits, merge_target, probe_ids

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = base or cfg.get("base_model_name_or_path")
    path, local_only = resolve_model_path(base)
    config = load_config(path, local_only)
    trained, prequantized = trained_settings(adapter), _is_prequantized_4bit(config)
    trained_on = merge_target("auto", bool(trained.get("load_in_4bit")), prequantized)
    into = merge_target(merge_into, bool(trained.get("load_in_4bit")), prequantized)
    if into == "original" and prequantized:
        raise TurbotuneError(f"{base} is a pre-quantised checkpoint: its original 16-bit weights are not here; "
                             "merge into NF4 (the default) or pass --model with the unquantised base")
    target, why = choose_export_dtype(dtype, checkpoint_dtype(config))
    ids = probe_ids(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)
    model = PeftModel.from_pretrained(_load_base(path, local_only, trained_on == "nf4", prequantized, trained),
                                      str(adapter))
    reference = logits(model, ids)  # the adapter, unmerged, on the base it was trained against
    if into != trained_on:
        del model
        model = PeftModel.from_pretrained(_load_base(path, local_only, into == "nf4", prequantized, trained),
                                          str(adapter))
    merged = model.merge_and_unload().to(target)
    diff = logit_difference(logits(merged, ids), reference)
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else path
    tok = load_tokenizer(tok_src, True if tok_src == str(adapter) else local_only)

    report = {"merged_into": into, "trained_on": trained_on, "dtype": str(target).replace("torch.", ""),
              "probe_tokens": int(ids.shape[1]), "logits_max_abs_diff": diff["max_abs"],
              "logits_relative_diff": diff["relative"]}
    if "nf4" in (into, trained_on):
        report["nf4_dequantised_in"], report["nf4_dtype_source"] = (
            str(v).replace("torch.", "") for v in _compute_dtype(trained))

    def write(tmp: Path):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2))

    written = write_atomically(out, write)
    say = stream or sys.stdout
    print(f"[turbotune] merged weights written in {report['dtype']} ({why})", file=say, flush=True)
    nf4 = (f" (4-bit weights dequantised in {report['nf4_dequantised_in']}, {report['nf4_dtype_source']})"
           if "nf4_dequantised_in" in report else "")
    where = ("the weights the adapter was trained against" if into == trained_on
             else f"not the weights the adapter was trained against: the {_BASE_NAMES[trained_on]}")
    print(f"[turbotune] merged into the {_BASE_NAMES[into]}, {where}{nf4}; logits as written against the adapter "
          f"on its training base, {report['probe_tokens']} tokens: max |diff| {diff['max_abs']:.3g} "
          f"({100 * diff['relative']:.3f}% of the largest logit)", file=say, flush=True)
    return written


MERGE_REPORT = "turbotune_merge.json"  # what was merged into what, and the measured logit difference


_BASE_NAMES = {"nf4": "NF4 base, dequantised", "original": "original 16-bit base"}
