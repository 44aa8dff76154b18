"""`turbotune bench`: LoRA / QLoRA training throughput, memory, MFU and cost, method against method.

Every method (hf, turbotune, unsloth, liger) trains the same saved weights on the same random token
batches in a process of its own (turbotune.bench.worker); this process prepares the model, measures the
GPU's matmul rate once, collects the workers' JSON results and prints one Markdown table.

    python -m turbotune.bench.harness --preset smollm2-135m --methods hf,turbotune --json out.json

See bench/README.md for the columns and the FLOPs-per-token definition.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from turbotune.bench.header import (  # noqa: F401 - VERSION_PACKAGES and command_line: still importable from here
    VERSION_PACKAGES,
    add_mode_header,
    add_model_flops,
    collect_header,
    command_line,
)
from turbotune.bench import grpo
from turbotune.bench.preference import DEFAULT_BETA
from turbotune.bench.trainer_options import add_trainer_arguments, check_trainer_arguments
from turbotune.bench.presets import (
    DEFAULT_METHODS,
    METHODS,
    OPTIONAL_METHODS,
    PRESETS,
    TARGET_MODULES,
    BenchError,
    build_preset_model,
    default_cache_dir,
    measure_matmul_rate,
    missing_requirement,
    preset_config,
    read_model_config,
)
from turbotune.bench.report import format_header, format_table, si, summarise

SCHEMA = "turbotune.bench.harness/1"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help=f"random-initialised model built from a public config: {', '.join(PRESETS)} "
                          "(default: tiny on CPU, smollm2-135m on CUDA)")
    src.add_argument("--model", default=None, metavar="PATH", help="a local Hugging Face model folder instead")
    g.add_argument("--cache-dir", default=None, help=f"where preset models are saved (default {default_cache_dir()})")
    g = parser.add_argument_group("methods")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}, "
                        "plus unsloth / liger on CUDA when installed)")
    g = parser.add_argument_group("workload")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    g.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    g.add_argument("--steps", type=int, default=8, help="optimizer steps in all, warm-up included (default 8)")
    g.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing (default 2)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--lora-alpha", type=int, default=None, help="default: equal to --lora-r")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    g.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes), double quantisation")
    g.add_argument("--seed", type=int, default=0, help="seed of the preset weights and the token batches")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g = parser.add_argument_group("longest sequence (--max-context)")
    g.add_argument("--max-context", action="store_true",
                   help="instead of throughput: peak memory of one step (micro-batch 1) at each of --lengths, the "
                        "per-token slope, and the longest sequence predicted to fit the card")
    g.add_argument("--lengths", default=None,
                   help="comma-separated sequence lengths, '8k' allowed (default 2k,8k,16k,32k,64k on CUDA; "
                        "64,128,256 on CPU)")
    g.add_argument("--confirm", action="store_true", help="run one full step at the predicted longest length")
    g.add_argument("--confirm-at", default=None, metavar="LENGTH",
                   help="with --confirm: run that step at this length instead (e.g. 350000: a target below the "
                        "prediction, when the longest would need more host memory than this machine has)")
    g.add_argument("--card-memory", default=None,
                   help="predict for a card of this size, e.g. 80GB (default: this GPU's memory)")
    g = parser.add_argument_group("packing (--packing)")
    g.add_argument("--packing", action="store_true",
                   help="instead of throughput: each method trains the same samples (lengths drawn from 20 to "
                        "1,500 tokens) padded and packed into rows of --seq-len; real tokens/s and per-step losses")
    g.add_argument("--samples-per-step", type=int, default=64, help="samples per optimizer step (default 64)")
    g.add_argument("--padded-micro-batch", type=int, default=8,
                   help="samples per padded micro-batch (default 8); packed micro-batches hold --micro-batch rows")
    add_trainer_arguments(parser)
    from turbotune.bench.multi_gpu import add_gpus_arguments
    add_gpus_arguments(parser)
    g = parser.add_argument_group("report")
    g.add_argument("--price", type=float, default=2.5, help="USD per GPU-hour (default 2.5)")
    g.add_argument("--cost-steps", type=int, default=1000, help="steps the cost column is quoted for")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file")
    g.add_argument("--matmul-size", type=int, default=None, help="n of the n³ matmuls timed for MFU "
                                                                 "(default 8192 on CUDA, 1024 on CPU)")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds one method may run (default 3600)")
    g.add_argument("--graph-offload", dest="graph_offload", action="store_true", default=True,
                   help="turbotune methods with offloaded checkpointing (turbotune-min-memory) capture it in the "
                        "CUDA graphs too, on static pinned host buffers (the default)")
    g.add_argument("--eager-offload", dest="graph_offload", action="store_false",
                   help="run the micro-steps of offloading methods eagerly instead (the earlier default)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="turbotune methods run their micro-steps eagerly instead of replaying CUDA graphs")
    g.add_argument("--adapter-precision", choices=["peft", "input"], default=None,
                   help="turbotune methods' LoRA math: 'peft' (the adapters' dtype, exactly as PEFT) or 'input' "
                        "(the compute dtype, as Unsloth); default: turbotune's default")
    g.add_argument("--fp32-adapter-kernels", choices=["auto", "torch", "bf16x3", "triton"], default=None,
                   help="turbotune methods: how fp32 adapters read 16-bit activations (torch: fp32 copies + "
                        "cuBLAS; bf16x3: exact three-piece bf16 GEMMs with fp32 output, kernels/bf16x3.py; "
                        "triton: in place, kernels/skinny_fp32.py); default auto (bf16x3 on CUDA)")
    g.add_argument("--memory-report", default=None, metavar="DIR",
                   help="record the CUDA allocator's history in each method's run and write DIR/memory-<method>.txt: "
                        "the blocks live at its peak, by allocating code (slows the host: timings not comparable)")
    g.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps, profile one more step per method with torch.profiler and write "
                        "DIR/profile-<method>.txt (GPU busy vs wall time, top ops and kernels)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbotune.bench.harness", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_bench_arguments(parser)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_methods(spec: str | None, device: str) -> list[tuple[str, str | None]]:
    """[(method, reason_to_skip or None)] in the order asked for."""
    if spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise BenchError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
        names = list(dict.fromkeys(names))
    else:
        names = list(DEFAULT_METHODS)
        for n in OPTIONAL_METHODS:
            if device == "cuda" and missing_requirement(METHODS[n]) is None:
                names.append(n)
    return [(n, missing_requirement(METHODS[n])) for n in names]


def validate(args) -> dict:
    """Checks that need no model: returns resolved settings or raises BenchError."""
    import importlib.util

    from turbotune.bench.multi_gpu import check_gpus
    check_gpus(args)  # first: too few GPUs is refused before anything is loaded
    device = args.device or ("cuda" if _has_cuda() else "cpu")
    if device == "cuda" and not _has_cuda():
        raise BenchError("--device cuda asked for, but torch sees no CUDA GPU "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if args.qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise BenchError("--qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45'")
    preset = None
    if args.model is None:
        preset = args.preset or ("smollm2-135m" if device == "cuda" else "tiny")
        preset_config(preset)  # raises with the list of presets
    elif not (Path(args.model) / "config.json").is_file():
        raise BenchError(f"--model {args.model}: no config.json there (a local Hugging Face model folder is needed)")
    for name in ("seq_len", "micro_batch", "grad_accum", "steps", "lora_r", "cost_steps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup < args.steps:
        raise BenchError(f"--warmup ({args.warmup}) must be at least 0 and below --steps ({args.steps}), "
                         "so that at least one step is timed")
    lengths = confirm_at = None
    if args.max_context:
        from turbotune.bench.context import parse_lengths, parse_memory
        try:
            lengths = parse_lengths(args.lengths or ("2k,8k,16k,32k,64k" if device == "cuda" else "64,128,256"))
            card = parse_memory(args.card_memory) if args.card_memory else None
            confirm_at = parse_lengths(args.confirm_at)[0] if args.confirm_at else None
        except ValueError as exc:
            raise BenchError(f"--lengths / --card-memory / --confirm-at: {exc}") from None
    if args.packing and args.max_context:
        raise BenchError("--packing and --max-context are separate benchmarks; run one at a time")
    if args.packing and (args.samples_per_step < 1 or args.padded_micro_batch < 1):
        raise BenchError("--samples-per-step and --padded-micro-batch must be at least 1")
    check_trainer_arguments(args)
    if args.confirm_at is not None and not args.confirm:
        raise BenchError("--confirm-at goes with --confirm")
    dtype = {"auto": "bfloat16" if device == "cuda" else "float32", "bf16": "bfloat16", "fp16": "float16",
             "fp32": "float32"}[args.dtype]
    return {"device": device, "preset": preset, "dtype": dtype, "lengths": lengths,
            "card_memory_bytes": card if args.max_context else None,
            "confirm_at": confirm_at if args.max_context else None,
            "methods": resolve_methods(args.methods, device),
            "lora_alpha": args.lora_alpha if args.lora_alpha is not None else args.lora_r}



# ----------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------
def worker_command(method: str, spec_path: str, pre_import=None) -> list[str]:
    pre_import = METHODS[method].pre_import if pre_import is None else tuple(pre_import)
    if pre_import:
        # `python -m turbotune.bench.worker` imports the turbotune package first; unsloth wants to be imported
        # before anything touches transformers, so import it first and run the worker module after it.
        boot = ("import os; os.environ.setdefault('HF_HUB_OFFLINE', '1'); "
                + "".join(f"import {m}; " for m in pre_import)
                + "import runpy; runpy.run_module('turbotune.bench.worker', run_name='__main__', alter_sys=True)")
        return [sys.executable, "-c", boot, "--spec", spec_path]
    return [sys.executable, "-m", "turbotune.bench.worker", "--spec", spec_path]


def _worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, **(extra or {}))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    src = str(Path(__file__).resolve().parents[1])  # the folder holding the turbotune package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(method: str, spec: dict, workdir: Path, timeout: float, command=None, env: dict | None = None) -> dict:
    """Start the worker, relay its output to stderr, return its result (or a failure built from its output).
    command(method, spec_path): the command line instead of worker_command's (bench --gpus: torchrun); env: extra
    environment variables for it."""
    spec = dict(spec, method=method, extra_warmup=METHODS[method].extra_warmup,
                result_path=str(workdir / f"{method}.result.json"))
    spec_path = workdir / f"{method}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    Path(spec["result_path"]).unlink(missing_ok=True)  # a method may run twice (--packing): never read a stale one
    tail = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen((command or worker_command)(method, str(spec_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", env=_worker_env(env), bufsize=1,
                            start_new_session=True)  # its own process group: a kill also ends its helpers

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()

    def relay():  # the worker's progress (and anything it prints) goes to our stderr
        for line in proc.stdout:
            sys.stderr.write(line if line.startswith(f"[{method}]") else f"[{method}] {line}")
            sys.stderr.flush()
            if line.strip():
                tail.append(line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill()
    except BaseException:  # Ctrl-C: do not leave the worker holding the GPU
        kill()
        raise
    try:  # helpers the worker left behind (compile workers) hold the GPU and our pipe: end them too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    reader.join(timeout=10)
    result_path = Path(spec["result_path"])
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        if timed_out:
            error = f"timed out after {timeout:.0f} s"
        else:
            error = tail[-1] if tail else f"worker exited with code {proc.returncode} and no output"
            if proc.returncode and proc.returncode < 0:
                error = f"worker killed by signal {-proc.returncode} (out of host memory?); last output: {error}"
        result = {"method": method, "status": "failed", "error": error, "losses": [], "step_times_s": []}
    result["returncode"] = proc.returncode
    result["worker_wall_s"] = time.perf_counter() - t0
    result.setdefault("output_tail", list(tail)[-12:])
    return result


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------
def prepare_model(args, settings: dict, runnable: bool) -> tuple[Path | None, dict | None]:
    """The model folder (a preset is built and cached first) and its config; raises BenchError."""
    model_dir = model_cfg = None
    if runnable:
        if settings["preset"]:
            cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
            model_dir = build_preset_model(settings["preset"], args.seed, cache, settings["device"], log=_log)
        else:
            model_dir = Path(args.model).resolve()
        model_cfg = read_model_config(model_dir)
    elif settings["preset"]:
        model_cfg = preset_config(settings["preset"])
    return model_dir, model_cfg


def measure_matmul(args, device: str, runnable: bool) -> dict | None:
    """The matmul rate MFU is quoted against (throughput and sft modes with a method to run), else None."""
    if not (runnable and not args.max_context and not args.packing):
        return None
    _log(f"measuring the {'bf16' if device == 'cuda' else 'fp32'} matmul rate on {device}")
    matmul = measure_matmul_rate(device, args.matmul_size)
    _log(f"matmul rate {si(matmul['flops_per_s'], 'FLOP/s')}")
    return matmul


def build_worker_spec(args, settings: dict, model_dir: Path | None, model_cfg: dict | None) -> dict:
    """The spec every worker gets (run_worker adds the method's own keys)."""
    return {"model_dir": str(model_dir) if model_dir else None, "model_type": (model_cfg or {}).get("model_type"),
            "vocab_size": int((model_cfg or {}).get("vocab_size") or (model_cfg or {}).get("text_config", {})
                              .get("vocab_size", 0)),
            "device": settings["device"], "dtype": settings["dtype"], "qlora": bool(args.qlora),
            "lora_r": args.lora_r, "lora_alpha": settings["lora_alpha"], "target_modules": TARGET_MODULES,
            "lr": args.lr, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "cuda_graphs": args.cuda_graphs, "graph_offload": args.graph_offload,
            "adapter_precision": args.adapter_precision,
            "fp32_adapter_kernels": args.fp32_adapter_kernels,
            "mode": ("max_context" if args.max_context else "packing" if args.packing
                     else args.trainer if args.trainer in ("sft", "dpo", "grpo") else "throughput"),
            "sft_lengths": args.lengths or "fixed", "beta": DEFAULT_BETA if args.beta is None else args.beta,
            "num_generations": grpo.num_generations(args.num_generations), "optim": args.optim,
            "lengths": settings["lengths"], "samples_per_step": args.samples_per_step,
            "padded_micro_batch": args.padded_micro_batch,
            "confirm": bool(args.confirm), "confirm_at": settings["confirm_at"],
            "card_memory_bytes": settings["card_memory_bytes"],
            "profile_dir": str(Path(args.profile).expanduser().resolve()) if args.profile else None,
            "memory_dir": str(Path(args.memory_report).expanduser().resolve()) if args.memory_report else None}


def run_methods(args, methods: list[tuple[str, str | None]], spec: dict) -> list[dict]:
    """Run each method's worker in turn (padded then packed with --packing); skipped methods get a stub."""
    results = []
    with tempfile.TemporaryDirectory(prefix="turbotune-bench-") as tmp:
        for method, why in methods:
            if why is not None:
                _log(f"{method}: skipped ({why})")
                results.append({"method": method, "status": "skipped", "reason": why, "losses": [],
                                "step_times_s": []})
                continue
            for mode in (("padded", "packed") if args.packing else (None,)):
                _log(f"{method}{f' ({mode})' if mode else ''}: starting worker")
                results.append(run_worker(method, dict(spec, packing_mode=mode), Path(tmp), args.timeout))
                if _unsloth_compile_failed(method, results[-1]):
                    results[-1] = _unsloth_without_block_compile(args, spec, mode, Path(tmp), results[-1])
                r = results[-1]
                r.setdefault("mode", mode)
                _log(f"{method}: {r['status']}"
                     + ("" if r["status"] == "ok" else f" — {r.get('error') or r.get('reason')}"))
    return results


def _unsloth_compile_failed(method: str, result: dict) -> bool:
    return (method == "unsloth" and result["status"] == "failed" and "InductorError" in (result.get("error") or "")
            and os.environ.get("UNSLOTH_BLOCK_COMPILE") != "0")


def _unsloth_without_block_compile(args, spec: dict, mode, workdir: Path, failed: dict) -> dict:
    """Unsloth compiles each decoder layer as one region; where torch's compiler fails on it (gemma2-9b under torch
    2.11, eleventh session), run it again with Unsloth's own switch that leaves that compile out, and say so."""
    _log("unsloth: its block compile failed; running it again with UNSLOTH_BLOCK_COMPILE=0")
    result = run_worker("unsloth", dict(spec, packing_mode=mode), workdir, args.timeout,
                        env={"UNSLOTH_BLOCK_COMPILE": "0"})
    result.setdefault("notes", []).append(
        f"UNSLOTH_BLOCK_COMPILE=0 (with its block compile the run failed: {failed.get('error')})")
    return result


def format_results(args, settings: dict, header: dict, results: list[dict], model_cfg: dict | None,
                   flops: float | None, matmul: dict | None) -> str:
    """The mode's Markdown table(s) of `results` (the throughput mode also summarises them into `header`)."""
    if args.packing:
        from turbotune.bench.packing import format_packing_table
        return format_packing_table(results)
    if args.max_context:
        from turbotune.bench.context import add_planner_predictions, format_context_tables
        if model_cfg:
            add_planner_predictions(results, model_cfg, bool(args.qlora), args.lora_r)
        return format_context_tables(results, settings["lengths"])
    summarise(results, header, flops, matmul["flops_per_s"] if matmul else None)
    return format_table(results)


def write_json(path: str, header: dict, results: list[dict], table: str) -> None:
    """Write the whole run (header, every method's result, the table) to the --json file."""
    doc = {"schema": SCHEMA, "header": header, "methods": results, "table_markdown": table}
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(path).expanduser().write_text(json.dumps(doc, indent=1, default=str))
    _log(f"wrote {path}")


def run_bench(args) -> int:
    """Run the benchmark described by parsed `args`; 0 = every method ok or skipped, 1 = a method failed,
    2 = usage error."""
    try:
        settings = validate(args)
        if args.max_context:  # one step per length at micro-batch 1; the model is loaded for the longest
            args.seq_len, args.micro_batch, args.grad_accum = max(settings["lengths"]), 1, 1
        runnable = [m for m, why in settings["methods"] if why is None]
        model_dir, model_cfg = prepare_model(args, settings, bool(runnable))
    except BenchError as exc:
        print(f"turbotune bench: error: {exc}", file=sys.stderr)
        return 2
    header = collect_header(args, settings, model_dir, model_cfg)
    add_mode_header(header, args, settings)
    flops = add_model_flops(header, args, model_cfg)
    header["matmul"] = matmul = measure_matmul(args, settings["device"], bool(runnable))
    spec = build_worker_spec(args, settings, model_dir, model_cfg)
    if args.gpus:  # each method on 1 GPU and on N, under torchrun (multi_gpu.py)
        from turbotune.bench.multi_gpu import add_gpus_header, run_scaling
        add_gpus_header(header, args)
        results = run_scaling(args, settings["methods"], spec)
    else:
        results = run_methods(args, settings["methods"], spec)
    table = format_results(args, settings, header, results, model_cfg, flops, matmul)
    report = format_header(header) + "\n\n" + table + "\n"
    print(report, flush=True)
    if args.json:
        write_json(args.json, header, results, table)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
