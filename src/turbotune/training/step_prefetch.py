"""The next optimizer step's micro-batches are fetched before the trainer waits for this step's loss.

Why: in transformers' loop an optimizer step ends with `_maybe_log_save_evaluate`, which (with `logging_steps=1`,
as tutorials set it) reads the accumulated loss and so waits for the device to finish the step. Only then does the
loop fetch the next step's micro-batches: the collator pads them and accelerate copies them to the device while
the device idles. Measured on an H100 (bench/NOTES.md, seventeenth session; qwen2-1.5b QLoRA, mixed lengths under
SFTTrainer): a 7.5-9.4 ms gap between replayed passes, of which collating four micro-batches is ~3 ms. Fetched
before the log instead, the collation runs on the host while the device still runs the step's backward and
optimizer.

Why nothing changes: the batches come from the trainer's own epoch iterator, in the same order; only the moment
they are pulled moves, by one log call. `get_batch_samples` serves the kept batches first. Not before a step that
saves, evaluates or ends training (a checkpoint keeps the RNG state as of the step's end; an evaluation needs the
device; a last step needs no more batches), nor where nothing is logged (no wait to hide), nor for a model without
turbotune's hook. What does move: a callback that changes the data or the collator in `on_log` (a curriculum)
reaches the step after next, since the next one's batches are already collated.

Off unless TURBOTUNE_PREFETCH_STEP=1: not yet measured on a GPU (predicted +4-5% on the mixed run's steady steps).
"""
from __future__ import annotations

import functools
import os
import weakref

_WRAPPED = "_turbotune_prefetch_wrapped"
_SOURCE = "_turbotune_epoch_iterator"  # a weak reference to the iterator the loop's last get_batch_samples read
_KEPT = "_turbotune_prefetched"        # (that weak reference, [batches]) pulled ahead of the loop
# Weak, so a trainer kept after train() does not keep its data loader's iterator (and any worker processes) alive.
prefetches = 0  # steps whose batches were pulled ahead (tests, the bench's notes)


def step_prefetch_enabled() -> bool:
    return os.environ.get("TURBOTUNE_PREFETCH_STEP", "0") == "1"


def patch_trainer() -> None:
    """Wrap `Trainer.get_batch_samples` and `Trainer._maybe_log_save_evaluate`; once, at class level."""
    from transformers import Trainer

    for name, wrap in (("get_batch_samples", _serving), ("_maybe_log_save_evaluate", _pulling_ahead)):
        original = getattr(Trainer, name, None)
        if original is not None and not getattr(original, _WRAPPED, False):
            wrapped = functools.wraps(original)(wrap(original))
            setattr(wrapped, _WRAPPED, True)
            setattr(Trainer, name, wrapped)


def _serving(original):
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        kept = self.__dict__.pop(_KEPT, None)
        self.__dict__[_SOURCE] = _weak(epoch_iterator) if step_prefetch_enabled() else None
        if kept is None or kept[0]() is not epoch_iterator:  # nothing pulled, or from an iterator now done with
            return original(self, epoch_iterator, num_batches, *args, **kwargs)
        batches = kept[1]
        if len(batches) > num_batches:  # fewer asked than pulled: the rest waits for the next call
            self.__dict__[_KEPT] = (kept[0], batches[num_batches:])
            batches = batches[:num_batches]
        if len(batches) < num_batches:  # the rest from the iterator (the loop's own call; ends at its end)
            rest, _ = original(self, epoch_iterator, num_batches - len(batches), *args, **kwargs)
            batches = batches + rest
        return batches, self._get_num_items_in_batch(batches, *args, **kwargs)
    return get_batch_samples


def _weak(iterator):
    try:
        return weakref.ref(iterator)
    except TypeError:  # an iterator without weak references: not pulled ahead
        return None


def _pulling_ahead(original):
    def maybe_log_save_evaluate(self, *args, **kwargs):
        if _should_pull(self):
            _pull(self)
        return original(self, *args, **kwargs)
    return maybe_log_save_evaluate


def _should_pull(trainer) -> bool:
    from turbotune.training.trainer_step import trainer_step_of

    if not step_prefetch_enabled() or _KEPT in trainer.__dict__ or trainer.__dict__.get(_SOURCE) is None:
        return False
    if getattr(trainer, "model", None) is None or trainer_step_of(trainer.model) is None:
        return False
    control = trainer.control
    if not control.should_log or control.should_save or control.should_evaluate:
        return False
    if control.should_training_stop or control.should_epoch_stop:
        return False
    if not hasattr(trainer, "_get_num_items_in_batch"):  # how the loop counts a step's targets (transformers 5)
        return False
    return trainer.state.global_step < trainer.state.max_steps


def _pull(trainer) -> None:
    """Up to one step's micro-batches from the loop's iterator, fewer at its end: exactly what the loop's next
    call would ask for, which then finds them kept. Accelerate's loader says when it has handed out its last batch
    (`gradient_state.end_of_dataloader`); no `next` is called past it, as the loop calls none (a `next` on the
    spent loader would end its iteration early)."""
    global prefetches
    source = trainer.__dict__.get(_SOURCE)
    iterator = source() if source is not None else None
    if iterator is None:
        return
    state = getattr(getattr(trainer, "accelerator", None), "gradient_state", None)
    batches = []
    for _ in range(max(1, int(trainer.args.gradient_accumulation_steps))):
        if getattr(state, "end_of_dataloader", False) is True:
            break
        try:
            batches.append(next(iterator))
        except StopIteration:
            break
    trainer.__dict__[_KEPT] = (source, batches)
    prefetches += bool(batches)
