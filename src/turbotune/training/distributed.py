"""Data parallel training under torchrun: `torchrun --nproc-per-node N -m turbotune train ...`.

Every rank loads and patches its own copy of the model with the same seed (the trainable LoRA tensors are
also broadcast from rank 0 once, so they start equal even if a seed was missed), trains on its own part of
the data, and the ranks add their LoRA gradients together once per optimizer step. Without torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) `init_from_env` returns a one-process
`World` whose methods do nothing, and the Trainer runs exactly as it did before this module.

Where the reduction happens — our own bucketed `all_reduce` after the last micro-step, not
`torch.nn.parallel.DistributedDataParallel`:
  - The Trainer's micro-step may be one CUDA graph (cuda_graphs.GraphedMicroStep) holding forward and
    backward. DDP reduces from autograd hooks *inside* backward, so its collectives and its host-side
    bookkeeping (bucket readiness, `no_sync` flags) would be recorded into, or break, that graph. Reducing
    after the micro-steps keeps the graph per rank as it is: the gradients it accumulates into (in place, at
    fixed addresses) are summed in place afterwards, outside any graph.
  - Accumulation then communicates once per optimizer step by construction: no `no_sync` to get right.
  - What DDP would add is overlap of communication with the last backward. For LoRA the reduced tensors are
    a few MiB, one bucketed all-reduce per step (launched asynchronously, bucket by bucket) costs little
    next to a step of forward and backward passes over the whole model.
  - A rank with nothing left to train on (the epoch's last, short global micro-batch) simply skips the
    micro-step; under DDP every rank must run every backward or the others wait forever.

Sharding: the data order is the single process's order (seed, epoch permutation). Global micro-batch `m`
holds the units `perm[m·B·N : (m+1)·B·N]` (B = --batch-size per rank, N = ranks); rank r takes the slice
`[(m·N + r)·B, (m·N + r + 1)·B)`. So N ranks × B × grad_accum trains on exactly the samples, step by step,
of one process with --batch-size N·B and the same --grad-accum, with no sample on two ranks; an epoch has
ceil(units / (N·B)) global micro-batches, as that single process's has.

Loss normalisation: each micro-batch's loss is its summed token loss divided by `num_items_in_batch`; the
count is all-reduced before the first micro-step, so every rank divides by the global number of target
tokens of the step. Gradients are therefore *summed* over ranks (not averaged), and the step's loss is the
sum of the ranks' partial losses: both equal the single process's exactly, up to float summation order.

Rank 0 alone writes the output folder (run_config.json, checkpoints, the log, the plot) through
`run_on_main`, which also makes every rank wait for the write and fail together if it fails. Stopping:
the loss is reduced, so a non-finite loss stops or skips on every rank; a signal on any rank is shared
by `agree_on_stop` after each step, so all ranks stop after the same step, once rank 0 has saved.

With --fsdp the ranks shard the model instead of each holding a copy (FSDP2, training/fsdp.py); the data order,
the loss normalisation, the writes and the stopping above stay as they are.
"""
from __future__ import annotations

import atexit
import os

import torch

from turbotune.planner.parallel import BUCKET_BYTES, bucket_indices  # the planner predicts these buckets too

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# `accelerate launch --multi_gpu` runs torchrun, whose variables are above. `accelerate launch --cpu` with more than
# one process starts them through mpirun (--mpirun_hostfile): each gets accelerate's MASTER_ADDR / MASTER_PORT and
# the MPI launcher's names for the rest (Open MPI, Intel MPI and MPICH, MVAPICH), which torch's env:// does not read.
MPI_ENV = {"RANK": ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"),
           "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"),
           "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")}


def launch_env(env=None) -> dict:
    """This process's rank variables under torchrun's names: torchrun's own, else an MPI launcher's next to
    MASTER_ADDR / MASTER_PORT; {} when neither launcher started it."""
    env = os.environ if env is None else env
    if all(k in env for k in TORCHRUN_ENV):
        return {k: env[k] for k in TORCHRUN_ENV}
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return {}
    found = {k: next((env[n] for n in names if n in env), None) for k, names in MPI_ENV.items()}
    if None in found.values():
        return {}
    return {**found, "MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env["MASTER_PORT"]}


def launched_by_torchrun(env=None) -> bool:
    """torchrun (or another launcher: accelerate launch, mpirun) started this process as one of several."""
    found = launch_env(env)
    return bool(found) and int(found["WORLD_SIZE"]) > 1


def init_from_env(device: torch.device | None = None) -> "World":
    """The World of this process: an existing process group, a new one from torchrun's variables (gloo for a
    CPU model, nccl for a GPU one; on GPUs this process's device becomes cuda:LOCAL_RANK), or one process.
    Call it before the model is loaded so each rank loads onto its own GPU (cli/train.py does)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return World()
    if not dist.is_available():
        from turbotune.errors import ConfigError
        raise ConfigError("started by torchrun, but this PyTorch build has no torch.distributed")
    os.environ.update(launch_env())  # an MPI launcher's ranks under the names env:// reads
    local = int(os.environ["LOCAL_RANK"])
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_gpu else "gloo")  # env:// reads RANK, WORLD_SIZE, MASTER_ADDR/PORT
    atexit.register(_destroy)
    return World(dist.get_rank(), dist.get_world_size(), local)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class World:
    """This process's place among the ranks; with size 1 every method is the single process's no-op."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # ----- data -----
    def rows_of(self, order: list, pos: int, batch_size: int) -> list:
        """This rank's part of global micro-batch `pos` of an epoch's `order` (see the module docstring); empty
        for a rank past the end of the epoch's last, short micro-batch."""
        start = (pos * self.size + self.rank) * batch_size
        return order[start:start + batch_size]

    def quiet(self, stream):
        """`stream` on rank 0; a sink on the others, so only rank 0 logs."""
        if self.is_main:
            return stream
        return open(os.devnull, "w")  # noqa: SIM115 - lives as long as the trainer

    # ----- collectives -----
    def global_count(self, n: int, device) -> int:
        """The sum of `n` over the ranks (the step's target tokens: num_items_in_batch)."""
        if not self.enabled:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def broadcast_(self, params) -> None:
        """Rank 0's values of `params` on every rank (in place)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for bucket in _buckets([p.data for p in params]):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.broadcast(flat, 0)
            for t, v in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t.copy_(v)

    def reduce_step(self, params, loss, tokens: int, grads: bool = True) -> tuple[float, int]:
        """After the step's last micro-step: sum every trainable gradient, the loss (None: this rank had no
        micro-batch) and the token count over the ranks. Gradients are summed in place, so buffers a CUDA
        graph owns keep their addresses; a parameter no rank gave a gradient keeps `grad=None`.
        grads=False: the loss and the count only (under FSDP2 its reduce-scatter has summed the gradients)."""
        if not self.enabled:
            return float(loss), tokens
        import torch.distributed as dist

        device = params[0].device
        if not grads:
            params = []
        present = [p.grad is not None for p in params]
        scalars = torch.tensor([0.0, float(tokens), *map(float, present)], dtype=torch.float64, device=device)
        if loss is not None:
            scalars[0] = loss.detach().to(torch.float64)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        pending = [(dist.all_reduce(scalars, async_op=True), None, None)]
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            if flat is not None:
                for g, v in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    g.copy_(v)
        anywhere = scalars[2:].tolist()
        for p, g, had, got in zip(params, grads, present, anywhere):
            if not had and got > 0:
                p.grad = g
        return float(scalars[0]), int(round(float(scalars[1])))

    def agree_on_stop(self, signum: int | None) -> int | None:
        """The signal any rank received during the step (None if none did): every rank stops after the same step."""
        if not self.enabled:
            return signum
        import torch.distributed as dist

        t = torch.tensor([signum or 0], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def run_on_main(self, fn):
        """fn() on rank 0 only (a write to the output folder); every rank returns its result, or raises its
        error, after it finished — no rank goes on while rank 0 writes, none waits on a rank 0 that failed."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box, error = [None], None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - told to every rank, raised again below
                error = exc
                box[0] = ("error", (type(exc), str(exc), getattr(exc, "exit_code", None)))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        if error is not None:
            raise error
        raise _rebuild(*value)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rebuild(cls, message: str, exit_code):
    """Rank 0's error on another rank: the same turbotune error (the CLI prints it as rank 0 does)."""
    from turbotune.errors import TurbotuneError

    if isinstance(cls, type) and issubclass(cls, TurbotuneError):
        exc = cls(message)
        if exit_code is not None:
            exc.exit_code = exit_code
        return exc
    return RuntimeError(f"rank 0 failed: {cls.__name__}: {message}")


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, about BUCKET_BYTES each: one collective per bucket."""
    groups = bucket_indices([t.numel() * t.element_size() for t in tensors], [(t.dtype, t.device) for t in tensors],
                            limit=BUCKET_BYTES)
    return [[tensors[i] for i in group] for group in groups]
