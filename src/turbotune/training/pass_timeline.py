"""Where the time of a replayed training pass goes on the device, measured without a profiler.

Why: under a Hugging Face trainer, a short optimizer step (a tutorial's 8 samples of ~300 tokens) costs a fixed
~44 ms on top of its tokens (bench/NOTES.md, twelfth session), and torch.profiler itself slows the host it is
measuring. CUDA events cost a few microseconds and never make the host wait: four per replayed pass (before and
after the forward replay, before and after the backward replay) split each pass into its forward, the gap until
its backward starts (the trainer's loss and TRL's metrics, which read values back), its backward, and the gap
until the next pass starts (clipping, the optimizer, logging, the next micro-batches' loading and padding
removal). The gaps are where the device waits for the host.

Off unless a caller sets `GraphedCall.timeline = PassTimeline()` (the bench does for its turbotune rows).
"""
from __future__ import annotations

import statistics

import torch


class PassTimeline:
    """CUDA events around each replayed pass; `summary()` reads them once training is over."""

    def __init__(self):
        self.passes: list[tuple[int, list]] = []  # (call number, events) per replayed pass

    def begin(self, call: int) -> list:
        """Events of a new pass, the first recorded now; `mark` adds the rest."""
        events: list = []
        self.passes.append((call, events))
        self.mark(events)
        return events

    @staticmethod
    def mark(events: list) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)

    def summary(self, skip_fraction: float = 0.5) -> dict | None:
        """Medians in ms over the later passes (the first `skip_fraction` left out: warm-up and captures):
        forward, forward_to_backward, backward, and to_next_pass where the next call replayed too; None when
        fewer than two whole passes were recorded."""
        torch.cuda.synchronize()
        whole = [(n, e) for n, e in self.passes if len(e) == 4]
        whole = whole[int(len(whole) * skip_fraction):]
        if len(whole) < 2:
            return None
        out = {"forward": [], "forward_to_backward": [], "backward": [], "to_next_pass": []}
        for i, (n, (f0, f1, b0, b1)) in enumerate(whole):
            out["forward"].append(f0.elapsed_time(f1))
            out["forward_to_backward"].append(f1.elapsed_time(b0))
            out["backward"].append(b0.elapsed_time(b1))
            if i + 1 < len(whole) and whole[i + 1][0] == n + 1:
                out["to_next_pass"].append(b1.elapsed_time(whole[i + 1][1][0]))
        summary = {k: statistics.median(v) for k, v in out.items() if v}
        summary["passes"] = len(whole)
        return summary


def timeline_line(summary: dict | None) -> str | None:
    """One line for a bench row's notes."""
    if not summary or "to_next_pass" not in summary:
        return None
    busy = summary["forward"] + summary["backward"]
    total = busy + summary["forward_to_backward"] + summary["to_next_pass"]
    return (f"replayed passes, medians of {summary['passes']}: forward {summary['forward']:.1f} ms, then "
            f"{summary['forward_to_backward']:.1f} ms until the backward, backward {summary['backward']:.1f} ms, "
            f"then {summary['to_next_pass']:.1f} ms until the next pass (graphs busy {busy / total:.0%})")
