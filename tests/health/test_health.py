"""`turbotune check` / bare `python -m turbotune`: report, known-bad combinations, self-test, PASS/FAIL."""
import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from turbotune.health import check as health

from turbotune.health import selftest as health_selftest
ENV_KEYS = {"os", "python", "torch", "torch_cuda", "cuda_driver", "driver_cuda", "gpu", "gpu_memory",
            "compute_capability", "triton", "bitsandbytes", "transformers", "peft", "trl", "accelerate", "datasets",
            "turbotune"}
NVIDIA_SMI_535 = """Tue Mar  5 10:00:00 2024
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.161.07             Driver Version: 535.161.07   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
"""
NVIDIA_SMI_580 = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0     |\n"


def _subprocess_env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("TRITON_INTERPRET", None)  # the product runs without the test-only interpreter switch
    return env


def _start_cli(args, cwd, **env):
    """Output goes to files (not pipes), so a chatty run never blocks while nobody reads it."""
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "turbotune", *args], cwd=cwd, env=_subprocess_env(**env),
                                stdout=out, stderr=err)
    proc.cwd = cwd
    return proc


def _finish(proc):
    proc.wait(timeout=240)
    read = lambda name: (proc.cwd / name).read_text()  # noqa: E731
    return subprocess.CompletedProcess(proc.args, proc.returncode, read("stdout.txt"), read("stderr.txt"))


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """The two CLI subprocesses start at once and run beside the in-process tests (keeps the file < 60 s)."""
    bare_dir = tmp_path_factory.mktemp("bare")
    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "peft").mkdir()
    (shadow / "peft" / "__init__.py").write_text("raise ImportError('peft is broken on purpose')\n")
    pythonpath = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))  # shadow comes first
    procs = {"bare": _start_cli([], bare_dir),
             "broken": _start_cli(["check", "--json"], shadow, PYTHONPATH=pythonpath),
             "shadow": shadow}
    yield procs
    for p in procs.values():
        if isinstance(p, subprocess.Popen) and p.poll() is None:
            p.kill()
            p.wait()


def _check_json(self_test=True):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = health.run_health_check(as_json=True, self_test=self_test)
    return rc, json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def passing_json():
    """One in-process `turbotune check --json` run, shared by the assertions on its content."""
    return _check_json()


# ---------------------------------------------------------------- the whole command

def test_json_passes_with_env_and_self_test(passing_json):
    rc, data = passing_json
    assert rc == 0 and data["status"] == "PASS" and data["reason"] is None, data
    assert ENV_KEYS <= set(data["env"])
    assert data["problems"] == []
    st = data["self_test"]
    assert st["ran"] and st["ok"]
    for name in ("turbotune", "stock"):
        v = st["variants"][name]
        assert v["peak_memory_mb"] >= 0 and v["time_s"] > 0 and v["lora_changed"]
    assert st["variants"]["turbotune"]["patched"] and not st["variants"]["stock"]["patched"]
    assert isinstance(st["memory_ratio"], (int, float)) and isinstance(st["time_ratio"], (int, float))
    assert {c["name"] for c in st["checks"]} >= {"loss matches stock", "LoRA gradients match stock"}
    if "note_4bit" not in st:  # bitsandbytes installed: the QLoRA pair ran and its dequantisation was checked
        assert {c["name"] for c in st["checks"]} >= {"4-bit loss matches stock 4-bit",
                                                     "4-bit dequantisation matches bitsandbytes"}
        assert st["variants"]["turbotune-4bit"]["nf4_checked"] == 14  # 7 projections x 2 layers


# ---------------------------------------------------------------- forced failures

def test_version_out_of_range_fails_with_fix(monkeypatch, capsys):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "4.40.0" if n == "transformers" else real(n))
    rc, data = _check_json(self_test=False)
    assert rc == 1 and data["status"] == "FAIL"
    (p,) = [p for p in data["problems"] if p["name"] == "version-out-of-range"]
    assert "transformers 4.40.0" in p["message"] and p["fix"] == "pip install 'transformers>=4.57,<6.0'"
    assert "transformers 4.40.0" in data["reason"]
    assert data["env"]["transformers"] == "4.40.0"

    assert health.run_health_check(as_json=False, self_test=False) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FAIL: transformers 4.40.0 is outside the range")


def test_nan_loss_fails(monkeypatch):
    real = health_selftest._forward_loss
    monkeypatch.setattr(health_selftest, "_forward_loss", lambda m, b: real(m, b) * float("nan"))
    rc, data = _check_json()
    assert rc == 1 and data["status"] == "FAIL"
    assert "not finite" in data["reason"] and data["self_test"]["variants"]["stock"]["loss"] == "nan"
    failed = {c["name"] for c in data["self_test"]["checks"] if not c["ok"]}
    assert "stock loss finite" in failed  # (and turbotune's, and the loss comparison: NaN matches nothing)
    assert "loss matches stock" in failed or "turbotune step runs" in failed


def test_broken_nf4_dequantisation_fails(monkeypatch):
    """A dequantisation that is off (here: every weight 6% too large) fails the 4-bit checks, the 16-bit pair
    still passes, and the report names the check."""
    pytest.importorskip("bitsandbytes")
    import turbotune.model.quant as tq
    real = tq.dequantize_nf4_into
    monkeypatch.setattr(tq, "dequantize_nf4_into", lambda *a, **kw: real(*a, **kw).mul_(1.0625))
    rc, data = _check_json()
    assert rc == 1 and data["status"] == "FAIL"
    checks = {c["name"]: c["ok"] for c in data["self_test"]["checks"]}
    assert checks["4-bit dequantisation matches bitsandbytes"] is False
    assert checks["4-bit loss matches stock 4-bit"] is False
    assert checks["loss matches stock"] and checks["LoRA gradients match stock"]
    assert "NF4 weights dequantised by turbotune" in data["reason"]


def test_bitsandbytes_cpu_row_bug_is_a_warning(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import turbotune.model.quant as tq
    monkeypatch.setattr(tq, "bnb_cpu_dequant_misreads_rows", lambda: True)
    (w,) = health.check_bitsandbytes(gpu=False)
    assert w.kind == "warning" and w.name == "bitsandbytes-cpu-4bit" and "not affected" in w.message
    monkeypatch.setattr(tq, "bnb_cpu_dequant_misreads_rows", lambda: False)
    assert health.check_bitsandbytes(gpu=False) == []


def test_crashing_check_is_a_problem_not_a_traceback(monkeypatch):
    def boom():
        raise ValueError("metadata is unreadable\nsecond line")
    monkeypatch.setattr(health, "check_versions", boom)
    rc, data = _check_json(self_test=False)
    assert rc == 1
    (p,) = [p for p in data["problems"] if p["name"] == "check-crashed"]
    assert p["message"] == "the package versions check crashed: ValueError: metadata is unreadable"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a GPU-less driver situation")
def test_driver_vs_torch_end_to_end(monkeypatch):
    monkeypatch.setattr(health, "_driver_info", lambda: health.parse_nvidia_smi(NVIDIA_SMI_535))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    rc, data = _check_json(self_test=False)
    assert rc == 1 and data["env"]["driver_cuda"] == "12.2" and data["env"]["torch_cuda"] == "13.0"
    assert {"cuda-newer-than-driver", "cuda-unusable"} <= {p["name"] for p in data["problems"]}
    assert data["reason"].startswith("torch was built for CUDA 13.0, but the NVIDIA driver 535.161.07 supports")

    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch on a machine with a driver: slow, not broken
    rc, data = _check_json(self_test=False)
    names = [w["name"] for w in data["warnings"] if w["name"] != "bitsandbytes-cpu-4bit"]  # this CPU's, maybe
    assert rc == 0 and names == ["torch-cpu-only"]


def test_gpu_inspection_crash_is_a_problem(monkeypatch):
    def boom():
        raise RuntimeError("CUDA driver initialization failed")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    rc, data = _check_json(self_test=False)
    assert rc == 1
    (p,) = [p for p in data["problems"] if p["name"] == "check-crashed"]
    assert "inspecting torch and the GPU failed: RuntimeError: CUDA driver initialization failed" in p["message"]


# ---------------------------------------------------------------- unit checks

def test_python_too_old(monkeypatch):
    assert health.check_python() == []
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    (p,) = health.check_python()
    assert p.kind == "problem" and p.name == "python-too-old" and "3.9.18" in p.message and "3.10" in p.fix


def test_parse_nvidia_smi():
    assert health.parse_nvidia_smi(NVIDIA_SMI_535) == {"driver": "535.161.07", "cuda": "12.2"}
    assert health.parse_nvidia_smi(NVIDIA_SMI_580) == {"driver": "580.65.06", "cuda": "13.0"}
    assert health.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == \
        {"driver": None, "cuda": None}
    assert health.parse_nvidia_smi("") == {"driver": None, "cuda": None}


def test_cuda_newer_than_driver():
    cuda = health.parse_nvidia_smi(NVIDIA_SMI_535)["cuda"]
    (p,) = health.check_cuda_driver("13.0", cuda, "535.161.07")
    assert p.kind == "problem" and p.name == "cuda-newer-than-driver"
    assert "CUDA 13.0" in p.message and "12.2" in p.message and "580" in p.fix
    (w,) = health.check_cuda_driver("12.6", cuda)  # same major: minor-version compatibility, a warning
    assert w.kind == "warning"
    assert health.check_cuda_driver("12.2", cuda) == []
    assert health.check_cuda_driver("11.8", cuda) == []
    assert health.check_cuda_driver(None, cuda) == []      # CPU-only torch
    assert health.check_cuda_driver("12.8", None) == []    # driver unknown


# ---------------------------------------------------------------- the CLI in subprocesses (started by cli_runs)

def test_bare_module_prints_report_and_passes(cli_runs):
    r = _finish(cli_runs["bare"])
    out = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert out[-1] == "PASS"
    text = r.stdout
    for key in ("python", "torch_cuda", "driver_cuda", "transformers", "peft", "bitsandbytes", "turbotune"):
        assert any(line.strip().startswith(key + " ") for line in out), key
    assert "Self-test:" in text and "turbotune / stock: memory" in text
    if not torch.cuda.is_available():
        assert "no GPU: running the self-test on the CPU" in text
    assert "Traceback" not in text + r.stderr


def test_broken_import_subprocess_fails(cli_runs):
    r = _finish(cli_runs["broken"])
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(r.stdout)  # stdout holds the JSON object and nothing else
    assert data["status"] == "FAIL" and "peft fails to import" in data["reason"]
    (p,) = [p for p in data["problems"] if p["name"] == "import-broken"]
    assert "peft is broken on purpose" in p["message"]
    assert str(cli_runs["shadow"] / "peft" / "__init__.py") in p["message"]  # says where the bad module is
    assert data["self_test"]["ran"] is False
    assert "Traceback" not in r.stderr
