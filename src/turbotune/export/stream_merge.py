"""The merge streamed: base + adapter written tensor by tensor, one base tensor in memory at a time.

merge_adapter's in-memory merge (export.py) loads the whole base in fp32, wraps it with PEFT, merges, casts (a
second copy) and saves. Here the base's safetensors shards are read tensor by tensor (safe_open); a weight with a
LoRA pair in adapter_model.safetensors becomes W + s·B·A, computed in fp32 exactly as PEFT's Linear.merge does
(transpose(B @ A, fan_in_fan_out) * s, s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), then cast to the
export dtype, as the in-memory merge's `.to(dtype)` casts every floating tensor, and written straight out: each
output shard (at most MAX_SHARD_BYTES, sorted tensor names, model.safetensors.index.json when there are several) gets
its safetensors header first, from the shapes, then its tensors' bytes one after another (write_safetensors).

Into the NF4 base (merge.py), the base is loaded in 4 bits by transformers exactly as the in-memory path loads it
(bitsandbytes' own quantisation, same blocksize, double quant and compute dtype: the same weights by construction,
about a quarter of an fp32 copy held), and each weight is dequantised (quant.dequantize_nf4, as
merge.dequantised_base does) when its turn comes; the same 4-bit model, dequantised, is then the probe's reference.

What this does not cover is left to the in-memory merge, which stays the reference (`unsupported` says why): DoRA
and other LoRA variants, LoRA biases, modules_to_save, trainable token rows, embedding or other non-Linear LoRA
layers, LoRA on parameters, rank/alpha patterns, pre-quantised bases, a base that is not a local safetensors folder
whose tensor names are the model's, and NF4 without bitsandbytes.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch

MAX_SHARD_BYTES = 5 * 10**9  # as the Hub's usual shards (transformers' own default is 50 GB)
_PREFIX = "base_model.model."
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
            "trainable_token_indices": "trainable token rows", "rank_pattern": "per-module ranks",
            "alpha_pattern": "per-module alphas", "layer_replication": "layer replication",
            "target_parameters": "LoRA on parameters", "alora_invocation_tokens": "activated LoRA",
            "use_qalora": "QALoRA"}


class SafetensorsFolder:
    """Tensors of safetensors files read one at a time (safe_open): names in file order, then each file's own
    (sorted) order, as safetensors' load_file gives them; `framework` "np" or "pt"."""

    def __init__(self, files, framework: str = "np"):
        from safetensors import safe_open

        self.framework, self.where, self.shapes, self.codes = framework, {}, {}, {}
        for f in files:
            with safe_open(str(f), framework) as st:
                for key in st.keys():
                    part = st.get_slice(key)
                    self.where[key], self.shapes[key], self.codes[key] = f, tuple(part.get_shape()), part.get_dtype()

    def __iter__(self):
        return iter(self.where)

    def __getitem__(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.where[key]), self.framework) as st:
            return st.get_tensor(key)


def checkpoint_files(path) -> list[Path] | None:
    """The base's safetensors shards (from its index, or model.safetensors), None when it has none."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else None


def lora_pairs(adapter: Path, cfg: dict) -> tuple[dict | None, str | None]:
    """{base weight name: (A key, B key, scale)} from adapter_model.safetensors, or (None, why not streamable)."""
    from safetensors import safe_open

    if cfg.get("peft_type", "LORA") != "LORA":
        return None, f"a {cfg.get('peft_type')} adapter"
    refused = [what for key, what in _REFUSED.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        refused.append(f"bias={cfg['bias']!r}")
    if refused:
        return None, ", ".join(refused)
    if not (adapter / "adapter_model.safetensors").is_file():
        return None, "no adapter_model.safetensors"
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    pairs = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as st:
        keys = set(st.keys())
    for key in sorted(keys):
        if not (key.startswith(_PREFIX) and key.endswith(".lora_A.weight")):
            if not (key.startswith(_PREFIX) and key.endswith(".lora_B.weight")):
                return None, f"adapter tensor {key!r} is not a Linear LoRA pair"
            continue
        module = key[len(_PREFIX):-len(".lora_A.weight")]
        if f"{_PREFIX}{module}.lora_B.weight" not in keys:
            return None, f"{module} has lora_A without lora_B"
        pairs[f"{module}.weight"] = (key, f"{_PREFIX}{module}.lora_B.weight", scale)
    if len(pairs) * 2 != len(keys):
        return None, "lora_B without lora_A"
    return pairs, None


def unsupported(adapter: Path, cfg: dict, path: str, config, into: str, prequantized: bool) -> str | None:
    """Why the streamed merge can't do this export (the in-memory one does it), or None."""
    from turbotune._compat import is_available

    if sys.byteorder != "little":
        return "safetensors' data is little-endian; this machine is not"
    if prequantized:
        return "the base is pre-quantised"
    if into == "nf4" and not is_available("bitsandbytes"):
        return "merging into NF4 needs bitsandbytes"
    files = checkpoint_files(path)
    if files is None:
        return "the base is not a local safetensors checkpoint"
    pairs, why = lora_pairs(adapter, cfg)
    if why:
        return why
    names = set(SafetensorsFolder(files).where)
    missing = sorted(set(pairs) - names)
    if missing:
        return f"adapted weight {missing[0]} is not in the base checkpoint"
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # the model's own tensor names, nothing allocated
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - remote code, an unknown architecture: the in-memory merge decides
        return f"the model could not be built to check its tensor names ({type(e).__name__})"
    expected, aliases = set(model.state_dict()), {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tied = sorted(n for group in aliases.values() if len(group) > 1 for n in group if n in pairs)
    if tied:  # PEFT's merge changes every name of a tied weight; the checkpoint may hold one of them
        return f"LoRA on a tied weight ({tied[0]})"
    if not names <= expected:
        return f"checkpoint tensor {sorted(names - expected)[0]} is not the model's (renamed on load)"
    if cfg.get("fan_in_fan_out") and into == "nf4":
        return "fan_in_fan_out (Conv1D) layers merged into NF4"
    return None


def base_weights(files, into: str, model4=None, compute_dtype=None):
    """name → the base weight in fp32 as the in-memory merge holds it: the checkpoint's tensor widened, or (into
    NF4) the 4-bit model's, its quantised weights dequantised in `compute_dtype` (merge.dequantised_base's values)."""
    if into != "nf4":
        folder = SafetensorsFolder(files, "pt")
        return lambda name: _widened(folder[name])
    from turbotune.model.quant import dequantize_nf4

    def weight(name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        t = getattr(model4.get_submodule(module_name), attr)
        if getattr(t, "quant_state", None) is None:
            return _widened(t.detach())
        w = dequantize_nf4(t, dtype=compute_dtype)  # a shared buffer: copied (or widened) before the next call
        return w.clone() if w.dtype == torch.float32 else w.float()

    return weight


def _widened(t: torch.Tensor) -> torch.Tensor:
    """fp32, as from_pretrained(dtype=fp32) and Module.float() make floating tensors (the rest as they are)."""
    return t.float() if t.is_floating_point() else t


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names (sorted) grouped in order into shards of at most max_bytes (a larger tensor alone in its own)."""
    shards, used = [[]], 0
    for name in sorted(sizes):
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_CODE_OF = {**_CODES, torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(file: Path, entries: list[tuple[str, tuple, str]], tensor_of) -> None:
    """A safetensors file written tensor by tensor: its header (name → dtype code, shape, offsets, for every
    (name, shape, code) of `entries`, in that order) first, then each tensor_of(name)'s bytes as it comes, so only
    one tensor is in memory. safetensors' own format: little-endian data, the header padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, code in entries:
        size = math.prod(shape) * _ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, code in entries:
            t = tensor_of(name).contiguous()
            if tuple(t.shape) != tuple(shape) or _CODE_OF.get(t.dtype, code) != code:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} {code}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def write_merged(dest: Path, base: SafetensorsFolder, weight_of, adapter: Path, pairs: dict, target: torch.dtype,
                 fan_in_fan_out: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Every tensor of `base`, W + s·B·A where the adapter has a pair for it, floating ones cast to `target`, as
    safetensors shards under `dest` of at most max_shard_bytes, each written tensor by tensor (write_safetensors):
    one base tensor in memory at a time. Returns the shard files."""
    from safetensors import safe_open

    codes = {n: (_CODES[target] if c in ("F64", "F32", "BF16", "F16") else c) for n, c in base.codes.items()}
    sizes = {n: math.prod(s) * _ITEMSIZE[codes[n]] for n, s in base.shapes.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    files = [dest / ("model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
             for i in range(len(shards))]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as lora:
        def merged(name: str) -> torch.Tensor:
            w = weight_of(name)
            if name in pairs:  # as PEFT's Linear.merge: W += transpose(B @ A, fan_in_fan_out) * s, in fp32
                a, b, scale = pairs[name]
                delta = lora.get_tensor(b).float() @ lora.get_tensor(a).float()
                w = w + (delta.T if fan_in_fan_out else delta) * scale
            return w.to(target) if w.is_floating_point() else w

        for names, file in zip(shards, files):
            write_safetensors(file, [(n, base.shapes[n], codes[n]) for n in names], merged)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: f.name for names, f in zip(shards, files) for n in names}}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def write_config(dest: Path, path: str, config, target: torch.dtype, local_only: bool) -> None:
    """config.json (dtype: the written one, no quantisation) and the base's generation config, as save_pretrained."""
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    config.dtype = target
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(dest))
    try:
        generation = GenerationConfig.from_pretrained(path, local_files_only=local_only)
    except OSError:  # none saved: what from_pretrained builds from the model's config
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(str(dest))
