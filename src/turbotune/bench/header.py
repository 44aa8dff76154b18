"""The header of a `turbotune bench` report: where, when, with what and on which workload it ran.

turbotune.bench.harness collects it before the methods run; turbotune.bench.report formats it above the table, and
`--json` writes it as the document's "header".
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

from turbotune.bench.presets import TARGET_MODULES, flops_per_token
from turbotune.planner.predict import model_shape

VERSION_PACKAGES = ["torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes", "turbotune",
                    "unsloth", "liger-kernel", "trl"]


SWITCH_PREFIXES = ("TURBOTUNE_", "UNSLOTH_")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _version(name: str) -> str | None:
    """The installed version of package `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    if name == "turbotune":  # run from a source tree (PYTHONPATH=src) rather than an install
        try:
            import turbotune

            return getattr(turbotune, "__version__", None)
        except Exception:
            return None
    return None


def command_line(argv=None) -> str:
    """The command as the user typed it, with the program shortened to how it was started."""
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else "turbotune"
    norm = prog.replace(os.sep, "/")
    if norm.endswith("turbotune/bench.py"):
        prog = "python -m turbotune.bench.harness"
    elif norm.endswith("turbotune/__main__.py"):
        prog = "python -m turbotune"
    else:
        prog = os.path.basename(prog)
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def collect_header(args, settings: dict, model_dir: Path | None, model_cfg: dict | None) -> dict:
    """The report header every mode shares: date, command, device, versions, model and workload."""
    import platform

    import torch

    device = settings["device"]
    versions = {"python": platform.python_version()}
    versions.update({n: _version(n) for n in VERSION_PACKAGES})
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "memory_bytes": int(props.total_memory), "capability": list(torch.cuda.get_device_capability(0))}
    else:
        dev = {"type": "cpu", "name": f"CPU ({platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"}
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command_line(),
        "device": dev,
        "versions": versions,
        "preset": settings["preset"],
        "model_dir": str(model_dir) if model_dir else None,
        "model_type": (model_cfg or {}).get("model_type"),
        "workload": {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
                     "steps": args.steps, "warmup": args.warmup, "timed_steps": args.steps - args.warmup,
                     "tokens_per_step": tokens, "lora_r": args.lora_r, "lora_alpha": settings["lora_alpha"],
                     "target_modules": TARGET_MODULES, "qlora": bool(args.qlora), "dtype": settings["dtype"],
                     "lr": args.lr, "seed": args.seed},
        "price_usd_per_gpu_hour": args.price,
        "cost_steps": args.cost_steps,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        # turbotune's switches (TURBOTUNE_FLASH_WINDOW=0, TURBOTUNE_BUCKETS=4, ...) and the baseline's
        # (UNSLOTH_BLOCK_COMPILE=0, where its compile fails) change what a row measures
        "switches_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(SWITCH_PREFIXES)},
        "source": source_commit(),
    }


def source_commit() -> str | None:
    """The turbotune commit the bench runs: BENCH_SOURCE_COMMIT where set (a copy without git history, such as
    the GPU machine's `git archive` snapshot: bench/gpu_env.sh reads its SOURCE_COMMIT file), else the checkout's
    `git rev-parse --short HEAD`, with "+changes" when files differ from it; None when neither is known."""
    import subprocess
    if os.environ.get("BENCH_SOURCE_COMMIT"):
        return os.environ["BENCH_SOURCE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        found = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                               text=True, timeout=10)
        lines = found.stdout.split()
        # only turbotune's own checkout (an installed copy may sit inside someone else's repository)
        if found.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "src/turbotune/bench" != here:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1][:7] + ("+changes" if dirty.stdout.strip() else "")


def add_mode_header(header: dict, args, settings: dict) -> None:
    """Add the header keys of the --max-context, --trainer sft|dpo|grpo and --packing modes (none for throughput)."""
    if args.max_context:
        header["mode"] = "max_context"
        header["lengths"] = settings["lengths"]
    elif args.trainer == "sft":
        header["mode"] = "sft"
        header["sft"] = {"lengths": args.lengths or "fixed", "packing": False}
    elif args.trainer == "dpo":
        from turbotune.bench.preference import DEFAULT_BETA, pair_lengths
        prompt, completion, _ = pair_lengths("fixed", 1, args.seq_len, args.seed)[0]
        header["mode"] = "dpo"
        header["dpo"] = {"lengths": args.lengths or "fixed", "beta": DEFAULT_BETA if args.beta is None else args.beta,
                         "prompt_tokens": prompt, "max_completion_tokens": completion}
    elif args.trainer == "grpo":
        from turbotune.bench.grpo import grpo_lengths, num_generations
        prompt, completion = grpo_lengths(args.seq_len)
        header["mode"] = "grpo"
        header["grpo"] = {"prompt_tokens": prompt, "completion_tokens": completion, "temperature": 1.0,
                          "num_generations": num_generations(args.num_generations)}
    elif args.packing:
        header["mode"] = "packing"
        header["packing"] = {"samples_per_step": args.samples_per_step, "padded_micro_batch": args.padded_micro_batch,
                             "packed_micro_batch": args.micro_batch, "seq_len": args.seq_len, "lengths": [20, 1500]}


def add_model_flops(header: dict, args, model_cfg: dict | None) -> float | None:
    """Add the model's dimensions and FLOPs per token to `header`; return the FLOPs (None: MFU is n/a)."""
    try:
        dims = model_shape(model_cfg) if model_cfg else None
        header["model_dims"] = dims.__dict__ if dims else None
        flops = flops_per_token(dims, args.seq_len, args.lora_r) if dims else None
    except (KeyError, TypeError, ValueError) as exc:
        _log(f"cannot derive FLOPs per token from the config ({exc!r}); MFU will be n/a")
        flops = None
    # dpo: every token also runs the reference forward; grpo: the generation forward (prefill or decode); no backward
    if flops and args.trainer in ("dpo", "grpo"):
        flops = dict(flops, policy_total=flops["total"], total=flops["total"] + 2 * flops["n_matmul"]
                     + 2 * flops["lora_params"] + flops["attention"] / 3)
    header["flops_per_token"] = flops
    return flops
