"""Sharded data parallel training (FSDP2) under torchrun: `torchrun --nproc-per-node N -m turbotune train --fsdp ...`.

DDP (distributed.py) keeps a whole copy of the model on every rank. For a base that does not fit one card,
`--fsdp` (TrainConfig.distributed = "fsdp") shards it with FSDP2's `fully_shard`: each decoder layer is one unit
and the root (embeddings, final norm, LM head) another; every parameter of a unit, frozen base weights and LoRA
A and B alike, is split by rows over the ranks (Shard(0) DTensors), so a rank keeps 1/N of the model. A unit's
whole weights exist only while it runs: all-gathered before its forward (and before its backward), freed after.
Data order, the loss normalisation and what rank 0 writes are DDP's (see distributed.py); what differs:

- The patched forwards: before a unit's forward FSDP2 puts the gathered, plain parameters on its modules (its
  pre-forward hook, run by the decoder layer's __call__), and turbotune's fused kernels read `base_layer.weight`,
  `lora_A[...].weight`, ... at call time: they see whole tensors. The cached LoRA parts
  (kernels/lora_parts.cached_lora_part) are keyed on the base weight's identity, which inside the unit is the
  gathered parameter, the same object at every gather.
- Gradients: FSDP2 reduce-scatters the LoRA gradients after the backward, set to a plain sum over the ranks
  (`_compat.fsdp_sum_gradients`) rather than its default mean: as under DDP each micro-batch's loss is divided by
  the step's global target count, so the ranks' gradients add up to the single process's. Only the step's last
  micro-step reduces (`set_requires_gradient_sync`); the ones before accumulate the gathered gradients locally.
- Every rank runs every micro-step, since forward and backward are collectives now: a rank with no rows left in
  the epoch's last, short global micro-batch runs an idle batch (`idle_batch`: loss 0, gradients 0, no tokens).
- Mixed precision: every parameter is gathered in the dtype it is stored in (param_dtype=None: a bf16 base stays
  bf16 and PEFT's fp32 adapters stay fp32, exactly as in one process); gradients are reduced in fp32.
- CUDA graphs are off (the Trainer says so): FSDP2 gathers and frees from module hooks that keep host-side state
  (which unit is gathered; the gathered parameters' storage allocated on every forward and backward and released
  after). A graph captures only the kernels: a replay would skip the hooks and read memory freed since.
- Checkpoints are one process's files: the LoRA tensors (only those, not the frozen base) and AdamW's moments are
  gathered whole on every rank (`full_tensor`, a collective), then rank 0 writes a normal PEFT adapter and an
  optimizer state keyed as one process's. So a run resumes with or without --fsdp and with any number of ranks
  (same global batch); resuming under FSDP splits the loaded tensors again (`shard_adapter`, `shard_optimizer`).
- A 4-bit (NF4) base is refused (FOUR_BIT_REFUSAL says why).
"""
from __future__ import annotations

import torch

from turbotune._compat import fsdp2, fsdp_sum_gradients, unwrap_peft
from turbotune.errors import ConfigError
from turbotune.model.quant import NF4_NOT_SHARDABLE
from turbotune.model.state import turbo_state

FOUR_BIT_REFUSAL = (f"--fsdp with a 4-bit (NF4) base is not supported yet: {NF4_NOT_SHARDABLE}. Train a 4-bit "
                    "base with DDP (leave out --fsdp), or shard a 16-bit base (--dtype bf16) with --fsdp.")


def refuse_4bit(model) -> None:
    """--load-in-4bit is refused with the config (config.check_values); this also catches a pre-quantised folder."""
    if turbo_state(model).quantized:
        raise ConfigError(FOUR_BIT_REFUSAL)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules transformers keeps whole when it splits a model
    (`_no_split_modules`, LlamaDecoderLayer and the like)."""
    lm = unwrap_peft(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"--fsdp: no decoder layers found in {type(lm).__name__} (it names no _no_split_modules); "
                          "train it with DDP (leave out --fsdp)")
    return layers


def idle_batch(batch: dict) -> dict:
    """A micro-batch that trains nothing, for a rank with no rows left: `batch`'s tensors with every label -100
    (loss 0, gradients 0) and no tokens counted."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100), "num_tokens": 0}


class ShardedModel:
    """`model` (a PEFT model, LoRA already added) sharded in place over the ranks of the process group."""

    def __init__(self, model):
        refuse_4bit(model)
        fully_shard, MixedPrecisionPolicy, self._dtensor, self._distribute = fsdp2()
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        units = [*decoder_layers(model), model]  # the root last: it takes what no layer holds
        for unit in units:
            fully_shard(unit, mp_policy=policy)
        for unit in units:
            fsdp_sum_gradients(unit)
        self.model, self.n_layers = model, len(units) - 1

    def line(self) -> str:
        params = list(self.model.parameters())
        local = sum(p.to_local().numel() if isinstance(p, self._dtensor) else p.numel() for p in params)
        return (f"FSDP2: {self.n_layers} decoder layers and the root sharded over the ranks; this rank holds "
                f"{local:,} of {sum(p.numel() for p in params):,} parameters")

    def gradient_sync(self, on: bool) -> None:
        """Reduce-scatter the gradients after the next backward (on), or keep accumulating them locally."""
        self.model.set_requires_gradient_sync(on)

    # ----- checkpoints -----
    def _whole(self, t):
        return t.full_tensor().cpu() if isinstance(t, self._dtensor) else t

    def _split(self, whole: torch.Tensor, like) -> torch.Tensor:
        return self._distribute(whole.to(like.dtype), like.device_mesh, like.placements)

    def full_states(self, optimizer) -> tuple[dict, dict]:
        """(the trainable tensors by state-dict name, the optimizer's state_dict as one process's), whole: a
        collective, every rank calls it; what the ranks get is the same."""
        adapter = {n: self._whole(p.detach()) for n, p in self.model.named_parameters() if p.requires_grad}
        sd = optimizer.state_dict()
        state = {i: {k: self._whole(v) for k, v in s.items()} for i, s in sd["state"].items()}
        return adapter, {"state": state, "param_groups": sd["param_groups"]}

    def shard_adapter(self, tensors: dict) -> dict:
        """A saved adapter's tensors (PEFT's names) split as the parameters they load into, for
        set_peft_model_state_dict; keys that name no parameter are left for it to report."""
        from peft import get_peft_model_state_dict

        # PEFT's own naming of each parameter (the adapter name taken out), the parameters themselves as values
        saved = get_peft_model_state_dict(self.model, state_dict=dict(self.model.named_parameters()))
        return {k: self._split(v, saved[k]) if isinstance(saved.get(k), self._dtensor) else v
                for k, v in tensors.items()}

    def shard_optimizer(self, optimizer) -> None:
        """After `optimizer.load_state_dict` of a whole (one-process) state: each moment split as its parameter."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for k, v in state.items():
                    if isinstance(p, self._dtensor) and torch.is_tensor(v) and not isinstance(v, self._dtensor) \
                            and v.shape == p.shape:
                        state[k] = self._split(v, p)
