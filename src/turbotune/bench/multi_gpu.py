"""`turbotune bench --gpus N`: each method on 1 GPU and on N (data parallel), tokens/s, memory and scaling.

For each method the parent (harness.run_bench) starts two runs, one after the other, each its own process group:
`python -m torch.distributed.run --standalone --nproc-per-node K -m turbotune.bench.multi_gpu --spec S`, K = 1
and K = N. Every rank trains the bench's workload with its own micro-batches of the usual size (so the N-rank
step's global batch is N times the 1-rank one's) and writes its result JSON; `combine` makes one row of them:
tokens/s of all ranks together, peak memory of the largest rank, the losses of rank 0 (whose batches are the
1-rank run's; rank r draws its batches from seed + r).

How the ranks meet (PyTorch's and turbotune's own code, none here):
  hf                 torch.nn.parallel.DistributedDataParallel, no_sync on every micro-step but the step's last
  turbotune methods  `turbotune train`'s DDP (training/distributed.py): one bucketed all-reduce of the LoRA
                     gradients after the step's last micro-step, which keeps the CUDA graphs of the micro-step
  --parallel fsdp    training/fsdp.py's ShardedModel (FSDP2 fully_shard per decoder layer and the root) for
                     both; CUDA graphs off, as `turbotune train --fsdp` has them
turbotune's reductions sum the gradients; they are divided by N afterwards, so every method steps on the mean
over the ranks, as DDP's does. The 1-rank run is one plain process (no process group, nothing wrapped): the
baseline the scaling efficiency, tokens/s(N) / (N x tokens/s(1)), is quoted against.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from turbotune.bench.presets import BenchError

PARALLEL_METHODS = ("hf", "turbotune", "turbotune-auto", "turbotune-min-memory", "turbotune-bf16")


# ----------------------------------------------------------------------------------------------------------
# Parent side: checks, launch, combine
# ----------------------------------------------------------------------------------------------------------
def add_gpus_arguments(parser) -> None:
    g = parser.add_argument_group("more than one GPU (--gpus)")
    g.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="each method on 1 GPU and on N (N >= 2) in one run, each rank the same micro-batch (the "
                        "N-GPU global batch is N x larger): tokens/s of all ranks, peak memory per GPU and the "
                        "scaling efficiency; with --device cpu the ranks run on the CPU (gloo)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="with --gpus: ddp (a whole model per GPU, the default) or fsdp (FSDP2, the model sharded)")


def check_gpus(args) -> None:
    """--gpus / --parallel usage and, off --device cpu, the GPUs to run on; raises BenchError before any load."""
    if args.gpus is None:
        if args.parallel:
            raise BenchError("--parallel goes with --gpus N")
        return
    if args.gpus < 2:
        raise BenchError("--gpus N compares 1 GPU with N: N must be at least 2")
    for flag, on in (("--max-context", args.max_context), ("--packing", args.packing),
                     (f"--trainer {args.trainer}", args.trainer != "loop"), ("--profile", args.profile)):
        if on:
            raise BenchError(f"--gpus measures the throughput run; run {flag} without --gpus")
    if args.device == "cpu":  # the ranks run on the CPU (gloo): no GPU needed
        return
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen < args.gpus:
        raise BenchError(f"--gpus {args.gpus} needs {args.gpus} CUDA GPUs, but torch sees {seen} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a "
                         "machine with that many, or pass --device cpu to run the ranks on the CPU (gloo)")


def not_parallel(method: str, args) -> str | None:
    """Why `method` gets no --gpus rows (None: it runs)."""
    if method not in PARALLEL_METHODS:
        return (f"not run with --gpus: the multi-GPU rows are {', '.join(PARALLEL_METHODS)} (hf under torch DDP, "
                "turbotune's methods under turbotune's DDP or FSDP2)")
    if (args.parallel or "ddp") == "fsdp" and args.qlora and method != "turbotune-bf16":
        from turbotune.model.quant import NF4_NOT_SHARDABLE
        return f"--parallel fsdp with a 4-bit base: {NF4_NOT_SHARDABLE}"
    return None


def add_gpus_header(header: dict, args) -> None:
    """The header's --gpus keys (report.format_header prints them)."""
    wl = header["workload"]
    header["gpus"] = {"count": args.gpus, "parallel": args.parallel or "ddp",
                      "sequences_per_step": {"1": wl["micro_batch"] * wl["grad_accum"],
                                             str(args.gpus): args.gpus * wl["micro_batch"] * wl["grad_accum"]}}


def torchrun_command(ranks: int):
    """run_worker's command for one run of `ranks` processes (torchrun picks a free port: --standalone)."""
    def command(method: str, spec_path: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "-m", "turbotune.bench.multi_gpu", "--spec", spec_path]
    return command


def rank_result_path(path: str, rank: int) -> str:
    """Rank 0 writes the path run_worker reads; rank r beside it."""
    return path if rank == 0 else str(Path(path).with_suffix(f".rank{rank}.json"))


def run_scaling(args, methods: list[tuple[str, str | None]], spec: dict) -> list[dict]:
    """Each runnable method on 1 rank, then on args.gpus ranks: one combined row per run."""
    from turbotune.bench.harness import _log, run_worker

    parallel = args.parallel or "ddp"
    results = []
    with tempfile.TemporaryDirectory(prefix="turbotune-bench-gpus-") as tmp:
        for method, why in methods:
            why = why or not_parallel(method, args)
            if why is not None:
                _log(f"{method}: skipped ({why})")
                results.append({"method": method, "status": "skipped", "reason": why, "losses": [],
                                "step_times_s": []})
                continue
            for ranks in (1, args.gpus):
                workdir = Path(tmp) / f"{method}-{ranks}"
                workdir.mkdir()
                _log(f"{method} on {ranks} rank{'s' if ranks > 1 else ''}: starting torchrun")
                rank0 = run_worker(method, dict(spec, parallel=parallel), workdir, args.timeout,
                                   command=torchrun_command(ranks))
                results.append(combine(rank0, workdir, ranks, parallel))
                r = results[-1]
                _log(f"{method} on {ranks}: {r['status']}"
                     + ("" if r["status"] == "ok" else f" — {r.get('error') or r.get('reason')}"))
    return results


def _read_rank(rank0: dict, workdir: Path, rank: int) -> dict:
    if rank == 0:
        return rank0
    path = Path(rank_result_path(str(workdir / f"{rank0['method']}.result.json"), rank))
    if path.is_file():
        return json.loads(path.read_text())
    return {"status": "failed", "error": "no result (stopped when another rank failed, or killed)"}


RANK_KEYS = ("status", "device_name", "peak_alloc_bytes", "peak_reserved_bytes", "peak_rss_bytes", "tokens_per_step",
             "tokens", "losses", "step_times_s", "error")
MAX_KEYS = ("peak_alloc_bytes", "peak_reserved_bytes", "peak_rss_bytes", "load_peak_alloc_bytes",
            "load_peak_reserved_bytes")


def _torchrun_reason(rank0: dict) -> str:
    """run_worker's error for a run no rank reported on ("timed out ..."), or, where that is the closing rule of
    torchrun's failure summary, the summary's exit code line."""
    error = rank0.get("error") or ""
    if rank0.get("status") != "ok" and any(c.isalnum() for c in error.split("]", 1)[-1]):
        return error
    codes = [ln.split("]", 1)[-1].strip() for ln in rank0.get("output_tail", []) if "exitcode" in ln]
    return f"a rank ended without a result (torchrun: {codes[-1] if codes else 'no exit code shown'})"


def combine(rank0: dict, workdir: Path, ranks: int, parallel: str) -> dict:
    """One row of a run's rank results: rank 0's losses and notes, every rank's step time (each step the slowest
    rank's), tokens summed, peak memory the largest; the first rank's own error if any failed."""
    per_rank = [_read_rank(rank0, workdir, r) for r in range(ranks)]
    row = dict(rank0, gpus=ranks, parallel=parallel if ranks > 1 else None)
    row["ranks"] = [{"rank": r, **{k: res[k] for k in RANK_KEYS if res.get(k) is not None}}
                    for r, res in enumerate(per_rank)]
    bad = [(r, res) for r, res in enumerate(per_rank) if res.get("status") != "ok"]
    if bad:
        # the first rank to fail: the others' errors follow from it (a gloo/NCCL peer gone); a rank's own report
        # (it wrote its result, with a phase) before one built from torchrun's output
        own = sorted((res.get("end_time", 0), r) for r, res in bad if "phase" in res)
        if not own:  # no rank wrote a result: timed out, or killed
            row.update(status="failed", error=_torchrun_reason(rank0))
            return row
        res = per_rank[own[0][1]]
        if res.get("status") == "skipped":
            row.update(status="skipped", reason=res.get("reason"))
        else:
            row.update(status="failed", error=f"rank {own[0][1]} of {ranks}: {res.get('error')}")
        return row
    row["step_times_s"] = [max(ts) for ts in zip(*(res["step_times_s"] for res in per_rank))]
    row["tokens_per_step"] = sum(res["tokens_per_step"] for res in per_rank)
    row["tokens"] = sum(res["tokens"] for res in per_rank)
    for key in MAX_KEYS:
        values = [res[key] for res in per_rank if res.get(key) is not None]
        if values:
            row[key] = max(values)
    return row


# ----------------------------------------------------------------------------------------------------------
# Rank side: `python -m torch.distributed.run ... -m turbotune.bench.multi_gpu --spec S`
# ----------------------------------------------------------------------------------------------------------
class _Sync:
    """How this rank's gradients meet the other ranks': torch DDP (ddp), turbotune's all-reduce (world), FSDP2
    (sharded), or not at all (one rank)."""

    def __init__(self, world, ddp=None, sharded=None):
        self.world, self.ddp, self.sharded = world, ddp, sharded

    def micro_step(self, last: bool):
        """The context of one micro-step: only the step's last one communicates."""
        if self.sharded is not None:
            self.sharded.gradient_sync(last)
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def finish(self, params, loss, tokens: int) -> None:
        """After the step's micro-steps: turbotune's sum over the ranks (DDP), then the mean (torch DDP's is one)."""
        if not self.world.enabled or self.ddp is not None:
            return
        if self.sharded is None:
            self.world.reduce_step(params, loss, tokens)
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.world.size)  # in place: CUDA graphs accumulate into these tensors


def _parallel_model(model, spec: dict, world, parallel: str):
    """(the model to train, its _Sync, a note for the table)."""
    if not world.enabled:
        return model, _Sync(world), "1 process: no process group"
    if parallel == "fsdp":
        from turbotune.training.fsdp import ShardedModel
        sharded = ShardedModel(model)
        return model, _Sync(world, sharded=sharded), sharded.line().replace("this rank", "rank 0")
    if spec["method"] == "hf":
        import torch
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if spec["device"] == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        return ddp, _Sync(world, ddp=ddp), f"torch DDP over {world.size} ranks"
    return model, _Sync(world), f"turbotune's DDP over {world.size} ranks (training/distributed.py)"


def train_ranks(model, spec: dict, result: dict, world, parallel: str) -> None:
    """worker.train for one rank: the same steps, timed, with the gradients shared as _parallel_model says."""
    import torch

    from turbotune.bench.worker import _log, _record_graphs_and_memory, _setup_loop

    notes = list(model.__dict__.get("_bench_notes", []))
    model, sync, how = _parallel_model(model, spec, world, parallel)
    if sync.sharded is not None:
        spec = dict(spec, cuda_graphs=False)  # FSDP2 gathers and frees from module hooks a graph would skip
    # rank r's batches come from seed + r (the model, already loaded, is the same on every rank)
    loop, batches = _setup_loop(model, dict(spec, seed=spec["seed"] + world.rank), result)
    result["notes"] = notes + [how]
    if loop.cuda:
        result["load_peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
        result["load_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
    ga, per_micro = loop.ga, spec["micro_batch"] * spec["seq_len"]
    params = [p for g in loop.opt.param_groups for p in g["params"]]
    for step in range(spec["steps"]):
        loop.sync()
        t0 = time.perf_counter()
        total = None
        for j in range(ga):
            with sync.micro_step(j == ga - 1):
                loss = loop.forward_backward(batches[step * ga + j])
            total = loss if total is None else total + loss
        sync.finish(params, total, per_micro * ga)
        loop.opt.step()
        loop.zero_grad()
        loop.sync()
        result["step_times_s"].append(time.perf_counter() - t0)
        result["losses"].append(float(total.float().item()))
        if world.is_main:
            _log(spec["method"], f"{world.size} rank(s): step {step + 1}/{spec['steps']} loss "
                                 f"{result['losses'][-1]:.4f}  {result['step_times_s'][-1]:.3f} s")
    result["tokens_per_step"] = per_micro * ga
    result["tokens"] = per_micro * ga * spec["steps"]
    _record_graphs_and_memory(loop, spec, result)


def _die_with_torchrun() -> None:
    """torchrun starts each rank in a session of its own, so the harness's kill of torchrun's process group
    (timeout, Ctrl-C) would not reach the ranks: ask Linux to kill this rank when torchrun dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # torchrun died before the call above
        os._exit(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbotune.bench.multi_gpu",
                                     description="One rank of a `turbotune bench --gpus` run (started by torchrun).")
    parser.add_argument("--spec", required=True, help="JSON spec written by the parent")
    args = parser.parse_args(argv)
    _die_with_torchrun()
    spec = json.loads(Path(args.spec).read_text())
    import warnings

    import torch

    from turbotune.bench.worker import _last_line, run_spec
    from turbotune.training.distributed import init_from_env

    warnings.filterwarnings("ignore", message=r".*(gradient|activation)_checkpointing.*deprecated.*")
    try:
        world = init_from_env(torch.device(spec["device"]))  # gloo on the CPU, nccl (and cuda:LOCAL_RANK) on GPUs
        result = run_spec(spec, train_fn=lambda m, s, r: train_ranks(m, s, r, world, spec["parallel"]))
    except Exception as exc:  # the process group did not form: still a result the parent can show
        result = {"method": spec["method"], "status": "failed", "phase": "init", "error": _last_line(exc),
                  "losses": [], "step_times_s": []}
    rank = int(os.environ.get("RANK", "0"))
    result.update(rank=rank, end_time=time.time())  # the first rank to fail caused the others' failures
    path = rank_result_path(spec["result_path"], rank)
    Path(path + ".tmp").write_text(json.dumps(result, indent=1))
    os.replace(path + ".tmp", path)
    # a failed rank exits non-zero, so torchrun stops the others instead of leaving them in a collective
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the result is on disk: skip the interpreter's (and the process group's) slow teardown
