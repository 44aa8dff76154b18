"""The one-step self-test of `turbotune check`: turbotune's patched model against stock transformers + PEFT.

A tiny Llama is written to a temporary folder (config + safetensors + a small tokenizer built in memory), so
the real loading code runs with no hub and no network. It is loaded twice, `patch=False` (stock forwards) and
`patch=True` (turbotune's fused forwards); each gets LoRA r=8 and trains one step (forward, backward, AdamW)
on the same random batch. Where bitsandbytes is installed, the same pair runs again in 4-bit (QLoRA: the
weights quantised to NF4 by bitsandbytes at load), and every 4-bit weight of the patched model, dequantised
by turbotune (the Triton kernel on a GPU, its reference on the CPU), must equal bitsandbytes' own
dequantisation bit for bit. Before the measured step each variant runs one unmeasured forward + backward, so
one-time costs (Triton compilation, cuBLAS set-up) do not land in the timing; the optimizer has not stepped
then, so the measured loss is still the loss of the initial weights and both variants must agree on it.

Memory: on a GPU, `torch.cuda.max_memory_allocated` over the measured step (reset just before it), so it
includes the weights. On the CPU, how much the process's resident memory (RSS) grew above its level just
before the step (peak from the kernel's VmHWM where it can be reset, else sampled with psutil). That is
coarse: the allocator keeps and reuses freed pages, so treat CPU figures and their ratio as indicative only.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import threading
import time
import warnings

LORA_R = 8
CPU_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
CPU_BATCH = (2, 64)
# On a GPU the model is bigger (a real-sized vocabulary, so the logits are large) and so is the batch,
# which makes turbotune's memory savings visible. The tokenizer keeps 256 ids; the batch is random ids.
GPU_MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
GPU_BATCH = (4, 512)
# Relative tolerances, turbotune vs stock: loss, and the norm of the LoRA gradients.
LOSS_RTOL = {"fp32": 1e-4, "half": 2e-2}
GRAD_RTOL = {"fp32": 1e-3, "half": 5e-2}
# (name, patch, load_in_4bit); the 4-bit pair runs where bitsandbytes imports.
VARIANTS = (("stock", False, False), ("turbotune", True, False),
            ("stock-4bit", False, True), ("turbotune-4bit", True, True))
PAIRS = (("turbotune", "stock", ""), ("turbotune-4bit", "stock-4bit", "4-bit "))  # (ours, reference, label)
_TOKENIZER_SPECIALS = ("<unk>", "<s>", "</s>")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def write_tiny_model(folder: str, model_kwargs: dict, seed: int = 0) -> None:
    """A random-weight Llama plus a 256-entry character-level tokenizer, saved as a normal HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, **model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    del model

    vocab = {tok: i for i, tok in enumerate(_TOKENIZER_SPECIALS)}
    for code in range(33, 33 + 256 - len(vocab)):  # printable characters fill the rest
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.save_pretrained(folder)


def _forward_loss(model, batch):
    """The loss of one forward (a seam: tests replace it to force a bad loss)."""
    return model(input_ids=batch, labels=batch).loss


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc) so the next RSS baseline is honest."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc: the measurement is just coarser
        pass


class _CpuPeak:
    """Peak growth of the process RSS inside a `with` block (bytes in .delta)."""

    def __init__(self):
        import psutil
        self._proc = psutil.Process()
        self.delta = 0
        self._stop = threading.Event()

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self._use_hwm = False
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._use_hwm = self._hwm() is not None
        except OSError:
            pass
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._thread = None
        if not self._use_hwm:  # no kernel peak counter: sample (a thread that competes for the GIL)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(self._peak, self._proc.memory_info().rss)
        if self._use_hwm:
            peak = max(peak, self._hwm() or 0)
        self.delta = max(0, peak - self._base)
        return False


def _lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def nf4_mismatches(model) -> tuple[int, list[str]]:
    """(NF4 weights checked, names of those whose turbotune dequantisation differs from bitsandbytes')."""
    import torch

    from turbotune.model.quant import bnb_dequantize_flat, dequantize_nf4

    checked, bad = 0, []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is None or qs.quant_type != "nf4":
            continue
        checked += 1
        if not torch.equal(dequantize_nf4(w), bnb_dequantize_flat(w.data, qs)):
            bad.append(name.replace("base_model.model.", ""))
    return checked, bad


def run_variant(folder: str, patch: bool, dtype, device, batch, load_in_4bit: bool = False) -> dict:
    """Load, add LoRA, warm up, then one measured forward + backward + AdamW step. Returns the measurements."""
    import torch

    from turbotune.fast_model import FastModel

    cuda = device.type == "cuda"
    model, _tok = FastModel.from_pretrained(folder, dtype=dtype, patch=patch, load_in_4bit=load_in_4bit,
                                            verbose=False)
    patched = _is_patched(model)
    nf4 = nf4_mismatches(model) if load_in_4bit and patch else None
    model = FastModel.get_peft_model(model, r=LORA_R, lora_alpha=2 * LORA_R, use_gradient_checkpointing=True,
                                     verbose=False)
    model.train()
    lora = _lora_params(model)
    if not lora:
        raise RuntimeError("no trainable LoRA parameters after get_peft_model")
    opt = torch.optim.AdamW([p for _, p in lora], lr=1e-3)
    watched_name, watched = next(((n, p) for n, p in lora if "lora_B" in n), lora[0])

    # Warm-up: one-time costs (kernel compilation, library set-up) stay out of the measurement.
    _forward_loss(model, batch).backward()
    opt.zero_grad(set_to_none=True)
    before = watched.detach().clone()

    if cuda:
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = _forward_loss(model, batch)
        loss.backward()
        grad_norm = _grad_norm(lora)
        opt.step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with _CpuPeak() as meter:
            t0 = time.perf_counter()
            loss = _forward_loss(model, batch)
            loss.backward()
            grad_norm = _grad_norm(lora)
            opt.step()
            elapsed = time.perf_counter() - t0
        peak = meter.delta

    result = {
        "patched": patched,
        "loss": float(loss.detach().float().item()),
        "lora_grad_norm": grad_norm,
        "lora_changed": not torch.equal(before, watched.detach()),
        "watched_weight": watched_name,
        "peak_memory_mb": round(peak / 2**20, 2),
        "time_s": round(elapsed, 4),
    }
    if nf4 is not None:
        result["nf4_checked"], result["nf4_mismatched"] = nf4
    del model, opt, lora, watched, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _is_patched(model) -> bool:
    from turbotune.model.families import base_causal_lm, is_patched
    return is_patched(base_causal_lm(model))


def _grad_norm(lora) -> float:
    import torch
    grads = [p.grad.detach().float().norm() for _, p in lora if p.grad is not None]
    return float(torch.stack(grads).norm().item()) if grads else float("nan")


def _rel_diff(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    return abs(a - b) / max(abs(b), 1e-12)


def _ratio(a: float, b: float):
    return round(a / b, 3) if b and b > 0 else None


def _quiet_hf():
    """Silence transformers / hub progress bars and info logs; returns a function that restores them."""
    undo = []
    try:
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        undo += [lambda: hf_logging.set_verbosity(level), hf_logging.enable_progress_bar]
    except Exception:  # noqa: BLE001
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    except Exception:  # noqa: BLE001
        pass

    def restore():
        for fn in undo:
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass
    return restore


def run_self_test() -> dict:
    """Both variants on the GPU (if any) else the CPU. Never raises: failures land in `checks` / `error`."""
    import torch

    from turbotune.model.loader import is_bfloat16_supported

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        dtype = torch.bfloat16 if is_bfloat16_supported() else torch.float16
    else:
        dtype = torch.float32
    kind = "fp32" if dtype == torch.float32 else "half"
    model_kwargs, (bsz, seq) = (GPU_MODEL, GPU_BATCH) if cuda else (CPU_MODEL, CPU_BATCH)
    out = {
        "ran": True,
        "device": f"cuda ({torch.cuda.get_device_name(device)})" if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "model": "tiny Llama (hidden {hidden_size}, intermediate {intermediate_size}, {num_hidden_layers} layers, "
                 "{num_attention_heads}/{num_key_value_heads} heads, vocab {vocab_size})".format(**model_kwargs),
        "note": None if cuda else "no GPU: running the self-test on the CPU",
        "batch": [bsz, seq],
        "lora_r": LORA_R,
        "memory_measure": ("torch.cuda.max_memory_allocated over the step (includes the weights)" if cuda else
                           "growth of the process RSS during the step (coarse: the allocator reuses freed pages)"),
        "variants": {},
        "memory_ratio": None,
        "time_ratio": None,
        "checks": [],
        "ok": False,
        "error": None,
    }
    restore = _quiet_hf()
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="turbotune-check-") as folder:
            warnings.simplefilter("ignore")
            write_tiny_model(folder, model_kwargs)
            gen = torch.Generator().manual_seed(1234)
            batch = torch.randint(len(_TOKENIZER_SPECIALS), model_kwargs["vocab_size"], (bsz, seq), generator=gen)
            batch = batch.to(device)
            for name, patch, four_bit in VARIANTS:
                if four_bit and not _bitsandbytes_imports():
                    out["note_4bit"] = "bitsandbytes is not installed: the 4-bit (QLoRA) pair was not run"
                    continue
                try:
                    out["variants"][name] = run_variant(folder, patch, dtype, device, batch, four_bit)
                except Exception as e:  # noqa: BLE001 - reported as a failed check
                    out["variants"][name] = {"error": _one_line(e)}
                    if cuda:
                        gc.collect()
                        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - building the tiny model failed
        out["error"] = f"could not build the tiny test model: {_one_line(e)}"
        return out
    finally:
        restore()
    out["checks"] = _checks(out["variants"], kind)
    ours, stock = out["variants"].get("turbotune", {}), out["variants"].get("stock", {})
    if "peak_memory_mb" in ours and "peak_memory_mb" in stock:
        out["memory_ratio"] = _ratio(ours["peak_memory_mb"], stock["peak_memory_mb"])
        out["time_ratio"] = _ratio(ours["time_s"], stock["time_s"])
    out["ok"] = all(c["ok"] for c in out["checks"])
    return out


def _bitsandbytes_imports() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - not installed or broken: check_bitsandbytes says which
        return False


def _checks(variants: dict, kind: str) -> list[dict]:
    checks = []

    def add(name, ok, detail):
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    for name, patch, _ in VARIANTS:
        if name not in variants:
            continue
        v = variants[name]
        if "error" in v:
            add(f"{name} step runs", False, f"the {name} training step failed: {v['error']}")
            continue
        if v["patched"] != patch:
            add(f"{name} forwards", False, f"the {name} model is {'not ' if patch else ''}patched by turbotune "
                "(patch=%s in from_pretrained)" % patch)
        finite = math.isfinite(v["loss"])
        add(f"{name} loss finite", finite, f"{name} loss is {v['loss']:.6g}" + ("" if finite else ", not finite"))
        short = v["watched_weight"].replace("base_model.model.", "").replace(".default.weight", "")
        add(f"{name} LoRA weights changed", v["lora_changed"],
            f"{name}: LoRA weight {short} " + ("changed" if v["lora_changed"] else "did not change") +
            " in the optimizer step")
    nf4 = variants.get("turbotune-4bit", {})
    if "nf4_checked" in nf4:
        bad = nf4["nf4_mismatched"]
        add("4-bit dequantisation matches bitsandbytes", nf4["nf4_checked"] > 0 and not bad,
            f"4-bit: {nf4['nf4_checked'] - len(bad)} of {nf4['nf4_checked']} NF4 weights dequantised by turbotune "
            "equal bitsandbytes' own dequantisation bit for bit" + (f" (differ: {', '.join(bad[:3])})" if bad else ""))
    for ours_name, ref_name, label in PAIRS:
        _compare_pair(add, variants.get(ours_name, {}), variants.get(ref_name, {}), kind, label)
    return checks


def _compare_pair(add, ours: dict, stock: dict, kind: str, label: str) -> None:
    """Loss and LoRA gradient norm of turbotune's step against the stock step (`label`: "" or "4-bit ")."""
    if "loss" not in ours or "loss" not in stock:
        return
    ref = f"stock {label}".strip()
    tol = LOSS_RTOL[kind]
    d = _rel_diff(ours["loss"], stock["loss"])
    add(f"{label}loss matches {ref}", d <= tol,
        f"{label}turbotune loss {ours['loss']:.6f} vs {ref} {stock['loss']:.6f}: rel diff {d:.1e} "
        f"(tolerance {tol:.0e})")
    tol = GRAD_RTOL[kind]
    d = _rel_diff(ours["lora_grad_norm"], stock["lora_grad_norm"])
    add(f"{label}LoRA gradients match {ref}", d <= tol,
        f"{label}LoRA gradient norm {ours['lora_grad_norm']:.6g} vs {ref} {stock['lora_grad_norm']:.6g}: "
        f"rel diff {d:.1e} (tolerance {tol:.0e})")


if __name__ == "__main__":  # pragma: no cover - handy when working on the self-test alone
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import json
    print(json.dumps(run_self_test(), indent=2))
