"""The fast step inside Hugging Face trainers: transformers' Trainer and TRL's SFTTrainer, as users write them.

A trainer runs, per micro-batch, `outputs = model(**inputs)`, takes a loss from the outputs and calls
`loss.backward()`. turbotune puts one hook on the PEFT wrapper's `forward` (`install`, from `get_peft_model`):
the object every trainer calls, and not the one TRL replaces (TRL sets its fused head on the causal LM under
it). Outside a training call (eval, `generate`, no grad, no labels) the hook is the original forward, except that
a no-grad call asking for TRL's fused head (DPO's and KTO's reference passes, GRPO's old-policy and reference
log-probs) gets turbotune's, which without grad computes no gradient rows (`_no_grad_head_call`). In a training
call it:

1. **removes the padding** (`padding.py`): a padded batch becomes one packed row of its real tokens, each
   sample attending only to itself, grown to one of a few bucket lengths so shapes repeat;
2. **serves TRL's `fused_lm_head=True`** with turbotune's fused head (`kernels/fused_token_logprobs.py`):
   per-token log-probs, entropies and top-1 hits, no `[tokens, vocab]` logits, nothing the host must wait for
   (TRL's own head indexes the valid positions, a host sync that no CUDA graph can hold);
3. **replays the call from CUDA graphs** (`GraphedCall`, graphed_call.py): once a shape has run `warmup` times
   eagerly, its forward and its backward are captured as two graphs of one autograd callable, the LoRA
   parameters as its inputs, so the trainer's loss scaling, accumulation, clipping and optimizer see ordinary
   `.grad`s.

Each part keeps the math: packed rows give every real token what the padded batch gives it (same targets,
same count), the fused head equals the materialising one (tests), and a replay equals the eager call it was
captured from (GPU tests).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings

import torch

from turbotune._compat import trl_fused_output_class, unwrap_peft
from turbotune.model.state import turbo_state
from turbotune.training.forward_graphs import ForwardGraphs, no_grad_graphs_enabled
from turbotune.training.graphed_call import GraphedCall
from turbotune.training.grpo import pause_checkpointing, resume_checkpointing, rotate_back, rotate_left_padding

_UNCHECKED = object()


def install(peft_model, verbose: bool = True) -> "TrainerStep":
    """Put the hook on `peft_model.forward` (an instance attribute; `uninstall` removes it)."""
    step = trainer_step_of(peft_model)
    if step is not None:
        return step
    step = TrainerStep(peft_model, verbose=verbose)
    peft_model.forward = step
    from turbotune.training.step_coalescing import patch_trainer
    patch_trainer()  # the micro-batches of one optimizer step as fewer passes (step_coalescing.py)
    # Trainers switch checkpointing on at train() (TRL's SFTConfig does by default), which would replace the
    # mode chosen in get_peft_model (auto / offload / none) with plain recompute: that choice stays.
    for name in _CHECKPOINTING_SWITCHES:
        setattr(peft_model, name, step.keep_checkpointing)
    # TRL's GRPOTrainer switches it off around generation and back on after: its off switch notes what it turned
    # off, for the on switch above to put back (grpo.py). turbotune's own switch-offs (for_inference, the "auto"
    # plan, for_training(model, False)) take transformers 5's activation_checkpointing_disable and stay off.
    peft_model.gradient_checkpointing_disable = functools.partial(pause_checkpointing, step)
    # The Trainer counts FLOPs every micro-step, from num_parameters (transformers 5.2x: Trainer.floating_point_ops)
    # or the model's floating_point_ops (earlier); either walks every parameter. The count is read once here.
    peft_model.num_parameters = step.num_parameters
    if hasattr(type(unwrap_peft(peft_model)), "floating_point_ops"):
        peft_model.floating_point_ops = step.floating_point_ops
    # Trainers call model.train() every micro-step; on a 1.5B model's 2,333 modules that walk costs ~6 ms of
    # host time (measured on the CPU machine), checking that nothing would change ~0.2 ms.
    peft_model.train = step.train
    return step


_CHECKPOINTING_SWITCHES = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
_INSTANCE_ATTRS = _CHECKPOINTING_SWITCHES + ("gradient_checkpointing_disable", "num_parameters", "floating_point_ops",
                                             "train")


def uninstall(peft_model) -> None:
    if trainer_step_of(peft_model) is not None:
        peft_model.__dict__.pop("forward", None)
        for name in _INSTANCE_ATTRS:
            peft_model.__dict__.pop(name, None)


def trainer_step_of(model) -> "TrainerStep | None":
    """The hook on `model` (also after accelerate wrapped its forward for autocast), or None."""
    step = getattr(model.__dict__.get("num_parameters"), "__self__", None)
    return step if isinstance(step, TrainerStep) else None


class TrainerStep:
    """The hook. Counters for tests and the start-of-training line: `.graphs.replays`, `.graphs.captures`."""

    def __init__(self, peft_model, verbose: bool = True):
        self.peft_model = peft_model
        self.original = type(peft_model).forward.__get__(peft_model)
        self.verbose = verbose
        self.remove_padding = True
        self.graphs = GraphedCall(self._model_call, peft_model)
        self.no_grad_graphs = ForwardGraphs(self._no_grad_head)  # reference passes (forward_graphs.py)
        self._lora_module = None  # one LoRA layer, whose state says which adapters a no-grad call ran with
        self._announced = False
        self.trainer_checkpointing = None  # what a trainer asked for with its checkpointing switch, if it did
        self.paused_checkpointing = None  # the layers the off switch took checkpointing from (grpo.py)
        self._param_counts: dict = {}
        self._refusal = _UNCHECKED  # why turbotune's head can't serve TRL's (fused_head_refusal), once known
        self._mean_logits = None  # whether TRL's head was set up to give mean_logits (DPO), read with it
        self._temperature = None  # the temperature TRL's head divides the logits by (GRPO's), read with it
        self._modules = None  # every module, read after the last full train() walk
        self._kernel_models: list = []  # the transformers models among them (their kernels mode)
        self.passthrough = None  # why every call goes straight to the original forward (set by turbotune's loops)
        from turbotune.training.step_coalescing import Window
        self.window = Window()  # the optimizer step's micro-batches kept by the trainer wrap (step_coalescing)
        self.last_token_metrics = None
        # Set by the trainer wrap (step_coalescing): the trainer's loss needs each sample's own row (DPO, KTO,
        # GRPO: per-sequence log-probs), so padding is removed only for TRL's fused head, whose per-token
        # outputs are put back in rows; other calls keep their padded rows.
        self.keep_rows = False

    def train(self, mode: bool = True):
        """nn.Module.train, skipped when it would change nothing: every module already in `mode` and transformers'
        kernels mode already set for it. The module list is read again after every full walk, so a module added
        since is seen at the next change of mode at the latest."""
        from turbotune._compat import kernels_mode_settled

        model = self.peft_model
        if self._modules is not None and all(m.training is mode for m in self._modules) \
                and all(kernels_mode_settled(m, mode) for m in self._kernel_models):
            return model
        type(model).train(model, mode)
        self.paused_checkpointing = None  # a change of mode is not a trainer's pause (grpo.py)
        self._modules = list(model.modules())
        self._kernel_models = [m for m in self._modules if hasattr(type(m), "kernels_mode")]
        return model

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The base model's count; all parameters counted once (what trainers ask every micro-step)."""
        base = unwrap_peft(self.peft_model)
        if only_trainable:  # requires_grad may change: count again
            return base.num_parameters(only_trainable=True, exclude_embeddings=exclude_embeddings)
        count = self._param_counts.get(exclude_embeddings)
        if count is None:
            count = self._param_counts[exclude_embeddings] = base.num_parameters(exclude_embeddings=exclude_embeddings)
        return count

    def floating_point_ops(self, inputs, exclude_embeddings: bool = True) -> int:
        """transformers' estimate (6 x tokens x parameters), with the count read once."""
        base = unwrap_peft(self.peft_model)
        return 6 * base.estimate_tokens(inputs) * self.num_parameters(exclude_embeddings=exclude_embeddings)

    def keep_checkpointing(self, *args, **kwargs) -> None:
        """Stands in for the model's checkpointing switch: get_peft_model's mode stays (said at the first step),
        and comes back where the off switch paused it."""
        self.trainer_checkpointing = kwargs or True
        resume_checkpointing(self)

    def _checkpointing_line(self, tensors) -> str:
        """Plans "auto" from the first batch the trainer feeds, as it comes (before padding removal): its rows
        at the model's max_seq_length, the longest a later batch can be (a packed row: its own length if
        longer)."""
        from turbotune.training.auto_checkpointing import checkpointing_in_effect, plan_checkpointing
        model = self.peft_model
        mode = turbo_state(model).checkpointing
        line = None
        if mode == "auto":
            rows, length = tensors["input_ids"].shape
            seq = max(int(self.max_seq_length() or length), int(length))
            if self.window.pass_tokens:  # coalesced micro-batches: a packed row of at most this many tokens
                rows, seq = 1, max(int(self.window.pass_tokens), seq * int(self.window.rows or 1))
            choice = plan_checkpointing(model, seq, int(rows))
            mode, line = choice.mode, choice.line()
            self.graphs.reset()
            self.no_grad_graphs.reset()
        elif mode is None:
            mode = checkpointing_in_effect(model)
            line = f"gradient checkpointing: {mode}"
        else:
            line = f"gradient checkpointing: {mode}"
        actual = checkpointing_in_effect(model)
        if actual != mode:  # something switched it after turbotune chose (what the fifteenth session's bench hit)
            warnings.warn(f"turbotune chose gradient checkpointing {mode!r}, but the model's layers are set to "
                          f"{actual!r}: something switched it after get_peft_model. Training goes on with "
                          f"{actual!r}.", RuntimeWarning, stacklevel=2)
            line = f"gradient checkpointing: {actual} (turbotune chose {mode}; something switched it since)"
        elif self.trainer_checkpointing:
            line += " (the trainer's gradient_checkpointing switch leaves get_peft_model's choice in place)"
        return line

    # ------------------------------------------------------------------ the hook
    def __call__(self, *args, **kwargs):
        if args or self.passthrough is not None:
            return self.original(*args, **kwargs)
        if not self._training_call(kwargs):
            out = self._no_grad_head_call(kwargs)
            return self.original(**kwargs) if out is None else out
        tensors, others = _split(kwargs)
        checkpointing = None if self._announced else self._checkpointing_line(tensors)  # plans on the fed batch
        self.paused_checkpointing = None  # a trainer's pause ends before its next training call (grpo.py)
        rows_mask = lead = None  # the padded batch's mask, where the caller needs its per-token outputs in rows
        grow = None  # a packed row's call may replay a longer graph (graphed_call's stand-ins): padding.grow_packed
        if self.remove_padding and (not self.keep_rows or (others.get("fused_lm_head")
                                                            and self._head_refusal() is None)):
            from turbotune.training.padding import remove_padding
            # GRPO's rows start with the prompt's left padding: rotated left, they are right-padded (grpo.py)
            rows, lead = rotate_left_padding(tensors) if self.keep_rows else (tensors, None)
            pad_id = self.pad_id()
            packed = remove_padding(rows, pad_id=pad_id)
            if packed is rows:  # not packed (extra keys, gaps inside a row): the rows as they came
                packed, lead = tensors, None
            elif not self.keep_rows:
                from turbotune.training.padding import grow_packed
                grow = functools.partial(grow_packed, pad_id=pad_id)
            if self.keep_rows and packed.get("input_ids") is not None \
                    and (packed["input_ids"].shape != rows["input_ids"].shape or lead is not None):
                rows_mask = rows["attention_mask"]
            # the varlen offsets' max lengths are ints: constants of the call (the bucket), part of the graph key
            tensors, extra = _split(packed)
            others = {**others, **extra}
        if not self._announced:
            self._announce(tensors, others, checkpointing)
        out = self.graphs(tensors, others, grow=grow)
        if rows_mask is not None:
            out = _in_rows(out, rows_mask, lead)
        # TRL's per-token metric tensors of this call (detached), for step_coalescing's per-micro-batch metrics
        self.last_token_metrics = _token_metrics(out)
        return out

    def _no_grad_head_call(self, kwargs):
        """TRL's fused head asked for without grad, served by turbotune's head on the rows as they came (no padding
        removal: nothing is kept for a backward), replayed from a forward-only CUDA graph per shape and adapter state
        where the training call's graphs are on (forward_graphs.py); None where it can't be served (the original
        forward then)."""
        if not kwargs.get("fused_lm_head") or torch.is_grad_enabled() or self._head_refusal() is not None \
                or (kwargs.get("labels") is None and kwargs.get("shift_labels") is None):
            return None
        rest = {k: v for k, v in kwargs.items() if k != "fused_lm_head"}
        if self.graphs.why_off() is not None or not no_grad_graphs_enabled():
            return self._no_grad_head(**rest)
        tensors, others = _split(rest)
        mask = tensors.get("attention_mask")
        if mask is not None and bool(mask.all()):  # one sync: no padding, so no mask
            del tensors["attention_mask"]  # (captured with it, transformers would build a dense [B, 1, L, L] one)
        return self.no_grad_graphs(tensors, others, self._adapter_state())

    def _no_grad_head(self, **kwargs):
        return fused_head_forward(self.peft_model, refusal=None, mean_logits=self._mean_logits,
                                  temperature=self._temperature, **kwargs)

    def _adapter_state(self) -> tuple:
        """What a captured no-grad call depends on besides its inputs: which adapters are active or disabled (a
        reference pass runs under PEFT's disable_adapter() or TRL's "ref" adapter), train mode, autocast."""
        from turbotune.model.kernels.lora_parts import lora_state_key
        if self._lora_module is None:
            self._lora_module = next((m for m in self.peft_model.modules() if hasattr(m, "lora_A")), False)
        lora = lora_state_key(self._lora_module) if self._lora_module is not False else None
        return (lora, self.peft_model.training, torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)

    def _training_call(self, kwargs) -> bool:
        return (self.peft_model.training and torch.is_grad_enabled()
                and (kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None))

    def max_seq_length(self) -> int | None:
        """The length the model was loaded for (FastModel's max_seq_length), if known."""
        return getattr(unwrap_peft(self.peft_model), "max_seq_length", None)

    def pad_id(self) -> int:
        cfg = unwrap_peft(self.peft_model).config
        pad = getattr(cfg, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) and pad >= 0 else 0

    def _model_call(self, **kwargs):
        """One training call: the fused head for TRL's `fused_lm_head=True`, else the original forward."""
        if kwargs.pop("fused_lm_head", False):
            out = fused_head_forward(self.peft_model, refusal=self._head_refusal(), mean_logits=self._mean_logits,
                                     temperature=self._temperature, **kwargs)
            if out is not None:
                return out
            kwargs["fused_lm_head"] = True
        return self.original(**kwargs)

    def _head_refusal(self) -> str | None:
        """fused_head_refusal, asked once: TRL installs its head when the trainer is built, before any step."""
        if self._refusal is _UNCHECKED:
            self._refusal = fused_head_refusal(self.peft_model)
            self._mean_logits = _head_wants_mean(self.peft_model)
            self._temperature = _head_temperature(self.peft_model)
        return self._refusal

    def _announce(self, tensors, others, checkpointing: str) -> None:
        self._announced = True
        if not self.verbose:
            return
        on = [checkpointing]
        if "position_ids" in tensors and "attention_mask" not in tensors:
            on.append("padding removed (packed rows, bucketed lengths)")
        from turbotune.training.deferred_backward import deferred_backward_enabled
        coalesced = self.window.line() is None and self.window.pass_tokens
        on.append(self.window.line() or (f"the micro-batches of each optimizer step run together (passes of at most "
                                         f"{self.window.pass_tokens} real tokens)" if coalesced else
                                         "micro-batches run one by one"))
        if coalesced:  # the deferral lives in the coalesced step (step_coalescing._run_kept)
            on.append("each step's last backward launched at the trainer's first gradient read" if
                      deferred_backward_enabled() else "backwards at once (TURBOTUNE_DEFER_BACKWARD=0)")
        if others.get("fused_lm_head"):
            why = self._head_refusal()
            on.append("TRL's fused_lm_head served by turbotune's fused head" if why is None
                      else f"TRL's own fused head ({why})")
        graphs = self.graphs.why_off()
        warm = f"on (the first shape replayed after {self.graphs.warmup} eager calls, later ones after 1)"
        on.append("CUDA graphs " + (warm if graphs is None else f"off ({graphs})"))
        print(f"[turbotune] trainer step: {'; '.join(on)}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- TRL's fused head
# Logit multipliers TRL's head applies for some families (Granite, Falcon-H1, MPT, ...); ours reads only
# `logit_scale` and the final soft-cap, so models with any of these keep TRL's head.
_OTHER_LOGIT_SCALES = ("output_multiplier", "lm_head_multiplier", "logits_scaling")
_SERVED_FIELDS = {"log_probs", "entropy", "is_top1", "mean_logits"}


def fused_head_refusal(peft_model) -> str | None:
    """Why turbotune's head can't stand in for TRL's on this model (None: it can, exactly)."""
    from turbotune._compat import trl_fused_head_settings

    causal_lm = unwrap_peft(peft_model)
    head = causal_lm.get_output_embeddings()
    cfg = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    settings = trl_fused_head_settings(causal_lm)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if trl_fused_output_class() is None or settings is None:
        return "this TRL's fused head is not one turbotune knows"
    if settings["cast_lm_head_to_fp32"] or (settings["temperature"] != 1.0 and softcap is not None):
        return "TRL set an fp32 head, or a temperature on soft-capped logits"  # else: logit_scale / temperature
    if set(settings["outputs"]) - _SERVED_FIELDS:
        return f"TRL asks for {sorted(set(settings['outputs']) - _SERVED_FIELDS)}"
    if head is None or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "the head is trained"
    if getattr(cfg, "output_router_logits", False) or any(getattr(cfg, k, None) is not None
                                                          for k in _OTHER_LOGIT_SCALES):
        return "router logits or a logit multiplier of this family"
    return None


def _family_masks(causal_lm, kwargs: dict):
    """The inner model called directly (not through the patched lm forward): the same mask preparation, so windows
    and soft-capped layers take turbotune's attention here too."""
    if turbo_state(causal_lm).family is None:
        return contextlib.nullcontext()
    from turbotune.model.families.llama_like import masks_left_to_us
    return masks_left_to_us(causal_lm, (), kwargs)


def fused_head_forward(peft_model, labels=None, shift_labels=None, num_items_in_batch=None, refusal=_UNCHECKED,
                       mean_logits=None, temperature=None, **kwargs):
    """What TRL's `add_fused_lm_head` forward returns for `fused_lm_head=True`, computed with turbotune's head;
    None where `fused_head_refusal` says it can't be (the caller then runs TRL's own head). `refusal`: that
    answer when the caller has it already; `mean_logits`, `temperature`: _head_wants_mean's and
    _head_temperature's, likewise."""
    from turbotune.model.kernels.fused_token_logprobs import fused_linear_token_logprobs

    if refusal is _UNCHECKED:
        refusal = fused_head_refusal(peft_model)
    if kwargs.get("output_router_logits") or refusal is not None:
        return None
    causal_lm = unwrap_peft(peft_model)
    head = causal_lm.get_output_embeddings()
    cfg = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    kwargs["use_cache"] = False
    with _family_masks(causal_lm, kwargs):
        hidden = causal_lm.base_model(**kwargs).last_hidden_state
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(head.weight.device)
    if mean_logits is None:
        mean_logits = _head_wants_mean(peft_model)
    if temperature is None:
        temperature = _head_temperature(peft_model)
    # TRL divides the (scaled) logits by the temperature; without a soft-cap that is one scale (fused_head_refusal)
    log_probs, entropy, is_top1, *mean = fused_linear_token_logprobs(
        hidden.to(head.weight.device), head.weight, targets, bias=head.bias,
        softcap=getattr(cfg, "final_logit_softcapping", None), logit_scale=_logit_scale(cfg) / temperature,
        mean_logits=mean_logits)
    mask = targets != -100
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    extra = {"mean_logits": mean[0]} if mean else {}
    return trl_fused_output_class()(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                    is_top1=is_top1, label_mask=mask, **extra)


def _head_wants_mean(peft_model) -> bool:
    """Whether TRL set its head up to return mean_logits (DPOTrainer does)."""
    from turbotune._compat import trl_fused_head_settings
    return "mean_logits" in (trl_fused_head_settings(unwrap_peft(peft_model)) or {}).get("outputs", ())


def _head_temperature(peft_model) -> float:
    """The temperature TRL set its head up with (GRPOTrainer's sampling temperature; 1.0 for the others)."""
    from turbotune._compat import trl_fused_head_settings
    return float((trl_fused_head_settings(unwrap_peft(peft_model)) or {}).get("temperature", 1.0))


def _in_rows(out, mask, lead=None):
    """A fused-head output of a packed row, its per-target fields back in the padded batch's rows (`mask`, right
    padded; `lead`: the rotations of rotate_left_padding, undone)."""
    from turbotune.training.padding import targets_in_rows

    fields = {name: getattr(out, name) for name in ("log_probs", "entropy", "is_top1", "label_mask")}
    if any(not torch.is_tensor(v) for v in fields.values()):
        return out
    if torch.is_tensor(getattr(out, "mean_logits", None)):
        fields["mean_logits"] = out.mean_logits
    rows = {k: targets_in_rows(v, mask) for k, v in fields.items()}
    if lead is not None:
        rows = {k: rotate_back(v, lead) for k, v in rows.items()}
    return type(out)(**{**dict(out), **rows})


def _token_metrics(out):
    """(entropy, is_top1, label_mask) of a fused-head output, detached; None for other outputs."""
    fields = [getattr(out, name, None) for name in ("entropy", "is_top1", "label_mask")]
    return None if any(f is None for f in fields) else tuple(f.detach() for f in fields)


def _logit_scale(cfg) -> float:
    scale = getattr(cfg, "logit_scale", None)
    return 1.0 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------- the call's inputs
def _split(kwargs: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
    others = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
    if "num_items_in_batch" in others and isinstance(others["num_items_in_batch"], (int, float)):
        # A count that changes every step would change the key: make it an input like the batch.
        device = next(iter(tensors.values())).device
        tensors["num_items_in_batch"] = torch.tensor(others.pop("num_items_in_batch"), device=device)
    return tensors, others
