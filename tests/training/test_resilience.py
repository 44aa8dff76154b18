"""Training never loses work: SIGKILL mid-save, SIGINT + resume, NaN, out-of-memory, wrong output dirs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from turbotune import FastModel
from turbotune.training.checkpoints import latest_checkpoint, list_checkpoints, load_adapter_weights
from turbotune.data.dataset import prepare_dataset
from turbotune.errors import ConfigError, TrainingStopped
from turbotune.training.config import TrainConfig
from turbotune.training.trainer import Trainer

ROWS = [{"instruction": f"Describe item {i}.", "output": f"Item {i} is light, warm and built to last."}
        for i in range(12)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return f


def _cli(tiny_dir, data_file, out, *extra):
    return [sys.executable, "-m", "turbotune", "train", "--model", str(tiny_dir), "--data", str(data_file),
            "--output-dir", str(out), "--batch-size", "2", "--grad-accum", "2", "--max-seq-length", "64",
            "--lora-r", "4", "--lr", "5e-3", "--warmup-steps", "1", "--seed", "11", *extra]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU path uses the PyTorch references; no interpreter needed
    return env


def _losses(out):
    return [h["loss"] for h in json.loads((Path(out) / "training_log.json").read_text())["history"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_cli(tiny_llama_dir, data_file, out, "--max-steps", "6"), check=True, env=_env(),
                   capture_output=True, timeout=300)
    return _losses(out)


def test_sigint_then_resume_matches_uninterrupted(tiny_llama_dir, data_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    cmd = _cli(tiny_llama_dir, data_file, out, "--max-steps", "6")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until step 2 is logged, then Ctrl-C
        if line.strip().startswith("2 |"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    stopped_at = latest_checkpoint(out)
    assert stopped_at is not None and 2 <= int(stopped_at.name.split("-")[1]) < 6

    subprocess.run(cmd + ["--resume"], check=True, env=_env(), capture_output=True, timeout=300)
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_sigkill_during_checkpoint_write_keeps_previous(tiny_llama_dir, data_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    marker = tmp_path / "saving"
    # Pause inside the second checkpoint's write (after its adapter is on disk) so the kill lands mid-save.
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        import turbotune.training.checkpoints as c
        real, calls = c.rng_state, [0]
        def slow_rng_state():
            calls[0] += 1
            if calls[0] == 2:
                pathlib.Path({str(marker)!r}).write_text("x")
                time.sleep(120)
            return real()
        c.rng_state = slow_rng_state
        from turbotune.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = _cli(tiny_llama_dir, data_file, out, "--max-steps", "6", "--save-steps", "1")[3:]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert list(out.glob(".checkpoint-2.tmp-*")), "the killed save should have left only a temporary folder"
    # the previous checkpoint still loads into a fresh model
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, verbose=False)
    load_adapter_weights(model, out / "checkpoint-1")

    subprocess.run(_cli(tiny_llama_dir, data_file, out, "--max-steps", "6", "--save-steps", "1", "--resume"),
                   check=True, env=_env(), capture_output=True, timeout=300)
    assert not list(out.glob(".*tmp*"))
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def _trainer(tiny_dir, tmp_path, **cfg_kw):
    model, tok = FastModel.from_pretrained(str(tiny_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, verbose=False)
    data, _ = prepare_dataset(ROWS, tok, max_seq_length=64)
    kw = dict(output_dir=str(tmp_path / "o"), batch_size=2, grad_accum=1, max_steps=4, lr=1e-3, warmup_steps=0)
    kw.update(cfg_kw)
    cfg = TrainConfig(**kw)
    return Trainer(cfg, model, tok, data, progress=False)


def _poison_embeddings(model, at_call, exc=None):
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == at_call:
            if exc is not None:
                raise exc
            return output * float("nan")
        return output

    return model.get_input_embeddings().register_forward_hook(hook)


def test_nan_loss_stops_with_step_and_causes(tiny_llama_dir, tmp_path):
    t = _trainer(tiny_llama_dir, tmp_path, save_steps=1)
    _poison_embeddings(t.model, at_call=3)
    with pytest.raises(TrainingStopped) as e:
        t.train()
    msg = str(e.value)
    assert "step 3" in msg and "learning rate" in msg and "fp16" in msg and "checkpoint-2" in msg
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [1, 2]


def test_skip_nonfinite_counts(tiny_llama_dir, tmp_path):
    t = _trainer(tiny_llama_dir, tmp_path, skip_nonfinite=True)
    _poison_embeddings(t.model, at_call=2)
    result = t.train()
    assert result.skipped_nonfinite == 1 and result.steps == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_oom_message_names_sizes_and_knobs(tiny_llama_dir, tmp_path):
    t = _trainer(tiny_llama_dir, tmp_path, max_seq_length=64)
    _poison_embeddings(t.model, at_call=1, exc=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(TrainingStopped) as e:
        t.train()
    msg = str(e.value)
    for needle in ("out of GPU memory", "micro-batch 2", "sequence length up to 64", "--batch-size 1",
                   "--grad-accum 2", "--max-seq-length", "--load-in-4bit"):
        assert needle in msg, needle


def test_output_dir_with_other_run_is_not_overwritten(tiny_llama_dir, tmp_path):
    t = _trainer(tiny_llama_dir, tmp_path, max_steps=1)
    t.train()
    other = _trainer(tiny_llama_dir, tmp_path, max_steps=1, seed=99)
    with pytest.raises(ConfigError, match="different run.*seed"):
        other.train()
    same = _trainer(tiny_llama_dir, tmp_path, max_steps=1)
    with pytest.raises(ConfigError, match="--resume"):
        same.train()
    again = _trainer(tiny_llama_dir, tmp_path, max_steps=1, seed=99, overwrite=True)
    assert again.train().steps == 1


def test_adapter_from_other_base_is_a_clear_error(tiny_llama_dir, tmp_path, smol_tokenizer):
    from conftest import make_tiny_model

    from turbotune.errors import TurbotuneError

    t = _trainer(tiny_llama_dir, tmp_path, max_steps=1)
    t.train()
    wide = make_tiny_model(tmp_path / "wide", smol_tokenizer, "llama", hidden_size=96)
    model, _ = FastModel.from_pretrained(str(wide), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, verbose=False)
    with pytest.raises(TurbotuneError, match="different base model"):
        load_adapter_weights(model, tmp_path / "o" / "last_checkpoint")


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("epocs: 3\n")
    r = subprocess.run([sys.executable, "-m", "turbotune", "train", "--config", str(bad)], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "unknown key 'epocs'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "turbotune", "train", "--data", str(tmp_path / "missing.jsonl"),
                        "--model", str(tmp_path / "nomodel")], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_library_resume_from_checkpoint(tiny_llama_dir, tmp_path):
    full = _trainer(tiny_llama_dir, tmp_path / "a", max_steps=4).train()
    first = _trainer(tiny_llama_dir, tmp_path / "b", max_steps=4, save_steps=2)
    first.total_steps = 2  # stop early, as a crash would, after checkpoint-2
    first.train()
    again = _trainer(tiny_llama_dir, tmp_path / "b", max_steps=4)
    result = again.train(resume_from_checkpoint=str(tmp_path / "b" / "o" / "last_checkpoint"))
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
