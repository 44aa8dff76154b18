"""Saving results: the LoRA adapter as it is, or merged into 16-bit base weights (safetensors).

The merge is computed in fp32 and rounded once, when written: in the base checkpoint's own dtype when that is
bf16 or fp16, else in bf16 (fp32's exponent range, so nothing overflows); `dtype=` overrides. It is streamed, one
base tensor at a time (stream_merge.py; PEFT's merge_and_unload on the whole model for what that does not cover,
and as the tests' reference). An adapter trained on a 4-bit base is merged into that base as training saw it
(NF4, dequantised; merge.py), unless `merge_into="original"`; either way the merged model is a plain 16-bit
checkpoint that any transformers install loads, and the export prints how far its logits are from the adapter's
on the base it was trained against.
`how="gguf"` merges the same way (in fp32) and writes one llama.cpp GGUF file (`quant=`: F16, BF16, Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0; k-quants through llama.cpp) for the Llama-shaped families (export/gguf.py); `how="ollama"` writes
that GGUF plus an Ollama Modelfile beside it: its chat template in Ollama's syntax and every end-of-turn token as a
stop (export/ollama.py).
"""
from __future__ import annotations

import gc
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


def _load_4bit(path: str, local_only: bool, prequantized: bool, trained: dict):
    """The base loaded in 4 bits as training loaded it (bitsandbytes' quantisation in transformers' load)."""
    from transformers import AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs
    from turbotune.model.loader import quantization_config_for

    compute, _ = _compute_dtype(trained)
    kwargs = {"device_map": {"": "cpu"}, **dtype_kwargs(compute)}
    if not prequantized:
        kwargs["quantization_config"] = quantization_config_for(compute, trained.get("double_quant", True))
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **kwargs)


def _load_base(path: str, local_only: bool, four_bit: bool, prequantized: bool, trained: dict):
    """The base in fp32: as stored, or (four_bit) quantised to NF4 as training loaded it, then dequantised."""
    from transformers import AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs
    from turbotune.export.merge import dequantised_base

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, **dtype_kwargs(torch.float32))
    return dequantised_base(_load_4bit(path, local_only, prequantized, trained), _compute_dtype(trained)[0])


def _plan(adapter: Path, base, dtype, merge_into) -> dict:
    """What a merged export does: the base's path, what it was trained on and is merged into, the dtype, the probe."""
    from turbotune.model.loader import _is_prequantized_4bit, load_config, resolve_model_path
    from turbotune.export.merge import merge_target, probe_ids

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
    return dict(cfg=cfg, path=path, local_only=local_only, config=config, trained=trained,
                prequantized=prequantized, trained_on=trained_on, into=into, target=target, why=why, ids=ids)


def _in_memory_merge(adapter: Path, p: dict):
    """The reference merge: PEFT's merge_and_unload on the whole base in fp32, then cast: the base, the merged
    copy in the export dtype and the saved state at its peak. Returns (write_weights(tmp), logit difference)."""
    from peft import PeftModel

    from turbotune.export.merge import logit_difference, logits

    load = (p["path"], p["local_only"])
    model = PeftModel.from_pretrained(_load_base(*load, p["trained_on"] == "nf4", p["prequantized"], p["trained"]),
                                      str(adapter))
    reference = logits(model, p["ids"])  # the adapter, unmerged, on the base it was trained against
    if p["into"] != p["trained_on"]:
        del model
        model = PeftModel.from_pretrained(_load_base(*load, p["into"] == "nf4", p["prequantized"], p["trained"]),
                                          str(adapter))
    merged = model.merge_and_unload().to(p["target"])
    diff = logit_difference(logits(merged, p["ids"]), reference)
    return (lambda tmp: merged.save_pretrained(str(tmp), safe_serialization=True)), diff


def _streamed_merge(adapter: Path, p: dict, tmp: Path, max_shard_bytes: int) -> dict:
    """The streamed merge (stream_merge.py) written into `tmp`, then the probe: the adapter on its training base,
    then the merged model as written, each loaded alone and freed. Peak memory: about one fp32 copy of the base,
    the probe's reference (1.23-1.24x the fp32 size above the imports, measured in tests/export/test_streaming.py,
    where the in-memory merge took 1.66x; the merge itself holds one base tensor, plus the 4-bit base into NF4).
    Returns the logit difference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs
    from turbotune.export import stream_merge as sm
    from turbotune.export.merge import dequantised_base, logit_difference, logits

    files, (compute, _) = sm.checkpoint_files(p["path"]), _compute_dtype(p["trained"])
    pairs, _ = sm.lora_pairs(adapter, p["cfg"])
    model4 = _load_4bit(p["path"], p["local_only"], False, p["trained"]) if p["into"] == "nf4" else None
    sm.write_merged(tmp, sm.SafetensorsFolder(files, "pt"), sm.base_weights(files, p["into"], model4, compute),
                    adapter, pairs, p["target"], bool(p["cfg"].get("fan_in_fan_out")), max_shard_bytes)
    sm.write_config(tmp, p["path"], p["config"], p["target"], p["local_only"])
    if model4 is not None and p["trained_on"] == "nf4":  # the reference's base: the same 4-bit load, dequantised
        base_model, model4 = dequantised_base(model4, compute), None
    else:
        del model4
        base_model = _load_base(p["path"], p["local_only"], p["trained_on"] == "nf4", False, p["trained"])
    reference = logits(PeftModel.from_pretrained(base_model, str(adapter)), p["ids"])
    del base_model
    gc.collect()  # the PEFT wrapping's cycles: the base goes before the merged model comes
    merged = AutoModelForCausalLM.from_pretrained(str(tmp), **dtype_kwargs(p["target"]))
    got = logits(merged, p["ids"])
    del merged
    return logit_difference(got, reference)


def merge_adapter(adapter: Path, out: Path, base=None, dtype=None, stream=None, merge_into="auto",
                  streamed: bool = True, max_shard_bytes: int | None = None) -> Path:
    """W' = W + s·B·A for every LoRA layer, W the base the adapter was trained against (merge.py), computed in
    fp32, saved as 16-bit safetensors with the tokenizer; prints the dtype and the logit difference. Streamed,
    one base tensor at a time (stream_merge.py), unless `streamed=False` or the adapter or base needs the in-memory
    merge (PEFT's merge_and_unload on the whole model, the reference)."""
    from turbotune.export import stream_merge as sm
    from turbotune.model.loader import load_tokenizer

    p = _plan(adapter, base, dtype, merge_into)
    into, trained_on, target = p["into"], p["trained_on"], p["target"]
    why_not = (sm.unsupported(adapter, p["cfg"], p["path"], p["config"], into, p["prequantized"]) if streamed
               else "asked for")
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else p["path"]
    tok = load_tokenizer(tok_src, True if tok_src == str(adapter) else p["local_only"])
    report = {"merged_into": into, "trained_on": trained_on, "dtype": str(target).replace("torch.", ""),
              "probe_tokens": int(p["ids"].shape[1])}
    if "nf4" in (into, trained_on):
        report["nf4_dequantised_in"], report["nf4_dtype_source"] = (
            str(v).replace("torch.", "") for v in _compute_dtype(p["trained"]))
    if why_not is not None:
        write_weights, diff = _in_memory_merge(adapter, p)

    def write(tmp: Path):
        nonlocal diff
        if why_not is None:
            diff = _streamed_merge(adapter, p, tmp, max_shard_bytes or sm.MAX_SHARD_BYTES)
        else:
            write_weights(tmp)
        tok.save_pretrained(str(tmp))
        report.update(logits_max_abs_diff=diff["max_abs"], logits_relative_diff=diff["relative"])
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2))

    written = write_atomically(out, write)
    say = stream or sys.stdout
    print(f"[turbotune] merged weights written in {report['dtype']} ({p['why']})"
          + ("" if why_not is None else f"; merged in memory ({why_not})" if streamed else ""), file=say, flush=True)
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
