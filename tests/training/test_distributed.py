"""Data parallel training under torchrun (2 CPU processes, gloo): the same steps as one process with the global
batch, rank 0 alone writes, one process without torchrun's variables, all ranks stop on one rank's SIGTERM."""
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
from safetensors.torch import load_file

from turbotune.cli.train import run_training
from turbotune.training.checkpoints import latest_checkpoint
from turbotune.training.config import TrainConfig

# 10 rows, 2 per rank × 2 ranks: each epoch's third global micro-batch holds 2 rows, all on rank 0, none on rank 1.
ROWS = [{"instruction": f"Describe item {i}.", "output": f"Item {i} is light, warm and built to last."}
        for i in range(10)]
COMMON = dict(grad_accum=2, max_seq_length=64, lora_r=4, lr=5e-3, warmup_steps=1, seed=11, logging_steps=1,
              save_steps=2, gradient_checkpointing=False)
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Each rank records its pid, and every write it makes under the output folder (Python's audit events).
ENTRY = """
import os, sys, json, atexit
OUT, REC = os.path.realpath({out!r}), {rec!r}
rank = os.environ["RANK"]
with open(os.path.join(REC, "pid-" + rank), "w") as f:
    f.write(str(os.getpid()))
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def under_out(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(OUT)
    except (TypeError, ValueError):
        return False

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writing and under_out(path):
            writes.append([event, os.fsdecode(path)])
    elif event == "os.rename" and (under_out(args[0]) or under_out(args[1])):  # os.replace too
        writes.append([event, os.fsdecode(args[1])])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") and under_out(args[0]):
        writes.append([event, os.fsdecode(args[0])])

def dump():
    with open(os.path.join(REC, "writes-" + rank + ".json"), "w") as f:
        json.dump(writes, f)

atexit.register(dump)
sys.addaudithook(hook)
from turbotune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("ddp-data") / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return f


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TRITON_INTERPRET")}
    return dict(env, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _torchrun(tiny_dir, data_file, tmp, max_steps, extra=(), **popen):
    """torchrun with 2 ranks of `turbotune train` (2 per micro-batch per rank) and `extra` flags; returns
    (Popen, out, rec)."""
    out, rec = tmp / "run", tmp / "rec"
    rec.mkdir()
    script = tmp / "entry.py"
    script.write_text(textwrap.dedent(ENTRY.format(out=str(out), rec=str(rec))))
    args = ["train", "--model", str(tiny_dir), "--data", str(data_file), "--output-dir", str(out),
            "--batch-size", "2", "--grad-accum", "2", "--max-seq-length", "64", "--lora-r", "4", "--lr", "5e-3",
            "--warmup-steps", "1", "--seed", "11", "--logging-steps", "1", "--save-steps", "2",
            "--max-steps", str(max_steps), "--no-gradient-checkpointing", *extra]
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), *args]
    return subprocess.Popen(cmd, env=_env(), text=True, **popen), out, rec


def _history(out):
    return json.loads((Path(out) / "training_log.json").read_text())["history"]


def finished_run(tiny_dir, data_file, tmp, max_steps, extra=()):
    """`_torchrun` to its end, which must be a success: (out, rec, rank 0's stdout)."""
    t0 = time.perf_counter()
    proc, out, rec = _torchrun(tiny_dir, data_file, tmp, max_steps, extra, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    print(f"torchrun {' '.join(extra)}, 2 ranks, {max_steps} steps: {time.perf_counter() - t0:.1f} s")
    return out, rec, stdout


@pytest.fixture(scope="module")
def ddp_run(tiny_llama_dir, data_file, tmp_path_factory):
    return finished_run(tiny_llama_dir, data_file, tmp_path_factory.mktemp("ddp"), 4)


@pytest.fixture(scope="module")
def single_run(tiny_llama_dir, data_file, tmp_path_factory):
    """One process, 4 per micro-batch: the same global batch as 2 ranks × 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = TrainConfig(model=str(tiny_llama_dir), data=str(data_file), output_dir=str(out), batch_size=4,
                      max_steps=4, **COMMON)
    result, _, _ = run_training(cfg, progress=False)
    assert not torch.distributed.is_initialized()
    return out, result


def assert_same_run(got_out, single_out):
    """Per-step losses, epochs and final LoRA weights (fp32) of a 4-step run equal the single process's."""
    got, single = _history(got_out), _history(single_out)
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    torch.testing.assert_close([h["loss"] for h in got], [h["loss"] for h in single], rtol=1e-5, atol=0)
    assert [h["epoch"] for h in got] == [h["epoch"] for h in single]
    theirs = load_file(str(got_out / "last_checkpoint" / "adapter_model.safetensors"))
    ours = load_file(str(single_out / "last_checkpoint" / "adapter_model.safetensors"))
    assert theirs.keys() == ours.keys() and len(ours) > 0
    for name, w in ours.items():
        torch.testing.assert_close(theirs[name], w, rtol=1e-5, atol=1e-7, msg=name)


def test_two_ranks_equal_one_process_with_the_global_batch(ddp_run, single_run):
    assert_same_run(ddp_run[0], single_run[0])


def test_only_rank_0_writes_the_output_folder(ddp_run):
    out, rec, stdout = ddp_run
    rank0 = json.loads((rec / "writes-0.json").read_text())
    rank1 = json.loads((rec / "writes-1.json").read_text())
    assert rank1 == []
    written = {Path(p).name for _, p in rank0}
    assert {"run_config.json", "training_log.json", "loss.png"} <= written  # the hook sees rank 0's writes
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "last_checkpoint", "loss.png",
                                                      "run_config.json", "training_log.json"]
    assert stdout.count("Step |") == 1  # one log table: rank 0's


def test_without_torchrun_variables_one_process_as_before(tiny_llama_dir, tmp_path, monkeypatch):
    """No process group; micro-batches are the single process's slices of the seeded permutation."""
    from turbotune import FastModel
    from turbotune.data.dataset import prepare_dataset
    from turbotune.training.trainer import Trainer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, verbose=False)
    data, _ = prepare_dataset(ROWS, tok, max_seq_length=64)
    cfg = TrainConfig(output_dir=str(tmp_path / "one"), batch_size=3, grad_accum=1, max_steps=2, seed=5)
    t = Trainer(cfg, model, tok, data, progress=False)
    assert (t.world.size, t.world.rank, t.world.enabled) == (1, 0, False)
    assert t.n_micro == 4
    for index in (0, 3, 5):  # the epoch's last micro-batch is short: 10 = 3 + 3 + 3 + 1
        epoch, pos = divmod(index, 4)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        expected = t.collate([data[i] for i in perm[pos * 3:(pos + 1) * 3]])
        got = t._micro_batch(index)
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
    result = t.train()
    assert result.steps == 2 and not torch.distributed.is_initialized()


def test_sigterm_to_one_rank_stops_every_rank(tiny_llama_dir, data_file, tmp_path):
    proc, out, rec = _torchrun(tiny_llama_dir, data_file, tmp_path, 40, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    for line in proc.stdout:  # rank 0 logs; once step 2 is in, SIGTERM rank 1 alone
        if line.strip().startswith("2 |"):
            os.kill(int((rec / "pid-1").read_text()), signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    last = latest_checkpoint(out)
    stopped = int(last.name.split("-")[1])
    assert 2 <= stopped < 40
    # both ranks stopped after the same step, each by itself (torchrun prints both ranks' stderr)
    assert stderr.count(f"SIGTERM: stopped at step {stopped} of 40; checkpoint saved to {last}") == 2, stderr[-3000:]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == stopped
    assert load_file(str(last / "adapter_model.safetensors"))
    assert [h["step"] for h in _history(out)][-1] == stopped
    for rank in ("0", "1"):  # both ranks ended (by themselves: each wrote its record at exit)
        assert (rec / f"writes-{rank}.json").is_file()
    assert json.loads((rec / "writes-1.json").read_text()) == []


@pytest.mark.parametrize("world_size,batch", [(2, 2), (3, 1), (4, 3)])
def test_ranks_share_each_global_micro_batch_without_duplicates(world_size, batch):
    from turbotune.training.distributed import World

    order = list(range(23))
    n_micro = -(-len(order) // (world_size * batch))
    for pos in range(n_micro):
        parts = [World(r, world_size).rows_of(order, pos, batch) for r in range(world_size)]
        assert sum(parts, []) == World().rows_of(order, pos, world_size * batch)  # the single process's batch


def test_resume_a_two_rank_run_in_one_process(ddp_run, single_run, tiny_llama_dir, data_file, tmp_path):
    """The 2-rank run's checkpoint at step 2 resumed by one process with the same global batch (4 per micro-batch
    instead of 2 per rank): steps 3 and 4 are those of the process that trained all 4 steps alone (data order,
    optimizer and scheduler state carried over; the world size recorded in the checkpoint)."""
    import shutil

    ddp_out, _, _ = ddp_run
    single_out, _ = single_run
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_out, resumed)
    shutil.rmtree(resumed / "last_checkpoint")  # the run as it stood after step 2's checkpoint
    (resumed / "training_log.json").unlink()
    assert json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2
    run_training(TrainConfig(model=str(tiny_llama_dir), data=str(data_file), output_dir=str(resumed), resume=True,
                             batch_size=4, max_steps=4, **COMMON), progress=False)
    got, want = _history(resumed), _history(single_out)
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    torch.testing.assert_close([h["loss"] for h in got], [h["loss"] for h in want], rtol=1e-5, atol=0)
