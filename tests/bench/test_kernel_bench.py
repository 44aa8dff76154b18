"""bench/kernel_bench.py, the one benchmark of every kernel, runs each op once on the CPU (tiny shapes, Triton's
interpreter) and finds turbotune's implementation equal to the reference: the bench itself does not rot."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernel_bench.py"


def test_every_op_runs_and_matches_its_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tokens", "32", "--hidden", "64",
                           "--intermediate", "96", "--vocab", "200", "--head-dim", "16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    for op in ("swiglu", "geglu", "rmsnorm", "rope", "fused_linear_ce", "lora_mlp", "nf4_dequant"):
        assert any(r and r[0] == op and "turbotune" in r for r in rows), (op, proc.stdout)
    assert "MISMATCH" not in proc.stdout
