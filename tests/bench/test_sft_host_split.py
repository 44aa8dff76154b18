"""bench/sft_host_split.py runs a few SFTTrainer steps of a tiny model on the CPU and splits each step into the
model's pass and the phases around it: every phase it wraps is reached, and the split adds up."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sft_host_split.py"


def test_the_step_is_split_into_phases_that_add_up():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", "--steps", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ms = {m.group(1).strip(): float(m.group(2))
          for m in re.finditer(r"^(\S[^\n]*?)\s{2,}(-?\d+\.\d+)", proc.stdout, re.M)}
    for phase in ("model forward (the pass)", "backward (the pass)", "optimizer.step", "clip_grad_norm_",
                  "zero_grad", "data: get_batch_samples", "log / save / evaluate", "training_step (all of it)",
                  "deferred backward (gradient read)"):
        assert ms.get(phase, 0) > 0, (phase, proc.stdout)
    step = float(re.search(r"([\d.]+) ms per step", proc.stdout).group(1))
    # the step's last backward runs outside training_step (deferred to the gradient read), the rest inside it
    inside = ms["the pass (forward + backward)"] - ms["deferred backward (gradient read)"]
    assert ms["training_step (all of it)"] >= inside * 0.999
    around = float(re.search(r"training_step around the pass\s+(-?[\d.]+)", proc.stdout).group(1))
    assert around >= -0.01, proc.stdout
    assert 0 < ms["outside the pass"] < step
    assert abs(ms["the pass (forward + backward)"] + ms["outside the pass"] - step) < 0.05
