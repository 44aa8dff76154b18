"""What `turbotune bench` measures with: model presets, the method registry, FLOPs per token, helpers.

Nothing here imports torch or transformers at module level, so the parent can validate arguments and
list methods cheaply; the functions that need them import them when called.

Preset configs are written from the models' public config facts as plain dicts (no hub access). A preset
model is random-initialised once with a fixed seed, saved as bf16 safetensors with a placeholder
tokenizer and a marker file, and reused by every method of every run that asks for the same
(preset, seed).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The planner's ModelShape is the one config view, for FLOPs (here) as for memory (planner/predict.py).
from turbotune.planner.shapes import PRESETS, ModelShape, preset_dict

# The seven projections every method adapts with LoRA.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MARKER = "turbotune_bench_model.json"  # written last: its presence means the cached folder is complete

# ----------------------------------------------------------------------------------------------------------
# Presets (public config facts; only what the architecture needs)
# ----------------------------------------------------------------------------------------------------------
class BenchError(Exception):
    """A usage problem reported to the user as one clear line (exit code 2)."""


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                         "(or pass --model PATH for a local model folder)")
    return preset_dict(name)


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodInfo:
    name: str
    requires: tuple[str, ...]  # top-level modules that must be importable (checked with find_spec)
    pre_import: tuple[str, ...] = ()  # imported before anything else in the worker (unsloth patches transformers)
    extra_warmup: int = 0  # forward+backward passes before step 1 that do not update weights (compilation)
    gpu_only: bool = False  # left out of the default method list on CPU
    description: str = ""


METHODS: dict[str, MethodInfo] = {
    "hf": MethodInfo("hf", ("transformers", "peft"),
                     description="transformers + PEFT LoRA, sdpa, non-reentrant gradient checkpointing"),
    "turbotune": MethodInfo("turbotune", ("transformers", "peft"),
                            description="turbotune.FastModel (fused Triton kernels + manual backward)"),
    "turbotune-auto": MethodInfo("turbotune-auto", ("transformers", "peft"),
                                 description="turbotune with use_gradient_checkpointing='auto' (the fastest plan "
                                             "that fits the card)"),
    "turbotune-min-memory": MethodInfo("turbotune-min-memory", ("transformers", "peft"),
                                       description="turbotune with every layer checkpointed and offloaded"),
    "turbotune-bf16": MethodInfo("turbotune-bf16", ("transformers", "peft"),
                                 description="turbotune with a 16-bit base even under --qlora (shows the 4-bit "
                                             "overhead in the same run)"),
    "turbotune-train": MethodInfo("turbotune-train", ("transformers", "peft"),
                                  description="turbotune's own Trainer (`turbotune train`: packing, CUDA graphs) "
                                              "on rows of the same length mix (--trainer sft only)"),
    "unsloth": MethodInfo("unsloth", ("unsloth",), pre_import=("unsloth",), extra_warmup=2, gpu_only=True,
                          description="unsloth.FastLanguageModel"),
    "liger": MethodInfo("liger", ("liger_kernel", "transformers", "peft"), gpu_only=True,
                        description="the hf recipe with liger-kernel's apply_liger_kernel_to_<family> patches"),
}
DEFAULT_METHODS = ("hf", "turbotune")
OPTIONAL_METHODS = ("unsloth", "liger")


def missing_requirement(info: MethodInfo) -> str | None:
    """Why the method cannot be imported (a missing top-level module), or None."""
    for mod in info.requires:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"package {mod!r} is not installed"
    return None


# ----------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------
def median(values) -> float:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median of an empty list")
    return float(statistics.median(values))


def ratio(value, base) -> float | None:
    """value / base, or None when either is missing or base is not positive."""
    if value is None or base is None or not base > 0:
        return None
    return float(value) / float(base)


def max_rel_diff(values, reference) -> float | None:
    """max_i |values[i] - reference[i]| / |reference[i]| over the common prefix; None if nothing comparable."""
    diffs = []
    for v, r in zip(values or [], reference or []):
        if v is None or r is None or not (math.isfinite(v) and math.isfinite(r)) or r == 0:
            return None if not diffs else max(diffs)
        diffs.append(abs(v - r) / abs(r))
    return max(diffs) if diffs else None


def flops_per_token(dims: ModelShape, seq_len: int, lora_r: int, target_modules=TARGET_MODULES) -> dict:
    """Model FLOPs per trained token of one LoRA optimizer step (see bench/README.md).

    N_matmul = weights of the per-layer projections plus the LM head (embedding lookups and norms are not
    matmuls). The base is frozen, so its backward computes input gradients only:
      base       forward 2*N_matmul + backward 2*N_matmul                  = 4*N_matmul
      LoRA       forward 2*P + backward (input grads 2*P + weight grads 2*P) = 6*P   (P = LoRA parameters)
      attention  QK^T and PV: forward 4*seq*d_attn per layer, backward twice that, causal mask halves both
                 = 6*seq*d_attn*layers                                    (d_attn = heads*head_dim)
    Recomputation by gradient checkpointing is not counted (it is overhead, not model work).
    """
    shapes = dims.linear_shapes()
    per_layer = sum(a * b for a, b in shapes.values())
    n_matmul = dims.layers * per_layer + dims.hidden * dims.vocab
    p_lora = dims.layers * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in target_modules)
    d_attn = dims.heads * dims.head_dim
    attn_fwd = 4 * seq_len * d_attn * dims.layers / 2  # causal
    attn = 3 * attn_fwd  # forward + backward (2x forward)
    base = 4 * n_matmul
    lora = 6 * p_lora
    total = base + lora + attn
    full_ft = 6 * n_matmul + attn  # for reference: full fine-tuning, weight grads of every matmul
    return {"n_matmul": n_matmul, "lora_params": p_lora, "base": base, "lora": lora, "attention": attn,
            "total": total, "full_finetune_total": full_ft}


# ----------------------------------------------------------------------------------------------------------
# Cached preset model
# ----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "turbotune" / "bench"


def preset_key(name: str, seed: int) -> str:
    digest = hashlib.sha256(json.dumps(PRESETS[name], sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-seed{seed}-{digest}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _placeholder_tokenizer(cfg: dict):
    """A word-level tokenizer with one token per id ("<t17>"), so loaders that insist on a tokenizer work.

    The benchmark feeds random ids; only `--trainer dpo` tokenises text, rows written in these tokens (preference.py).
    Special tokens sit at the config's ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(cfg["vocab_size"])
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = int(cfg.get("bos_token_id") or 1), int(cfg.get("eos_token_id") or 2)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", bos_token=f"<t{bos}>",
                                   eos_token=f"<t{eos}>", pad_token=f"<t{eos}>",
                                   model_max_length=int(cfg.get("max_position_embeddings", 4096)))


def build_preset_model(name: str, seed: int, cache_dir: Path, device: str, log=print) -> Path:
    """Folder of the (preset, seed) model, random-initialised and saved once (bf16 safetensors)."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs

    cfg_dict = preset_config(name)
    cache_dir = Path(cache_dir).expanduser()
    out = cache_dir / preset_key(name, seed)
    if is_complete(out):
        log(f"reusing cached {name} model (seed {seed}) at {out}")
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    build_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    log(f"building the {name} preset once (random init, seed {seed}, on {build_device}) into {out}")
    t0 = time.perf_counter()
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=cache_dir))
    try:
        torch.manual_seed(seed)
        if build_device == "cuda":
            torch.cuda.manual_seed_all(seed)
        with torch.device(build_device):
            model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.bfloat16))
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        if build_device == "cuda":
            torch.cuda.empty_cache()
        _placeholder_tokenizer({"model_type": model_type, **cfg_dict}).save_pretrained(str(tmp))
        marker = {"preset": name, "seed": seed, "built_on": build_device, "dtype": "bfloat16",
                  "random_init": True, "tokenizer": "placeholder: one word-level token per id, not for text",
                  "config": PRESETS[name]}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if out.exists():  # a concurrent run finished first, or a stale incomplete folder
            if is_complete(out):
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built {name} in {time.perf_counter() - t0:.1f} s")
    return out


def read_model_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise BenchError(f"{folder} is not a model folder (no config.json)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------
# Data and the matmul rate
# ----------------------------------------------------------------------------------------------------------
def make_batches(seed: int, n_micro: int, micro_batch: int, seq_len: int, vocab: int):
    """Random token ids in [0, vocab) from a seeded CPU generator: identical for every method and process."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, int(vocab), (n_micro, micro_batch, seq_len), generator=g, dtype=torch.long)


def measure_matmul_rate(device: str, size: int | None = None, reps: int = 10) -> dict:
    """Median dense matmul rate (FLOP/s): bf16 on CUDA, fp32 on CPU (the dtype the methods train in)."""
    import time

    import torch

    if device == "cuda":
        size, dtype = size or 8192, torch.bfloat16
    else:
        size, dtype = size or 1024, torch.float32
        reps = min(reps, 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    t = median(times)
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "reps": reps,
            "seconds": times, "flops_per_s": 2.0 * size ** 3 / t}
