"""What a run shows while it trains: the log table, the progress bar, the JSON log and the loss plot."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from turbotune.training.checkpoints import write_json_atomically


def memory_now() -> tuple[str, float]:
    """(label, GiB): peak GPU memory allocated on a GPU, the process's resident memory on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "GPU Mem", torch.cuda.max_memory_allocated() / 2**30
    import psutil
    return "RSS", psutil.Process(os.getpid()).memory_info().rss / 2**30


class LogTable:
    COLUMNS = ("Step", "Loss", "Learning Rate", "Epoch", "{mem}", "tokens/s")
    WIDTHS = (7, 9, 14, 7, 10, 10)

    def __init__(self, stream=None, write=None):
        self.stream = stream or sys.stdout
        self._write = write  # tqdm.write when a progress bar is on screen
        self.header_done = False

    def _emit(self, line: str):
        if self._write:
            self._write(line)
        else:
            print(line, file=self.stream, flush=True)

    def row(self, step, loss, lr, epoch, tokens_per_s):
        label, mem = memory_now()
        if not self.header_done:
            cols = [c.format(mem=label) for c in self.COLUMNS]
            self._emit(" | ".join(c.rjust(w) for c, w in zip(cols, self.WIDTHS)))
            self._emit("-+-".join("-" * w for w in self.WIDTHS))
            self.header_done = True
        cells = (f"{step}", f"{loss:.4f}", f"{lr:.3e}", f"{epoch:.2f}", f"{mem:.2f} GiB", f"{tokens_per_s:,.0f}")
        self._emit(" | ".join(c.rjust(w) for c, w in zip(cells, self.WIDTHS)))
        return {"step": step, "loss": loss, "learning_rate": lr, "epoch": epoch, "memory_gib": mem,
                "memory_kind": label, "tokens_per_s": tokens_per_s}


def write_log(output_dir, history: list[dict], summary: dict | None = None) -> Path:
    path = Path(output_dir) / "training_log.json"
    write_json_atomically(path, {"history": history, "summary": summary or {}})
    return path


def reward_series(history: list[dict]) -> tuple[list, list]:
    """(steps, mean rewards) of the logged steps that have a reward (TRL's GRPO logs `reward`)."""
    pairs = [(h["step"], h["reward"]) for h in history if isinstance(h.get("reward"), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_losses(output_dir, history: list[dict], title: str = "training loss") -> Path | None:
    """loss.png in the output dir (with the mean reward on a second axis where the steps log one); returns None
    (with a note) when matplotlib is not installed."""
    if not history:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[turbotune] matplotlib is not installed: no loss plot (pip install matplotlib)", file=sys.stderr)
        return None
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, marker="o" if len(steps) < 60 else None, linewidth=1.5, markersize=3, label="loss")
    if len(losses) >= 8:
        k = max(2, len(losses) // 10)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, linewidth=2.2, alpha=0.8, label=f"mean of last {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    reward_steps, rewards = reward_series(history)
    if rewards:  # GRPO: its loss sits near 0 by construction, the mean reward is what shows learning
        right = ax.twinx()
        right.plot(reward_steps, rewards, color="tab:green", linewidth=1.5, label="mean reward")
        right.set_ylabel("mean reward")
        right.legend(loc="upper right")
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    tmp = path.with_name(".loss.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
