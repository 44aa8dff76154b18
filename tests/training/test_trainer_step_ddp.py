"""SFTTrainer under torchrun (2 CPU processes, gloo, PyTorch's DDP as transformers sets it up): on a turbotune model
the per-step losses and grad norms equal the stock transformers + PEFT model's under the same launch, with the
micro-batches of each step coalesced into several passes (those before a step's last run under DDP's no_sync)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

ENTRY = """
import json, os, sys
sys.path.insert(0, {repo!r})
import datasets, torch, trl
from tests.training.test_trainer_step import _model, _rows
from turbotune.training import trainer_step

patch, folder, out = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
model, tok = _model(folder, patch)
args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=3,
                     learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", bf16=False, fp16=False,
                     seed=7, max_length=128, ddp_backend="gloo")
trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows()),
                         processing_class=tok)
trainer.train()
step = trainer_step.trainer_step_of(model)
window = None if step is None else {{k: getattr(step.window, k) for k in ("steps", "micro_batches", "passes")}}
if os.environ["RANK"] == "0":
    with open(os.path.join(out, "log.json"), "w") as f:
        json.dump({{"logs": [h for h in trainer.state.log_history if "loss" in h], "window": window}}, f)
"""


def _launch(tiny_dir, tmp_path, patch):
    script, out = tmp_path / "entry.py", tmp_path / f"out-{patch}"
    script.write_text(textwrap.dedent(ENTRY.format(repo=str(REPO))))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), "1" if patch else "0",
                           str(tiny_dir), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "log.json").read_text())


def test_sfttrainer_under_torchrun_equals_stock(tiny_llama_dir, tmp_path):
    ours, stock = _launch(tiny_llama_dir, tmp_path, True), _launch(tiny_llama_dir, tmp_path, False)
    window = ours["window"]  # rank 0's: up to 4 micro-batches a step, passes of at most 2 x 128 real tokens
    assert window["steps"] == 3 and window["steps"] < window["passes"] < window["micro_batches"], window
    assert stock["window"] is None
    assert len(ours["logs"]) == len(stock["logs"]) == 3
    for a, b in zip(ours["logs"], stock["logs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (ours, stock)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
