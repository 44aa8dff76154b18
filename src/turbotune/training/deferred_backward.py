"""The last pass of an optimizer step launches its backward after the trainer's NaN check, not before it.

Why: under a Hugging Face trainer the device idles ~36–41 ms per replayed pass while the host runs the step's tail
(bench/NOTES.md, fourteenth session). The host can't start that tail while the backward runs: right after
`training_step` returns, transformers checks the returned loss for NaN/Inf, a read that waits for everything
queued on the device, the backward included (and it requires the loss on the training device, so the value can't
be handed over on the CPU instead). Deferred, the step's last backward is launched when the trainer first asks
for the gradients (`_clip_grad_norm`, else `_get_grad_norm`, which transformers' loop calls before every optimizer
step): the NaN check waits for the forward only (TRL's metrics have already waited for it), and clipping and the
optimizer are launched behind the backward while it runs. The same backward of the same loss runs, before anything
reads a gradient: the same gradients.

Only inside transformers' own training loop (a script that calls `training_step` itself gets its backward at
once), one process, and for the step's last pass (the CUDA graphs' memory pool holds one pass at a time, so a
pass's backward runs before the next pass's forward). On unless TURBOTUNE_DEFER_BACKWARD=0: measured on an H100
(fifteenth session, qwen2-1.5b QLoRA, mixed lengths under SFTTrainer), the device's idle gap after each replayed
pass fell from 20.5 to 8.2 ms and the steady steps gained 18% (21,807 -> 25,716 real tokens/s).
"""
from __future__ import annotations

import contextlib
import functools
import os

_PENDING = "_turbotune_pending_backward"
_IN_LOOP = "_turbotune_in_training_loop"
_FLUSHES = "_turbotune_flushes_deferred_backward"
launched = 0  # deferred backwards run so far (tests, the bench's notes)


def deferred_backward_enabled() -> bool:
    return os.environ.get("TURBOTUNE_DEFER_BACKWARD", "1") == "1"


def patch_trainer() -> None:
    """Wrap `Trainer._clip_grad_norm` and `_get_grad_norm` (run a deferred backward first) and
    `_inner_training_loop` (marks where deferring is safe); once, at class level."""
    from transformers import Trainer

    for name in ("_clip_grad_norm", "_get_grad_norm"):
        original = getattr(Trainer, name, None)
        if original is None or getattr(original, _FLUSHES, False):
            continue
        setattr(Trainer, name, _flushing(original))
    loop = getattr(Trainer, "_inner_training_loop", None)
    if loop is not None and not getattr(loop, _FLUSHES, False):
        setattr(Trainer, "_inner_training_loop", _marking_the_loop(loop))


def _flushing(original):
    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        flush(self)
        return original(self, *args, **kwargs)
    setattr(wrapped, _FLUSHES, True)
    return wrapped


def _marking_the_loop(original):
    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        outer = self.__dict__.get(_IN_LOOP, False)
        self.__dict__[_IN_LOOP] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            self.__dict__[_IN_LOOP] = outer
            if not outer:  # the loop ended between a training_step and its step's gradients (an exception): the
                self.__dict__.pop(_PENDING, None)  # step is abandoned, its backward must not reach a later one
    setattr(wrapped, _FLUSHES, True)
    return wrapped


def can_defer(trainer) -> bool:
    """Whether this trainer's step-closing pass may leave its backward for later."""
    if not deferred_backward_enabled() or not trainer.__dict__.get(_IN_LOOP, False):
        return False
    if not getattr(getattr(type(trainer), "_get_grad_norm", None), _FLUSHES, False):  # replaced by a subclass,
        # or a transformers without it: nothing would flush
        return False
    accelerator = trainer.accelerator
    optim = str(getattr(trainer.args, "optim", "")).lower()
    return getattr(accelerator, "num_processes", 1) == 1 and "lomo" not in optim


@contextlib.contextmanager
def deferring(trainer):
    """Within: the trainer's `accelerator.backward(loss, ...)` is recorded, to run at the next flush."""
    accelerator = trainer.accelerator
    own = accelerator.__dict__.get("backward")  # an instance attribute to put back, else the class's method
    real = accelerator.backward

    def record(loss, **kwargs):
        flush(trainer)  # one pending backward at most
        trainer.__dict__[_PENDING] = (real, loss, kwargs)
    accelerator.backward = record
    try:
        yield
    finally:
        if own is not None:
            accelerator.backward = own
        else:
            del accelerator.backward


def flush(trainer) -> None:
    """Run the deferred backward, if one is pending."""
    global launched
    pending = trainer.__dict__.pop(_PENDING, None)
    if pending is not None:
        backward, loss, kwargs = pending
        backward(loss, **kwargs)
        launched += 1
