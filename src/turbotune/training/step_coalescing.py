"""The micro-batches of one optimizer step run as fewer, larger passes inside Hugging Face trainers.

Why: a tutorial's `per_device_train_batch_size=2, gradient_accumulation_steps=4` runs four forward/backward passes
per optimizer step. With the padding removed (padding.py) a micro-batch of two ~150-token samples is a few hundred
tokens: every kernel is latency-bound, and TRL's metrics wait for the device on every call. Measured on an H100
(bench/NOTES.md, eighth session): such micro-steps ran at a third of the speed of `turbotune train`'s packed rows.

Why the math is the same: when the trainer passes `num_items_in_batch` (the target count of the whole optimizer
step, the same for each of its micro-batches), each micro-batch's loss is the sum of its token losses divided by
that count. The step's gradient is the sum of the micro-batches' gradients, so the micro-batches can be run as
fewer passes whose token sums add up to the same total: same samples in the step, same targets, same denominator,
same gradients. The trainer adds the micro-steps' returned losses between two logs; kept micro-steps return 0 and
the last one returns the total, so the logged loss is the same sum.

How: `transformers.Trainer.training_step` is wrapped once, at class level (TRL's trainers reach it through
`super()`). For a model carrying turbotune's hook, a micro-batch whose optimizer step is not complete is kept and
0 is returned; when the step closes (the trainer turns gradient sync on, or its count of micro-batches is reached),
the kept micro-batches are grouped, in order, into passes of at most `budget` real tokens, the largest batch the
user's settings could feed in one micro-step (`per_device_train_batch_size x max_length`, or the largest batch
seen), so a pass never needs more memory than a micro-step of those settings could. Each pass is one padded batch
that the hook then turns into one packed row, and runs through the trainer's own training_step.

Not coalesced (each micro-batch runs as it came, said once at the start): a trainer whose compute_loss is not
transformers' or SFTTrainer's (DPO, KTO, GRPO, user overrides), no `num_items_in_batch` or a loss the trainer
scales per micro-step, a `compute_loss_func`, label smoothing, MoE auxiliary losses, DataParallel, DeepSpeed,
context parallelism, left padding, or keys other than input_ids / attention_mask / labels / position_ids (TRL's
packed rows come without padding already). What changes: metrics TRL computes per call (token accuracy, entropy)
are averaged per pass, not per micro-batch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from turbotune.training import deferred_backward, step_prefetch
from turbotune.training.padding import IGNORE_INDEX

_MERGEABLE = {"input_ids", "attention_mask", "labels", "position_ids"}
_PAD = {"attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}  # input_ids: the model's pad id
_original = None  # transformers.Trainer.training_step before the wrap


def patch_trainer() -> None:
    """Wrap `transformers.Trainer.training_step` (once; a no-op without transformers)."""
    global _original
    if _original is not None:
        return
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    _original = Trainer.training_step
    Trainer.training_step = functools.wraps(_original)(_training_step)
    deferred_backward.patch_trainer()
    step_prefetch.patch_trainer()


class Window:
    """What the hook keeps of the optimizer step in progress, and counters for tests and the bench's notes."""

    def __init__(self):
        self.kept: list = []
        self.enabled = os.environ.get("TURBOTUNE_COALESCE", "1") != "0"  # 0: one pass per micro-batch (A/B runs)
        self.off_reason = None  # why the last micro-batch was not coalesced (None: it was, or none came yet)
        self.steps = self.micro_batches = self.passes = 0
        self.rows = None  # the trainer's rows per micro-batch (per_device_train_batch_size)
        self.largest_batch = 0  # the largest padded micro-batch seen (rows x length)
        self.largest_real = 0  # the most real tokens one micro-batch has had
        self.pass_tokens = None  # real tokens per coalesced pass at most, once a step was coalesced

    def line(self) -> str | None:
        if self.off_reason is not None:
            return f"micro-batches run one by one ({self.off_reason})"
        return None


def _training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
    from turbotune.training.trainer_step import trainer_step_of

    hook = trainer_step_of(self.model) if getattr(self, "model", None) is not None else None
    if hook is None:
        return _original(self, model, inputs, num_items_in_batch, *args, **kwargs)
    deferred_backward.flush(self)  # nothing runs a forward with a backward still pending (a no-op in the loop)
    token_sum = _loss_is_a_token_sum(self)
    hook.keep_rows = not token_sum
    window = hook.window
    why = ("extra arguments to training_step" if args or kwargs
           else _why_not(self, window, inputs, num_items_in_batch, token_sum))
    if why is not None:
        window.off_reason = why
        total = _run_kept(self, model, window, num_items_in_batch, hook)  # never leave kept micro-batches behind
        loss = _original(self, model, inputs, num_items_in_batch, *args, **kwargs)
        return loss if total is None else total + loss.to(total.device)
    window.off_reason = None
    window.kept.append(inputs)
    if not _step_closes(self, len(window.kept)):
        return torch.zeros((), device=self.args.device)
    return _run_kept(self, model, window, num_items_in_batch, hook, may_defer=True)


def _why_not(trainer, window: Window, inputs: dict, num_items_in_batch, token_sum: bool) -> str | None:
    """Why this micro-batch must run as it came, or None (`token_sum`: _loss_is_a_token_sum(trainer))."""
    if not window.enabled:
        return "TURBOTUNE_COALESCE=0"
    if not token_sum:
        return f"{type(trainer).__name__}'s loss is not known to be a sum over tokens"
    if num_items_in_batch is None:
        return "no num_items_in_batch: the loss is a mean per micro-batch"
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = getattr(trainer, "model_accepts_loss_kwargs", False)
    if not scaled or getattr(trainer, "compute_loss_func", None) is not None:
        return "the trainer's loss is not a sum over num_items_in_batch"
    if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "aux_loss_enabled", False):
        return "label smoothing or an auxiliary loss"
    args = trainer.args
    accelerator = trainer.accelerator
    if getattr(args, "n_gpu", 1) > 1 or "DEEPSPEED" in str(getattr(accelerator, "distributed_type", "")):
        return "DataParallel or DeepSpeed"
    config = getattr(accelerator, "parallelism_config", None)
    if config is not None and (getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False)):
        return "context or sequence parallelism"
    return _shape_refusal(inputs)


def _loss_is_a_token_sum(trainer) -> bool:
    """Only the compute_loss of transformers' Trainer and of TRL's SFTTrainer are known to give a sum of token
    losses over num_items_in_batch; preference and RL trainers (DPO, KTO, GRPO) and user overrides are left alone."""
    from transformers import Trainer

    fn = type(trainer).compute_loss
    sft = getattr(sys.modules.get("trl.trainer.sft_trainer"), "SFTTrainer", None)  # imported if one is in use
    return fn is Trainer.compute_loss or (sft is not None and fn is sft.compute_loss)


def _shape_refusal(inputs: dict) -> str | None:
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    mask = tensors.get("attention_mask")
    if set(inputs) - _MERGEABLE or mask is None or "input_ids" not in tensors or "labels" not in tensors:
        return "the batch is not a padded batch of input_ids, attention_mask, labels"
    if any(v.dim() != 2 or v.shape != mask.shape for v in tensors.values()):
        return "the batch's tensors differ in shape"
    return None


def _step_closes(trainer, count: int) -> bool:
    """True on the optimizer step's last micro-batch: the trainer syncs gradients after it, or its count of
    micro-batches for this step is reached (either one closes: nothing is kept past a sync)."""
    expected = getattr(trainer, "current_gradient_accumulation_steps", None)
    sync = getattr(trainer.accelerator, "sync_gradients", True)
    return bool(sync) or expected is None or count >= expected


def _run_kept(trainer, model, window: Window, num_items_in_batch, hook, may_defer: bool = False):
    """Run the kept micro-batches as passes of at most the budget's real tokens; their losses' sum (or None).
    `may_defer`: the step closes here, so its last pass may leave its backward to deferred_backward.py."""
    kept, window.kept = window.kept, []
    if not kept:
        return None
    defer = may_defer and deferred_backward.can_defer(trainer)
    same_keys = all(set(b) == set(kept[0]) for b in kept)
    lengths = _real_lengths(kept) if same_keys else None
    if lengths is None:  # left padding or different keys somewhere: each as it came
        groups = [[i] for i in range(len(kept))]
    else:
        real = [sum(x) for x in lengths]  # each micro-batch's real tokens
        budget = _budget(trainer, kept, hook, real)
        if len(kept) > 1:
            window.pass_tokens = budget
        groups = plan_passes(real, budget)
    total = None
    for n, group in enumerate(groups):
        batch = merge_padded([kept[i] for i in group], pad_id=hook.pad_id())
        last = n == len(groups) - 1
        quiet = (contextlib.nullcontext() if last or getattr(trainer.accelerator, "num_processes", 1) == 1
                 else trainer.accelerator.no_sync(model))
        hook.last_token_metrics = None
        # deferred_backward.py: the step's last backward waits for the trainer's first look at the gradients
        with quiet, (deferred_backward.deferring(trainer) if defer and last else contextlib.nullcontext()):
            loss = _original(trainer, model, batch, num_items_in_batch)
        if len(group) > 1 and lengths is not None:
            _metrics_per_micro_batch(trainer, hook, [lengths[i] for i in group])
        total = loss if total is None else total + loss
    window.steps += 1
    window.micro_batches += len(kept)
    window.passes += len(groups)
    return total


def _metrics_per_micro_batch(trainer, hook, lengths: list[list[int]]) -> None:
    """TRL appends one entropy and one token accuracy per call; a pass of k micro-batches is k calls of the
    uncoalesced run, so its entry becomes the k micro-batches' own values (one process only: with more, TRL's
    values are sums over ranks). `lengths`: each micro-batch's samples' real lengths."""
    from turbotune._compat import trl_train_metrics

    metrics, found = trl_train_metrics(trainer), hook.last_token_metrics
    if metrics is None or found is None or getattr(trainer.accelerator, "num_processes", 1) != 1:
        return
    if not all(len(metrics.get(k) or ()) for k in ("entropy", "mean_token_accuracy")):
        return
    rows, width = found[2].shape
    ends, at = [], 0
    if rows == 1:  # one packed row: the micro-batches' real tokens one after another; target i predicts token i+1
        for sample_lengths in lengths:
            at += sum(sample_lengths)
            ends.append(min(at - 1, width))
    elif rows == sum(len(x) for x in lengths):  # padding kept (no padding to remove): row blocks
        for sample_lengths in lengths:
            at += len(sample_lengths) * width
            ends.append(at)
    else:
        return
    entropy, top1, mask = (t.reshape(-1).double() for t in found)
    sums = torch.nn.functional.pad(torch.stack([torch.cumsum(x, 0) for x in (mask, entropy * mask, top1 * mask)]),
                                   (1, 0))  # sums[:, i]: the sum over targets before i
    edges = torch.tensor([0] + ends, device=sums.device)
    valid, ent, hits = (sums[:, edges[1:]] - sums[:, edges[:-1]]).tolist()
    metrics["entropy"][-1:] = [e / v if v > 0 else 0.0 for e, v in zip(ent, valid)]
    metrics["mean_token_accuracy"][-1:] = [h / v if v > 0 else 0.0 for h, v in zip(hits, valid)]


def _real_lengths(batches: list[dict]) -> list[list[int]] | None:
    """Each batch's samples' real lengths (one wait for the device for all), or None where a batch is not
    right-padded."""
    masks = [b["attention_mask"] for b in batches]
    sums = [m.ne(0).sum(-1) for m in masks]
    prefix_ok = [(m.ne(0) == (torch.arange(m.shape[1], device=m.device) < s.unsqueeze(1))).all()
                 for m, s in zip(masks, sums)]
    flat = torch.cat([torch.stack(prefix_ok).to(sums[0].device).long(), torch.cat(sums)]).tolist()
    if not all(flat[:len(batches)]):
        return None
    out, at = [], len(batches)
    for s in sums:
        out.append(flat[at:at + s.numel()])
        at += s.numel()
    return out


def _budget(trainer, batches: list[dict], hook, real: list[int] | None = None) -> int:
    """Real tokens per pass at most: the largest batch the settings allow in one micro-step
    (per_device_train_batch_size x the trainer's max_length, else the model's max_seq_length), at least the
    largest padded micro-batch seen. TURBOTUNE_PASS_BUDGET (A/B runs for the mixed-length memory line, default
    `settings`): `seen`, only the largest padded micro-batch seen so far, so a pass holds no more tokens than the
    trainer's own micro-batches have needed; `real`, only the largest count of *real* tokens one micro-batch has
    had (`real`: each kept micro-batch's), the most a padding-free engine computes in one micro-step. Both mean
    less memory before the longest samples come, and more passes, so slower."""
    window = hook.window
    rows = int(getattr(trainer.args, "per_device_train_batch_size", 0) or 0)
    window.rows = rows or None
    length = int(getattr(trainer.args, "max_length", 0) or getattr(trainer.args, "max_seq_length", 0)
                 or hook.max_seq_length() or 0)  # transformers' Trainer has no max_length: the model's
    window.largest_batch = max(window.largest_batch, max(b["input_ids"].numel() for b in batches))
    window.largest_real = max([window.largest_real, *(real or [])])
    mode = os.environ.get("TURBOTUNE_PASS_BUDGET", "settings")
    if mode not in ("settings", "seen", "real"):
        raise ValueError(f"TURBOTUNE_PASS_BUDGET must be settings, seen or real, not {mode!r}")
    if mode == "seen":
        return window.largest_batch
    if mode == "real" and window.largest_real:
        return window.largest_real
    return max(rows * length, window.largest_batch)


def plan_passes(tokens: list[int], budget: int) -> list[list[int]]:
    """Consecutive micro-batches grouped while their real tokens fit the budget (order kept)."""
    groups, current, used = [], [], 0
    for i, n in enumerate(tokens):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def merge_padded(batches: list[dict], pad_id: int) -> dict:
    """Right-padded batches as one: each tensor padded on the right to the longest and stacked by rows."""
    if len(batches) == 1:
        return batches[0]
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        fill = pad_id if key == "input_ids" else _PAD[key]
        out[key] = torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=fill)
                              for b in batches])
    return out
