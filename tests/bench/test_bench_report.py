"""The bench report's header: every condition a figure depends on is printed beside it."""
from turbotune.bench.report import format_header


def _header(**kw):
    h = {"date_utc": "2026-11-28 08:00:00 UTC", "command": "python -m turbotune bench --preset tiny",
         "device": {"type": "cuda", "name": "NVIDIA H200"},
         "versions": {"torch": "2.11.0", "turbotune": "0.1.0"}, "preset": "tiny", "model_dir": None,
         "model_type": "llama", "matmul": None, "flops_per_token": None,
         "workload": {"seq_len": 64, "micro_batch": 2, "grad_accum": 1, "steps": 3, "warmup": 1, "timed_steps": 2,
                      "tokens_per_step": 128, "lora_r": 4, "lora_alpha": 4, "qlora": False, "dtype": "bfloat16",
                      "lr": 2e-4, "seed": 0},
         "price_usd_per_gpu_hour": 2.5, "cost_steps": 1000}
    h.update(kw)
    return h


def test_allocator_settings_are_printed_after_the_command():
    lines = format_header(_header(alloc_conf="expandable_segments:True")).splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("- command:"))
    assert lines[i + 1] == "- environment: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def test_no_environment_line_without_allocator_settings():
    for h in (_header(), _header(alloc_conf=None)):
        text = format_header(h)
        assert "environment" not in text and "- command: `python -m turbotune bench --preset tiny`" in text


def test_turbotune_switches_are_printed_beside_the_allocator():
    h = _header(alloc_conf="expandable_segments:True",
                switches_env={"TURBOTUNE_BUCKETS": "4", "TURBOTUNE_FLASH_WINDOW": "0"})
    lines = format_header(h).splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("- command:"))
    assert lines[i + 1] == ("- environment: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TURBOTUNE_BUCKETS=4 "
                            "TURBOTUNE_FLASH_WINDOW=0")
    assert "environment" not in format_header(_header(switches_env={}))


def test_the_source_commit_is_printed_with_the_date():
    assert "- date: 2026-11-28 08:00:00 UTC; turbotune commit 2dd875b" in format_header(_header(source="2dd875b"))
    assert "turbotune commit" not in format_header(_header(source=None))


def test_source_commit_from_the_environment_or_turbotune_s_own_checkout(monkeypatch):
    """BENCH_SOURCE_COMMIT (a snapshot without git history) wins; otherwise git, but only where the repository
    is turbotune's own checkout (an installed copy inside another repository says nothing)."""
    import subprocess
    from pathlib import Path

    from turbotune.bench import header
    monkeypatch.setenv("BENCH_SOURCE_COMMIT", "abc1234")
    assert header.source_commit() == "abc1234"
    monkeypatch.delenv("BENCH_SOURCE_COMMIT")
    own = Path(header.__file__).resolve().parents[3]  # <checkout>/src/turbotune/bench/header.py

    def fake_git(top, status=""):
        def run(cmd, **kw):
            out = f"{top}\n{'f' * 40}\n" if "--show-toplevel" in cmd else status
            return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")
        return run

    monkeypatch.setattr(subprocess, "run", fake_git(own))
    assert header.source_commit() == "fffffff"
    monkeypatch.setattr(subprocess, "run", fake_git(own, status=" M src/x.py\n"))
    assert header.source_commit() == "fffffff+changes"
    monkeypatch.setattr(subprocess, "run", fake_git("/somewhere/else"))
    assert header.source_commit() is None
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 128, "", "not a repo"))
    assert header.source_commit() is None
