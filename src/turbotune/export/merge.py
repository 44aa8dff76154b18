"""Merging an adapter into the weights it was trained against, and measuring that the result behaves the same.

A QLoRA adapter was trained against the NF4-rounded base: every 4-bit weight W was used as dequant(quant(W)),
rounded to the compute dtype. Merging it into the original 16-bit W instead adds the update to different
weights, and the merged model answers differently from the adapter it came from (a common complaint about
merged QLoRA models). So `merge_into="nf4"` (the default for an adapter trained in 4 bits, or a pre-quantised
base) rebuilds the base as training saw it, the 4-bit weights dequantised bit for bit as in training
(quant.dequantize_nf4 = bitsandbytes' dequantisation) in the recorded compute dtype, then held in fp32, and
merges W' = dequant(W) + s·B·A there, in fp32. `merge_into="original"` keeps the 16-bit weights.

`logit_difference` measures the merged model against the adapter on the same base (unmerged), on a fixed
probe; the export prints it for the model as written.
"""
from __future__ import annotations

import torch
from torch import nn

MERGE_TARGETS = ("auto", "nf4", "original")
PROBE_TOKENS = 16


def merge_target(requested: str, trained_in_4bit: bool, prequantized: bool) -> str:
    """"nf4" or "original" for `requested` ("auto": nf4 when the adapter was trained on a 4-bit base)."""
    if requested not in MERGE_TARGETS:
        from turbotune.errors import ConfigError
        raise ConfigError(f"merge_into must be one of {', '.join(MERGE_TARGETS)}, got {requested!r}")
    if requested == "auto":
        return "nf4" if trained_in_4bit or prequantized else "original"
    return requested


def dequantised_base(model4: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """The 4-bit model with every bitsandbytes 4-bit linear replaced by an fp32 nn.Linear holding its weight as
    training used it (dequantised in `compute_dtype`, then widened exactly to fp32); the rest in fp32."""
    from turbotune.model.quant import dequantize_nf4

    for name, module in list(model4.named_modules()):
        for child_name, child in list(module.named_children()):
            qs = getattr(getattr(child, "weight", None), "quant_state", None)
            if qs is None:
                continue
            weight = dequantize_nf4(child.weight, dtype=compute_dtype).float()  # a shared buffer: copied next
            dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              dtype=torch.float32, device=weight.device)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if child.bias is not None:
                    dense.bias.copy_(child.bias.float())
            setattr(module, child_name, dense)
    _forget_quantisation(model4)
    return model4.float()


def _forget_quantisation(model: nn.Module) -> None:
    """What transformers recorded of the 4-bit load: the merged folder is a plain checkpoint."""
    for attr in ("is_loaded_in_4bit", "is_quantized", "hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def probe_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=g)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was)
    return out


def logit_difference(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |got - ref|, and relative to max |ref|."""
    diff = (got - ref).abs().max().item()
    return {"max_abs": diff, "relative": diff / max(ref.abs().max().item(), 1e-12)}
