"""`accelerate launch ... -m turbotune train` on 2 CPU processes: the steps of one process with the global batch
(as under torchrun, test_distributed.py), and rank 0 alone writes.

accelerate 1.x has two ways to start 2 processes here: `--multi_gpu` runs torchrun (torchrun's variables), and
`--cpu` with `--mpirun_hostfile` runs mpirun, whose ranks get MPI's variables and accelerate's MASTER_ADDR/PORT
(training/distributed.py reads both). `--cpu` without a hostfile starts one process. This machine has no MPI: a
stand-in mpirun (Open MPI's flags and variables) starts the copies.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_distributed as ddp

from turbotune.training.distributed import launch_env, launched_by_torchrun

# the DDP test's data file and its one-process run with the global batch (4 per micro-batch = 2 ranks x 2)
data_file, single_run = ddp.data_file, ddp.single_run
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed")

# Every Python process started with this folder first on PYTHONPATH records, once it knows its rank (turbotune
# sets RANK from MPI's variables), each write it made under the output folder.
SITECUSTOMIZE = """
import atexit, json, os, sys
OUT, REC = os.path.realpath({out!r}), {rec!r}
writes = []

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and os.path.realpath(os.fsdecode(path)).startswith(OUT):
            writes.append(os.fsdecode(path))
    elif event == "os.rename" and os.path.realpath(os.fsdecode(args[1])).startswith(OUT):
        writes.append(os.fsdecode(args[1]))

def dump():
    rank = os.environ.get("RANK")
    if rank is not None:
        with open(os.path.join(REC, "writes-" + rank + ".json"), "w") as f:
            json.dump(writes, f)

atexit.register(dump)
sys.addaudithook(hook)
"""

# Open MPI's mpirun as accelerate calls it: `--version`, then `--hostfile F --npernode K -n N --bind-to X cmd...`
FAKE_MPIRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("mpirun (Open MPI) 4.1.6")
    sys.exit(0)
opts = {{}}
while args and args[0].startswith("-"):
    opts[args[0]], args = args[1], args[2:]
n = int(opts["-n"])
procs = [subprocess.Popen(args, env=dict(os.environ, OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE=str(n),
                                         OMPI_COMM_WORLD_LOCAL_RANK=str(r), OMPI_COMM_WORLD_LOCAL_SIZE=str(n)))
         for r in range(n)]
sys.exit(max(p.wait() for p in procs))
"""

TRAIN = ["--batch-size", "2", "--grad-accum", "2", "--max-seq-length", "64", "--lora-r", "4", "--lr", "5e-3",
         "--warmup-steps", "1", "--seed", "11", "--logging-steps", "1", "--save-steps", "2", "--max-steps", "4",
         "--no-gradient-checkpointing"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_run(tiny_dir, data_file, tmp: Path, launch: list[str]):
    """`accelerate launch <launch> -m turbotune train ...` to its end: (out, rec, stdout)."""
    out, rec, site, bin_dir = tmp / "run", tmp / "rec", tmp / "site", tmp / "bin"
    for d in (rec, site, bin_dir):
        d.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE.format(out=str(out), rec=str(rec))))
    mpirun = bin_dir / "mpirun"
    mpirun.write_text(FAKE_MPIRUN.format(python=sys.executable))
    mpirun.chmod(0o755)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(ddp._env(), PYTHONPATH=os.pathsep.join([str(site), src, os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
               HF_HOME=str(tmp / "hf-home"),  # accelerate reads no default config from the user's cache
               CUDA_VISIBLE_DEVICES="")  # CPU ranks (gloo) even on a GPU machine: the one-process run is on CPU
    cmd = [ACCELERATE, "launch", *launch, "-m", "turbotune", "train", "--model", str(tiny_dir), "--data",
           str(data_file), "--output-dir", str(out), *TRAIN]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"accelerate launch {' '.join(launch)}: {time.perf_counter() - t0:.1f} s")
    return out, rec, proc.stdout


def assert_two_ranks_rank_0_writes(run, single_run):
    out, rec, stdout = run
    ddp.assert_same_run(out, single_run[0])  # the data split over 2 ranks, gradients summed
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in rec.iterdir()) == ["writes-0.json", "writes-1.json"]
    assert json.loads((rec / "writes-1.json").read_text()) == []
    assert {"run_config.json", "training_log.json"} <= {Path(p).name for p in json.loads((rec / "writes-0.json")
                                                                                         .read_text())}
    assert stdout.count("Step |") == 1  # one log table: rank 0's


def test_accelerate_multi_gpu_launch_runs_torchrun_ranks(tiny_llama_dir, data_file, single_run, tmp_path):
    run = accelerate_run(tiny_llama_dir, data_file, tmp_path, ["--multi_gpu", "--num_processes", "2",
                                                                "--num_machines", "1", "--mixed_precision", "no",
                                                                "--dynamo_backend", "no", "--main_process_port", "0"])
    assert_two_ranks_rank_0_writes(run, single_run)


def test_accelerate_cpu_launch_through_mpirun(tiny_llama_dir, data_file, single_run, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = accelerate_run(tiny_llama_dir, data_file, tmp_path, [
        "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--mpirun_hostfile", str(hostfile), "--main_process_port", str(_free_port())])
    assert_two_ranks_rank_0_writes(run, single_run)


def test_mpi_variables_read_as_torchrun_names():
    """Open MPI's, Intel MPI's and MVAPICH's names next to MASTER_ADDR/PORT; torchrun's own take precedence; MPI's
    alone (no rendezvous address) or one process are no launch."""
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    intel = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}
    assert launch_env({**ompi, **master}) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **master}
    assert launch_env({**intel, **master})["RANK"] == "3" and launched_by_torchrun({**intel, **master})
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **master}
    assert launch_env({**torchrun, **ompi}) == torchrun
    assert launch_env(ompi) == {} and not launched_by_torchrun(ompi)
    assert not launched_by_torchrun({**master, "PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0"})
    assert not launched_by_torchrun(master)  # `accelerate launch --cpu` without mpirun: one process
