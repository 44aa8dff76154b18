"""Where one benchmark step's time goes: `turbotune bench --profile DIR` (torch.profiler, one extra step).

After a method's timed steps, its worker runs one more optimizer step (the same micro-batches; under
`--trainer sft` one more step of the trainer's) under torch.profiler and writes DIR/profile-<method>.txt with:
  - the step's wall time and the GPU's busy time (the union of kernel intervals); the gap between them is time
    the device waited for the host (Python, autograd, launches), the first thing to know before tuning kernels;
  - the top ops by self device time and by self CPU time, and the top kernels by name.
The profiled step is not part of the timed figures (the profiler slows the host down).
"""
from __future__ import annotations

from pathlib import Path


def _busy_us(events) -> float:
    """Union length (µs) of device kernel intervals: time the GPU was doing something."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy


def _device_kernels(prof):
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


class StepProfile:
    """torch.profiler around one optimizer step, started and stopped by the caller (`start()`, `stop()`), so a
    trainer's callbacks can bracket a step they don't run themselves; `stop()` writes the report."""

    def __init__(self, method: str, out_dir: str, cuda: bool):
        self.method, self.out_dir, self.cuda = method, out_dir, cuda

    def start(self) -> None:
        import time

        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=acts, record_shapes=False)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self.t0) * 1e6
        self.prof.__exit__(None, None, None)
        return _report(self.prof, wall_us, self.method, self.out_dir, self.cuda)


def profile_step(run_step, method: str, out_dir: str, cuda: bool) -> dict:
    """Profile `run_step()` (one optimizer step, synchronised at the end); write the report; return figures."""
    step = StepProfile(method, out_dir, cuda)
    step.start()
    run_step()
    return step.stop()


def _report(prof, wall_us: float, method: str, out_dir: str, cuda: bool) -> dict:
    kernels = _device_kernels(prof) if cuda else []
    busy_us = _busy_us(kernels)
    figures = {"wall_ms": wall_us / 1e3, "gpu_busy_ms": busy_us / 1e3, "kernel_launches": len(kernels),
               "gpu_busy_fraction": busy_us / wall_us if wall_us else None}
    sort_dev = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ka = prof.key_averages()
    lines = [f"# {method}: one optimizer step under torch.profiler",
             (f"wall {figures['wall_ms']:.1f} ms, GPU busy {figures['gpu_busy_ms']:.1f} ms "
              f"({100 * (figures['gpu_busy_fraction'] or 0):.0f}%), {len(kernels)} kernels launched"), "",
             "## ops by self device time", ka.table(sort_by=sort_dev, row_limit=30, max_name_column_width=70), "",
             "## ops by self CPU time", ka.table(sort_by="self_cpu_time_total", row_limit=30,
                                                 max_name_column_width=70)]
    path = Path(out_dir) / f"profile-{method}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    figures["report"] = str(path)
    return figures
