"""`turbotune check` (and bare `python -m turbotune`): an environment report, known-bad combinations, a self-test.

The report is meant to be pasted into a bug report. It ends with exactly one line, `PASS` or `FAIL: <reason>`,
and the exit code says the same (0 / 1). *Problems* make it FAIL: turbotune will not work (well) until they
are fixed. *Warnings* do not: something is slower or unavailable, and the message says what. Every check is
guarded: an exception inside one becomes a problem with the exception's one-line message, never a traceback.
The self-test lives in health/selftest.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

# Shown in the report, in this order. Versions come from the installed metadata: nothing is imported for them.
PACKAGES = ("triton", "bitsandbytes", "transformers", "peft", "trl", "accelerate", "datasets", "turbotune")
# Imported for real: a broken install (or a folder on sys.path shadowing one) fails here, not mid-training.
REQUIRED_IMPORTS = ("torch", "transformers", "peft", "accelerate", "safetensors")
MIN_PYTHON = (3, 10)
# Oldest Linux driver for each CUDA major version (NVIDIA's CUDA compatibility table).
MIN_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


@dataclass
class Finding:
    kind: str      # "problem" (makes the check FAIL) or "warning"
    name: str      # short id, e.g. "version-out-of-range"
    message: str   # what is wrong
    fix: str       # what to do about it


def problem(name, message, fix) -> Finding:
    return Finding("problem", name, message, fix)


def warning(name, message, fix) -> Finding:
    return Finding("warning", name, message, fix)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------- the environment

def _version(name: str) -> str:
    from turbotune._compat import package_version
    if name == "turbotune":
        from turbotune import __version__
        return package_version(name) or __version__
    return package_version(name) or "not installed"


def parse_nvidia_smi(text: str) -> dict:
    """Driver version and the newest CUDA it supports, from the header of plain `nvidia-smi` output."""
    driver = re.search(r"Driver Version:\s*([0-9][0-9.]*)", text or "")
    cuda = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", text or "")
    return {"driver": driver.group(1) if driver else None, "cuda": cuda.group(1) if cuda else None}


def _driver_info() -> dict:
    """{'driver', 'cuda'} from nvidia-smi, else pynvml, else libcuda's cuDriverGetVersion; None where unknown."""
    info = {"driver": None, "cuda": None}
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=15)
            info = parse_nvidia_smi(out.stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    if info["cuda"] is None:
        with contextlib.suppress(Exception):
            import pynvml
            pynvml.nvmlInit()
            v = pynvml.nvmlSystemGetCudaDriverVersion()
            info["cuda"] = f"{v // 1000}.{v % 1000 // 10}"
            drv = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = info["driver"] or (drv.decode() if isinstance(drv, bytes) else drv)
    if info["cuda"] is None:
        with contextlib.suppress(Exception):
            import ctypes
            v = ctypes.c_int()
            if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
                info["cuda"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    return info


def _vtuple(v: str | None):
    nums = re.findall(r"\d+", v or "")
    return tuple(int(n) for n in nums[:2]) if nums else None


# ---------------------------------------------------------------- checks (each returns a list of Findings)

def check_python() -> list[Finding]:
    from turbotune._compat import python_older_than
    have = python_older_than(MIN_PYTHON)
    if have:
        return [problem("python-too-old", f"Python {have} is older than {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, the oldest "
                        "turbotune (and current transformers) supports",
                        "install Python 3.10 or newer and reinstall turbotune in a fresh virtual environment")]
    return []


def check_cuda_driver(torch_cuda: str | None, driver_cuda: str | None, driver: str | None = None) -> list[Finding]:
    """torch's CUDA (torch.version.cuda) vs the newest CUDA the driver supports (nvidia-smi's 'CUDA Version')."""
    built, supported = _vtuple(torch_cuda), _vtuple(driver_cuda)
    if not built or not supported or built <= supported:
        return []
    drv = f"driver {driver}" if driver else "driver"
    need = MIN_DRIVER_FOR_CUDA.get(built[0])
    torch_fix = (f"or install a torch built for CUDA {supported[0]}.x or older "
                 f"(pip install torch --index-url https://download.pytorch.org/whl/cu{supported[0]}{supported[1]}; "
                 "pick an index that exists for your torch version)")
    if built[0] > supported[0]:
        return [problem("cuda-newer-than-driver",
                        f"torch was built for CUDA {torch_cuda}, but the NVIDIA {drv} supports CUDA up to "
                        f"{driver_cuda}: torch cannot use the GPU",
                        f"update the NVIDIA driver (CUDA {built[0]}.x needs >= {need or 'a newer driver'}), "
                        + torch_fix)]
    return [warning("cuda-newer-than-driver",
                    f"torch was built for CUDA {torch_cuda}, the NVIDIA {drv} supports CUDA up to {driver_cuda}: "
                    "this usually works (CUDA minor-version compatibility), but kernels that need JIT compilation "
                    "(Triton, some bitsandbytes ops) can fail",
                    "update the NVIDIA driver, " + torch_fix)]


def check_versions() -> list[Finding]:
    from turbotune._compat import out_of_range, untested
    return [problem("version-out-of-range",
                    f"{r.package} {r.version} is outside the range turbotune is tested with (>={r.low},<{r.high})",
                    f"pip install '{r.package}>={r.low},<{r.high}'")
            for r in out_of_range()] + [
        warning("version-untested", f"{name} {v} is outside the releases turbotune's tests ran on ({low} to {high}): "
                "it likely works, but if something breaks, this is the first suspect",
                f"pip install '{name}>={low},<{_next_minor(high)}' (or install turbotune with its repo's "
                "constraints.txt: pip install -c constraints.txt ...)")
        for name, v, low, high in untested()]


def _next_minor(version: str) -> str:
    major, minor = (version.split(".") + ["0"])[:2]
    return f"{major}.{int(minor) + 1}"


def check_imports(names=REQUIRED_IMPORTS) -> list[Finding]:
    import importlib
    import importlib.util
    found = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt-free in practice; report all
            if isinstance(e, KeyboardInterrupt):
                raise
            where = ""
            with contextlib.suppress(Exception):
                spec = importlib.util.find_spec(name)
                if spec is not None and spec.origin:
                    where = f" (from {spec.origin})"
            found.append(problem("import-broken", f"{name} fails to import{where}: {_one_line(e)}",
                                 f"reinstall it (pip install --force-reinstall {name}) and make sure no folder on "
                                 "PYTHONPATH or in the current directory shadows it"))
    return found


def check_bitsandbytes(gpu: bool) -> list[Finding]:
    from turbotune._compat import is_available
    if not is_available("bitsandbytes"):
        return [warning("bitsandbytes-missing", "bitsandbytes is not installed: 4-bit QLoRA (load_in_4bit) is "
                        "unavailable", "pip install 'bitsandbytes>=0.45'")]
    fix = ("pip install --force-reinstall 'bitsandbytes>=0.45' (its wheels ship the CUDA libraries); if it still "
           "fails, run `python -m bitsandbytes` for its own diagnosis")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [problem("bitsandbytes-broken", f"bitsandbytes fails to import: {_one_line(e)}", fix)]
    if not gpu:
        return _bitsandbytes_cpu_layout()
    try:
        import torch
        from bitsandbytes import functional as bnbf
        x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        err = ((bnbf.dequantize_4bit(packed, state) - x).abs().mean() / x.abs().mean()).item()
        if not err < 0.25:
            raise RuntimeError(f"NF4 round trip is off by {err:.2f} (relative)")
    except Exception as e:  # noqa: BLE001
        return [problem("bitsandbytes-broken", f"bitsandbytes cannot run a 4-bit op on the GPU: {_one_line(e)}", fix)]
    return []


def _bitsandbytes_cpu_layout() -> list[Finding]:
    """bitsandbytes 0.50's AVX-512 CPU kernel reads 4-bit scales per row: wrong for rows that straddle blocks."""
    from turbotune.model.quant import bnb_cpu_dequant_misreads_rows
    if not bnb_cpu_dequant_misreads_rows():
        return []
    return [warning("bitsandbytes-cpu-4bit", f"bitsandbytes {_version('bitsandbytes')} dequantises 4-bit weights "
                    "wrongly on this CPU when a weight's row length is not a multiple of the quantisation block "
                    "size (its AVX-512 kernel looks the scales up per row). turbotune's own 4-bit path is not "
                    "affected; stock bitsandbytes layers on the CPU (patch=False, CPU inference) are, for such "
                    "weights (rare: real models' rows are multiples of 64)",
                    "nothing to do for training with turbotune; for stock bitsandbytes CPU inference, use a "
                    "bitsandbytes release that fixes its AVX-512 dequantisation")]


def check_gpu_features(env: dict) -> list[Finding]:
    from turbotune._compat import is_available
    found = []
    if env.get("_cuda_available") is not True:
        return found
    from turbotune.model.loader import is_bfloat16_supported
    if not is_bfloat16_supported():
        found.append(warning("no-bf16", f"this GPU (compute capability {env['compute_capability']}) has no fast "
                             "bf16: fp16 will be used, which needs loss scaling and is less robust",
                             "nothing to do (dtype=None picks fp16); an Ampere or newer GPU trains in bf16"))
    if not is_available("triton"):
        found.append(warning("triton-missing", "triton is not installed: the fused kernels fall back to PyTorch "
                             "(same results, slower, more memory)", "pip install 'triton>=3.0'"))
    return found


def _inspect_torch(torch, env: dict, drv: dict) -> list[Finding]:
    """torch's build, the GPU it sees, and what is wrong between torch, the driver and the GPU."""
    found = check_cuda_driver(torch.version.cuda, drv["cuda"], drv["driver"])
    env["torch"] = torch.__version__
    hip = getattr(torch.version, "hip", None)
    env["torch_cuda"] = torch.version.cuda or (f"n/a (ROCm {hip} build)" if hip else "n/a (CPU-only build)")
    if torch.cuda.is_available():
        from turbotune.model.loader import is_bfloat16_supported
        props = torch.cuda.get_device_properties(0)
        env.update(_cuda_available=True, gpu=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_memory=f"{props.total_memory / 2**30:.1f} GiB",
                   compute_capability=f"{props.major}.{props.minor}",
                   bf16="yes" if is_bfloat16_supported() else "no (fp16 will be used)")
    elif not drv["driver"]:
        env["bf16"] = "n/a (CPU trains in fp32)"
    elif torch.version.cuda:
        reason = "torch.cuda.is_available() is False"
        try:
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001
            reason = _one_line(e)
        found.append(problem("cuda-unusable", f"an NVIDIA driver is installed but torch cannot use the GPU: {reason}",
                             "check that `nvidia-smi` works and CUDA_VISIBLE_DEVICES is not empty; then see the "
                             "driver/CUDA problem above, if any"))
    else:
        found.append(warning("torch-cpu-only", "this machine has an NVIDIA driver but torch is a CPU-only build: "
                             "training runs on the CPU (very slow)",
                             "pip install torch --index-url https://download.pytorch.org/whl/cu126 "
                             "(pick the CUDA version your driver supports)"))
    return found


def collect_env() -> tuple[dict, list[Finding]]:
    """The environment report, plus findings about the GPU stack (driver vs CUDA, a GPU torch cannot use)."""
    from turbotune._compat import package_version
    found: list[Finding] = []
    env = {"os": platform.platform(), "python": f"{platform.python_version()} ({platform.python_implementation()})"}
    drv = {"driver": None, "cuda": None}
    try:
        drv = _driver_info()
    except Exception as e:  # noqa: BLE001
        found.append(problem("check-crashed", f"reading the NVIDIA driver version failed: {_one_line(e)}",
                             "check that `nvidia-smi` runs"))
    env.update(cuda_driver=drv["driver"] or "n/a", driver_cuda=drv["cuda"] or "n/a", torch="not installed",
               torch_cuda="n/a", gpu="no GPU", gpu_count=0, gpu_memory="n/a", compute_capability="n/a", bf16="n/a",
               _cuda_available=False)
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - check_imports reports it as a problem
        torch = None
        if package_version("torch"):
            env["torch"] = f"broken ({_one_line(e)})"
    if torch is not None:
        try:
            found += _inspect_torch(torch, env, drv)
        except Exception as e:  # noqa: BLE001
            found.append(problem("check-crashed", f"inspecting torch and the GPU failed: {_one_line(e)}",
                                 "check that `nvidia-smi` works; reinstall torch if it does"))
    for name in PACKAGES:
        try:
            env[name] = _version(name)
        except Exception as e:  # noqa: BLE001
            env[name] = f"unknown ({_one_line(e)})"
    return env, found


def run_checks(env_findings: list[Finding], env: dict) -> list[Finding]:
    found = list(env_findings)
    gpu = env.get("_cuda_available") is True
    for label, check in (("Python version", check_python), ("package versions", check_versions),
                         ("imports", check_imports), ("bitsandbytes", lambda: check_bitsandbytes(gpu)),
                         ("GPU features", lambda: check_gpu_features(env))):
        try:
            found += check()
        except Exception as e:  # noqa: BLE001 - a crashing check is a problem, not a traceback
            found.append(problem("check-crashed", f"the {label} check crashed: {_one_line(e)}",
                                 "please report this output as a turbotune issue"))
    return found


# ---------------------------------------------------------------- the self-test, as findings

def self_test_findings(result: dict) -> list[Finding]:
    fix = ("train with stock forwards meanwhile (patch=False / --no-patch) and report this output as a turbotune "
           "issue")
    if result.get("error"):
        return [problem("self-test", result["error"], "fix the problems above first; if there are none, " + fix)]
    return [problem("self-test", c["detail"], fix) for c in result.get("checks", []) if not c["ok"]]


def _run_self_test() -> dict:
    try:
        from turbotune.health.selftest import run_self_test
        return run_self_test()
    except Exception as e:  # noqa: BLE001
        return {"ran": True, "ok": False, "error": f"the self-test crashed: {_one_line(e)}", "checks": []}


# ---------------------------------------------------------------- output

def _status(problems: list[Finding]) -> tuple[str, str | None]:
    if not problems:
        return "PASS", None
    reason = problems[0].message
    if len(problems) > 1:
        reason += f" (+{len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return "FAIL", " ".join(reason.split())


def _fmt_env(env: dict) -> list[str]:
    width = max(len(k) for k in env)
    return [f"  {k:<{width}} : {v}" for k, v in env.items()]


def _fmt_findings(title: str, items: list[Finding]) -> list[str]:
    if not items:
        return [f"{title}: none"]
    lines = [f"{title} ({len(items)}):"]
    for f in items:
        lines += [f"  - [{f.name}] {f.message}", f"    fix: {f.fix}"]
    return lines


def _fmt_self_test(st: dict) -> list[str]:
    if not st.get("ran"):
        return [f"Self-test: skipped ({st.get('skipped')})"]
    lines = [f"Self-test: {st.get('device', '?')}, {st.get('dtype', '?')}"]
    if "model" in st:
        b = st["batch"]
        lines.append(f"  {st['model']}; LoRA r={st['lora_r']}; batch {b[0]}x{b[1]}; 1 step of AdamW")
    if st.get("error"):
        return lines + [f"  error: {st['error']}"]
    lines.append(f"  {'variant':<14}  {'loss':>10}  {'peak memory':>12}  {'time':>9}")
    for name, v in st.get("variants", {}).items():
        if "error" in v:
            lines.append(f"  {name:<14}  failed (see below)")
        else:
            lines.append(f"  {name:<14}  {v['loss']:>10.6f}  {v['peak_memory_mb']:>9.2f} MB  {v['time_s']:>7.3f} s")
    if st.get("memory_ratio") is not None or st.get("time_ratio") is not None:
        mem, t = (f"{r:.2f}x" if r is not None else "n/a" for r in (st.get("memory_ratio"), st.get("time_ratio")))
        lines.append(f"  turbotune / stock: memory {mem}, time {t}")
    lines.append(f"  peak memory = {st.get('memory_measure')}")
    if st.get("note_4bit"):
        lines.append(f"  note: {st['note_4bit']}")
    for c in st.get("checks", []):
        lines.append(f"  [{'ok' if c['ok'] else 'FAILED'}] {c['detail']}")
    return lines


def _json_safe(obj):
    """Strict JSON: NaN / inf (a broken loss) become the strings "nan" / "inf"; unknown objects their str()."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout clean for the JSON: anything else (ours, libraries', C code's) goes to stderr meanwhile."""
    sys.stdout.flush()
    saved = None
    with contextlib.suppress(Exception):
        fd = sys.stdout.fileno()
        saved = (fd, os.dup(fd))
        os.dup2(sys.stderr.fileno(), fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved:
            os.dup2(saved[1], saved[0])
            os.close(saved[1])


def run_health_check(as_json: bool = False, self_test: bool = True) -> int:
    """Print the report (text, or one JSON object with as_json) and return the exit code: 0 PASS, 1 FAIL."""
    out = sys.stdout
    say = (lambda *a: None) if as_json else (lambda line="": print(line, file=out, flush=True))
    env, found, st = {}, [], {"ran": False, "skipped": "--no-self-test"}
    try:
        with _stdout_to_stderr() if as_json else contextlib.nullcontext():
            from turbotune import __version__
            say(f"turbotune {__version__} health check")
            env, env_found = collect_env()
            found = run_checks(env_found, env)
            gpu = env.pop("_cuda_available", False) is True
            say("Environment:")
            for line in _fmt_env(env):
                say(line)
            say()
            if self_test and any(f.name == "import-broken" for f in found):
                st = {"ran": False, "skipped": "required packages fail to import (see the problems)"}
            elif self_test:
                say("Running the self-test on the GPU..." if gpu else "no GPU: running the self-test on the CPU")
                st = _run_self_test()
                found += self_test_findings(st)
            for line in _fmt_self_test(st):
                say(line)
            say()
    except BaseException as e:  # noqa: BLE001 - the check itself must never end in a traceback
        if isinstance(e, KeyboardInterrupt):
            raise
        found.append(problem("check-crashed", f"the health check crashed: {_one_line(e)}",
                             "please report this output as a turbotune issue"))
    env.pop("_cuda_available", None)
    problems = [f for f in found if f.kind == "problem"]
    warnings_ = [f for f in found if f.kind != "problem"]
    status, reason = _status(problems)
    if as_json:
        strip = lambda fs: [{k: v for k, v in asdict(f).items() if k != "kind"} for f in fs]  # noqa: E731
        report = {"env": env, "problems": strip(problems), "warnings": strip(warnings_), "self_test": st,
                  "status": status, "reason": reason}
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False), file=out, flush=True)
    else:
        for line in _fmt_findings("Problems", problems) + _fmt_findings("Warnings", warnings_):
            say(line)
        say(status if status == "PASS" else f"FAIL: {reason}")
    return 0 if status == "PASS" else 1
