"""One method's benchmark run, in a process of its own: `python -m turbotune.bench.worker --spec spec.json`.

The parent (turbotune.bench.harness) writes the spec, starts this process, and reads the result JSON it writes to
spec["result_path"]. Running each method in a fresh process keeps peak-memory counters, monkey patches
(unsloth, liger) and compiled kernels from leaking between methods.

Phases and what a failure in each means:
  import  the method's packages        ImportError -> status "skipped"; anything else -> "failed"
  load    model + LoRA + optimizer     any exception -> "failed" (error = last line of the traceback)
  train   warm-up + timed steps        any exception, CUDA OOM included -> "failed"
This module imports nothing heavy at module level: unsloth must be imported before transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
import warnings


def _log(method: str, msg: str) -> None:
    print(f"[{method}] {msg}", file=sys.stderr, flush=True)


def _last_line(exc: BaseException) -> str:
    """The traceback's closing 'module.Type: message' line (first line of a multi-line message)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:2000]


def _peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


def _versions(names) -> dict:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = getattr(sys.modules.get(n.replace("-", "_")), "__version__", None)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading, one function per method. Each returns the trainable model (on spec["device"]).
# ----------------------------------------------------------------------------------------------------------
def _dtype(spec):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec["dtype"]]


def _from_pretrained_kwargs(spec) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    from transformers import AutoConfig

    from turbotune._compat import dtype_kwargs, supports_sdpa

    # SDPA, the usual recipe, where transformers has it (Gemma 2 has none: its soft-capped scores run eagerly)
    sdpa = supports_sdpa(AutoConfig.from_pretrained(spec["model_dir"])) is not False
    kw = {"attn_implementation": "sdpa" if sdpa else "eager", **dtype_kwargs(_dtype(spec))}
    if spec["qlora"]:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if spec["device"] == "cuda" else _dtype(spec))
    if spec["device"] == "cuda":
        kw["device_map"] = {"": torch.cuda.current_device()}  # under bench --gpus: this rank's GPU, not GPU 0
    return kw


def _targets(model, spec) -> list[str]:
    """The bench's seven projections as this model names them (Phi-3: qkv_proj and gate_up_proj), the same
    resolution turbotune's get_peft_model makes, so every method trains the same modules."""
    from turbotune.model.lora import resolve_target_modules
    return resolve_target_modules(model, list(spec["target_modules"]), verbose=False)


def _hf_peft(model, spec):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    if spec["qlora"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        from turbotune._compat import checkpointing_enable
        checkpointing_enable(model, use_reentrant=False)
    model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])  # same LoRA A initialisation for every PEFT-based method
    cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, bias="none",
                     target_modules=_targets(model, spec), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def load_hf(spec):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **_from_pretrained_kwargs(spec))
    return _hf_peft(model, spec)


def load_liger(spec):
    import liger_kernel.transformers as lk
    from transformers import AutoModelForCausalLM

    model_type = spec["model_type"]
    patch = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        raise ImportError(f"liger-kernel has no apply_liger_kernel_to_{model_type}")
    patch()  # library defaults: rope, rms_norm, swiglu, fused linear cross-entropy
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **_from_pretrained_kwargs(spec))
    return _hf_peft(model, spec)


def load_turbotune(spec, checkpointing=True):
    from turbotune import FastModel
    four_bit = spec["qlora"] and spec["method"] != "turbotune-bf16"
    model, _tok = FastModel.from_pretrained(spec["model_dir"], dtype=_dtype(spec), load_in_4bit=four_bit,
                                            max_seq_length=spec["seq_len"])
    # random_state seeds the LoRA init exactly as the hf recipe's torch.manual_seed does: same adapters.
    model = FastModel.get_peft_model(model, r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                                     target_modules=list(spec["target_modules"]),
                                     use_gradient_checkpointing=checkpointing, random_state=spec["seed"],
                                     **({"adapter_precision": spec["adapter_precision"]}
                                        if spec.get("adapter_precision") else {}))
    notes = [f"adapter precision {spec.get('adapter_precision') or 'peft'}"]
    from turbotune.model.kernels.lora_parts import (
        fp32_adapter_backend_in_effect,
        set_fp32_adapter_backend,
    )
    from turbotune.model.state import turbo_state
    if spec.get("fp32_adapter_kernels"):
        set_fp32_adapter_backend(spec["fp32_adapter_kernels"], model)
    if (spec.get("adapter_precision") or "peft") == "peft":
        backend = turbo_state(model).fp32_adapter_backend
        notes.append(f"fp32 adapter products: {fp32_adapter_backend_in_effect(spec['device'], backend)}")
    if spec["qlora"] and not four_bit:
        notes.insert(0, "16-bit base (the 4-bit rows' reference)")
    if checkpointing == "auto":
        from turbotune.training.auto_checkpointing import plan_checkpointing
        line = plan_checkpointing(model, spec["seq_len"], spec["micro_batch"]).line()
        print(f"[{spec['method']}] " + line, file=sys.stderr, flush=True)
        notes.append(line.removeprefix("[turbotune] "))
    model.__dict__["_bench_notes"] = notes
    return model


def load_unsloth(spec):
    import torch
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(model_name=spec["model_dir"], max_seq_length=spec["seq_len"],
                                                    dtype=_dtype(spec), load_in_4bit=spec["qlora"],
                                                    local_files_only=True)
    torch.manual_seed(spec["seed"])
    model = FastLanguageModel.get_peft_model(model, r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                                             lora_dropout=0, bias="none",
                                             target_modules=_targets(model, spec),
                                             use_gradient_checkpointing=True, random_state=spec["seed"])
    return model


LOADERS = {"hf": load_hf, "liger": load_liger, "turbotune": load_turbotune, "unsloth": load_unsloth,
           "turbotune-auto": lambda spec: load_turbotune(spec, "auto"),
           "turbotune-min-memory": lambda spec: load_turbotune(spec, "offload"),
           "turbotune-bf16": load_turbotune, "turbotune-train": load_turbotune}
IMPORTS = {  # what "importable" means for each method
    "hf": ("transformers", "peft"),
    "liger": ("liger_kernel.transformers", "transformers", "peft"),
    "turbotune": ("turbotune",),
    "turbotune-auto": ("turbotune",),
    "turbotune-min-memory": ("turbotune",),
    "turbotune-bf16": ("turbotune",),
    "turbotune-train": ("turbotune",),
    "unsloth": ("unsloth",),
}


def _check_imports(method: str) -> None:
    import importlib

    for mod in IMPORTS[method]:
        importlib.import_module(mod)
    if method.startswith("turbotune"):
        import turbotune

        if not hasattr(turbotune, "FastModel"):
            raise ImportError("turbotune.FastModel is not available in this build of turbotune")


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------
def _on_device(model, device: str):
    import torch

    try:
        p = next(model.parameters())
    except StopIteration:
        return model
    if p.device.type != device:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
            raise RuntimeError(f"the quantized model is on {p.device}, expected {device}")
        model = model.to(torch.device(device))
    return model


def _graphed_step(model, params, spec):
    """turbotune's micro-step with CUDA graphs where they apply, as the bench's switches set them."""
    from turbotune.training.cuda_graphs import GraphedMicroStep
    return GraphedMicroStep(model, params, enabled=spec.get("cuda_graphs", True),
                            capture_offload=spec.get("graph_offload", True))


class _Loop:
    """One method's optimizer and micro-step (turbotune's graphed stepper or eager), shared by every phase."""

    def __init__(self, model, opt, stepper, grad_accum: int, cuda: bool):
        self.model, self.opt, self.stepper, self.ga, self.cuda = model, opt, stepper, grad_accum, cuda

    def sync(self) -> None:
        """Wait for the GPU (no-op on CPU)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def forward_backward(self, ids):
        """Forward + backward of one micro-batch, loss scaled by 1/grad_accum; returns the detached loss."""
        if self.stepper is not None:
            return self.stepper({"input_ids": ids, "labels": ids}, 1.0 / self.ga) / self.ga
        out = self.model(input_ids=ids, labels=ids)
        loss = out.loss / self.ga
        loss.backward()
        return loss.detach()

    def zero_grad(self) -> None:
        """Drop the gradients (in place while the graphs accumulate into these buffers)."""
        if self.stepper is not None:
            self.stepper.zero_grad(self.opt)
        else:
            self.opt.zero_grad(set_to_none=True)


def _setup_loop(model, spec, result):
    """The loop (fused AdamW on CUDA, turbotune's graphed step) and the token batches; counts parameters."""
    import torch

    from turbotune.bench.presets import make_batches

    method, device, ga = spec["method"], spec["device"], spec["grad_accum"]
    cuda = device == "cuda"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = int(sum(p.numel() for p in params))
    result["total_params"] = int(sum(p.numel() for p in model.parameters()))
    opt_kw = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(params, lr=spec["lr"], **opt_kw)
    batches = make_batches(spec["seed"], spec["steps"] * ga, spec["micro_batch"], spec["seq_len"],
                           spec["vocab_size"]).to(device)
    stepper = None
    if method.startswith("turbotune") and cuda:  # turbotune's own training step: CUDA graphs where they apply
        stepper = _graphed_step(model, params, spec)
        _log(method, f"CUDA graphs: {stepper.disabled_reason or 'on'}")
    return _Loop(model, opt, stepper, ga, cuda), batches


def _compile_warmup(loop: _Loop, spec, first_batch) -> None:
    """Compilation warm-up (unsloth): forward + backward on the first micro-batch, gradients dropped, no update."""
    for i in range(spec["extra_warmup"]):
        t0 = time.perf_counter()
        loop.forward_backward(first_batch)
        loop.zero_grad()
        loop.sync()
        _log(spec["method"], f"compile warm-up pass {i + 1}/{spec['extra_warmup']}: {time.perf_counter() - t0:.1f} s")


def _timed_steps(loop: _Loop, spec, batches, result) -> None:
    """Every optimizer step (warm-up and timed), appending its loss and wall time to result."""
    ga = loop.ga
    losses, times = result["losses"], result["step_times_s"]
    for step in range(spec["steps"]):
        loop.sync()
        t0 = time.perf_counter()
        total = None
        for j in range(ga):
            loss = loop.forward_backward(batches[step * ga + j])
            total = loss if total is None else total + loss
        loop.opt.step()
        loop.zero_grad()
        loop.sync()
        dt = time.perf_counter() - t0
        losses.append(float(total.float().item()))
        times.append(dt)
        tag = "warm-up" if step < spec["warmup"] else "timed"
        _log(spec["method"], f"step {step + 1}/{spec['steps']} ({tag}) loss {losses[-1]:.4f}  {dt:.3f} s")


def _record_graphs_and_memory(loop: _Loop, spec, result) -> None:
    """After the steps: whether CUDA graphs stayed on, and the peak memory (CUDA allocator or host RSS)."""
    import torch

    stepper = loop.stepper
    if stepper is not None:
        result["cuda_graphs"] = stepper.disabled_reason or "on"  # a failed capture turns them off mid-run
        result["cuda_graph_replays"] = stepper.replays
        result["notes"].append(f"CUDA graphs {result['cuda_graphs']}" + (
            f" ({stepper.replays} of {spec['steps'] * loop.ga} micro-steps replayed)" if stepper.active else ""))
    if loop.cuda:
        result["peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        result["memory_kind"] = "cuda"
    else:
        result["memory_kind"] = "rss"
    result["peak_rss_bytes"] = _peak_rss_bytes()


def _profile_extra_step(loop: _Loop, spec, batches, result) -> None:
    """One more optimizer step under torch.profiler (--profile), after the figures above are taken."""
    from turbotune.bench.profile import profile_step

    method = spec["method"]

    def one_step():
        for j in range(loop.ga):
            loop.forward_backward(batches[j])
        loop.opt.step()
        loop.zero_grad()

    result["profile"] = profile_step(one_step, method, spec["profile_dir"], loop.cuda)
    p = result["profile"]
    _log(method, f"profiled step: wall {p['wall_ms']:.0f} ms, GPU busy {p['gpu_busy_ms']:.0f} ms -> {p['report']}")


def train(model, spec, result) -> None:
    """The default bench: spec["steps"] optimizer steps on random token batches, timed, peak memory recorded."""
    import torch

    loop, batches = _setup_loop(model, spec, result)
    result["notes"] = list(model.__dict__.get("_bench_notes", []))
    _compile_warmup(loop, spec, batches[0])
    if loop.cuda:
        result["load_peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
        result["load_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
    _timed_steps(loop, spec, batches, result)
    _record_graphs_and_memory(loop, spec, result)
    if spec.get("profile_dir"):
        _profile_extra_step(loop, spec, batches, result)


def run_packing(model, spec, result) -> None:
    """`--packing`: the same length mix, padded or packed (spec["packing_mode"]), with turbotune's step."""
    import torch

    from turbotune.bench.packing import (
        eager_step_fn,
        make_length_mix,
        run_packing_bench,
    )

    method, cuda, mode = spec["method"], spec["device"] == "cuda", spec["packing_mode"]
    sps = spec["samples_per_step"]
    samples = make_length_mix(spec["seed"], spec["steps"] * sps, spec["vocab_size"], hi=min(1500, spec["seq_len"]))
    params = [p for p in model.parameters() if p.requires_grad]
    step_fn = eager_step_fn(model)
    if method.startswith("turbotune") and cuda and mode == "packed":  # as turbotune train: graphs for packed rows
        step_fn = _graphed_step(model, params, spec)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = getattr(model, "config", None)
    pad_id = getattr(cfg, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(cfg, "eos_token_id", None) or 0)
    res = run_packing_bench(model, int(pad_id if not isinstance(pad_id, list) else pad_id[0]), samples,
                            seq_len=spec["seq_len"], micro_batch=spec["micro_batch"] if mode == "packed"
                            else spec["padded_micro_batch"], samples_per_step=sps, steps=spec["steps"],
                            warmup=spec["warmup"], mode=mode, device=spec["device"], step_fn=step_fn,
                            log=lambda m: _log(method, m), lr=spec["lr"])
    result.update(res)
    result["memory_kind"] = "cuda" if cuda else "rss"
    if cuda:
        result["peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
    if hasattr(step_fn, "replays"):
        result["cuda_graphs"] = step_fn.disabled_reason or f"on ({step_fn.replays} micro-steps replayed)"


def run_spec(spec: dict, train_fn=None) -> dict:
    """One method's run; train_fn(model, spec, result) replaces `train` (bench --gpus: the ranks' loop)."""
    method = spec["method"]
    result = {"method": method, "status": "failed", "phase": "import", "error": None, "losses": [],
              "step_times_s": [], "extra_warmup": spec.get("extra_warmup", 0), "pid": os.getpid()}
    t_start = time.perf_counter()
    try:
        _check_imports(method)
    except ImportError as exc:
        result.update(status="skipped", reason=_last_line(exc))
        return result
    except Exception as exc:  # e.g. a package that refuses to import without a GPU
        result.update(error=_last_line(exc), traceback=traceback.format_exc()[-4000:])
        return result
    try:
        import torch

        result["versions"] = _versions(["torch", "transformers", "peft", "triton", "bitsandbytes", "unsloth",
                                        "unsloth_zoo", "liger-kernel", "turbotune"])
        if spec["device"] == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available in the worker process")
            torch.cuda.reset_peak_memory_stats()
            result["device_name"] = torch.cuda.get_device_name(0)
            if spec.get("memory_dir"):  # --memory-report: the allocator's history from before the model loads
                from turbotune.bench import memory_report
                memory_report.start()
        else:
            result["device_name"] = "cpu"
        result["phase"] = "load"
        t0 = time.perf_counter()
        model = LOADERS[method](spec)
        model = _on_device(model, spec["device"])
        result["load_s"] = time.perf_counter() - t0
        _log(method, f"loaded in {result['load_s']:.1f} s")
        result["phase"] = "train"
        if spec.get("mode") == "max_context":
            from turbotune.bench.context import run_max_context
            run_max_context(model, spec, result, _log)
        elif spec.get("mode") == "packing":
            run_packing(model, spec, result)
        elif spec.get("mode") == "sft":
            from turbotune.bench.sft import run_own_trainer, run_sft
            (run_own_trainer if method == "turbotune-train" else run_sft)(model, spec, result, _log)
        elif spec.get("mode") == "dpo":
            from turbotune.bench.preference import run_dpo
            run_dpo(model, spec, result, _log)
        elif spec.get("mode") == "grpo":
            from turbotune.bench.grpo import run_grpo
            run_grpo(model, spec, result, _log)
        else:
            (train_fn or train)(model, spec, result)
        result["status"] = "ok"
        result["phase"] = "done"
    except BaseException as exc:  # noqa: BLE001 - report every failure, OOM included
        result.update(status="failed", error=_last_line(exc), traceback=traceback.format_exc()[-4000:])
        result["peak_rss_bytes"] = _peak_rss_bytes()
        torch_mod = sys.modules.get("torch")
        if spec["device"] == "cuda" and torch_mod is not None and torch_mod.cuda.is_initialized():
            result["peak_alloc_bytes_at_failure"] = int(torch_mod.cuda.max_memory_allocated())
    if spec.get("memory_dir"):
        from turbotune.bench.memory_report import report_into
        report_into(spec, result, _log)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbotune.bench.worker",
                                     description="Run one turbotune bench method (started by turbotune.bench.harness).")
    parser.add_argument("--spec", required=True, help="JSON spec written by the parent")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=r".*(gradient|activation)_checkpointing.*deprecated.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated.*")
    result = run_spec(spec)
    tmp = spec["result_path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, spec["result_path"])
    _log(spec["method"], f"status {result['status']}" + (f": {result.get('error') or result.get('reason')}"
                                                           if result["status"] != "ok" else ""))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is on disk: skip interpreter teardown (seconds with torch, CUDA and compiled kernels loaded).
    os._exit(code)
