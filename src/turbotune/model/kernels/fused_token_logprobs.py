"""Per-token log-probabilities of the targets, entropies and top-1 hits of a causal LM's head, without [N, V] logits.

What TRL's trainers ask of a model called with `fused_lm_head=True`: for every position n with target y_n

    z_n        = logit_scale * (W h_n + b)   (then softcapped: c * tanh(z / c)), in fp32
    log_prob_n = z_n[y_n] - logsumexp(z_n)                   (0 where y_n == ignore_index)
    entropy_n  = logsumexp(z_n) - sum_v p_nv z_nv,  p_n = softmax(z_n)      (a metric: no gradient)
    is_top1_n  = z_n[y_n] == max_v z_nv                                     (a metric: no gradient)
    mean_n     = sum_v z_nv / V          (asked for with mean_logits=True; a metric: no gradient)

Gradient: with G_n the upstream gradient of log_prob_n (any values, e.g. -1/D for a mean loss),

    d log_prob_n / d h_n = -(p_n - e_{y_n}) * logit_scale * (1 - t_n^2) W       (t_n: the softcap's tanh)
    dL/dh_n              = G_n * d log_prob_n / d h_n

The kernel is fused_linear_ce's chunk loop with a unit weight per row (inv_denom = 1): it writes
u_n = dl_n/dh_n = -d log_prob_n/dh_n for every row in the forward, [N, H] in hidden's dtype, kept for the
backward, which only scales each row by -G_n. So the backward costs no second pass over the vocabulary, and
stays exact for any G (not only for a plain sum). The head's weight and bias must be frozen (LoRA): their
gradient would need G in the forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbotune.model.kernels.fused_linear_ce import _chunked_rows, head_inputs

__all__ = ["fused_linear_token_logprobs", "linear_token_logprobs_reference", "FusedLinearTokenLogProbsFunction"]


def linear_token_logprobs_reference(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None,
                                    logit_scale=1.0, mean_logits=False):
    """Plain PyTorch, materialising the [N, V] logits in fp32: (log_probs, entropy, is_top1[, mean logit]),
    labels' shape."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    z = F.linear(h, weight, bias).float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    log_p = torch.log_softmax(z, dim=-1)
    logp_y = torch.where(valid, log_p.gather(1, safe).squeeze(1), torch.zeros_like(valid, dtype=z.dtype))
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), torch.zeros_like(logp_y)).detach()
    top1 = valid & (z.gather(1, safe).squeeze(1) >= z.amax(-1))
    out = (logp_y.view(labels.shape), entropy.view(labels.shape), top1.view(labels.shape))
    if mean_logits:
        out += (torch.where(valid, z.mean(-1), torch.zeros_like(logp_y)).detach().view(labels.shape),)
    return out


class FusedLinearTokenLogProbsFunction(torch.autograd.Function):
    """(log_probs, entropy, is_top1, mean logit or None) [N]; keeps u = -d log_prob / d hidden [N, H] for the one
    backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, logit_scale, chunk_size, backend,
                mean_logits=False):
        if ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]):
            raise ValueError("fused_linear_token_logprobs: the head's weight and bias must be frozen")
        n = hidden.shape[0]
        unit = torch.ones(1, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        top1 = torch.empty(n, dtype=torch.int8, device=hidden.device)
        mean = torch.empty(n, dtype=torch.float32, device=hidden.device) if mean_logits else None
        stats = (entropy, top1) if mean is None else (entropy, top1, mean)
        loss_rows, grad_h, _, _ = _chunked_rows(hidden, weight, bias, labels.contiguous(), ignore_index, unit,
                                                softcap, logit_scale, chunk_size, backend,
                                                ctx.needs_input_grad[0], False, False, stats=stats)
        ctx.unit_grads = grad_h
        is_top1 = top1.bool()
        ctx.mark_non_differentiable(entropy, is_top1, *([] if mean is None else [mean]))
        return loss_rows.neg_(), entropy, is_top1, mean

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_top1, grad_mean=None):
        u = ctx.unit_grads
        if u is None:
            raise RuntimeError("fused_linear_token_logprobs: backward ran twice (its gradients are handed out once)")
        ctx.unit_grads = None
        if grad_logp is None:
            return (None,) * 10
        # d/dh of sum_n G_n log_prob_n = -G_n u_n, row by row, in hidden's dtype (u is overwritten in place).
        grad_h = u.mul_(grad_logp.neg().to(u.dtype).unsqueeze(1))
        return grad_h, None, None, None, None, None, None, None, None, None


def fused_linear_token_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None, logit_scale=1.0,
                                chunk_size=None, backend="auto", mean_logits=False):
    """(log_probs fp32, entropy fp32, is_top1 bool[, mean logit fp32 with mean_logits=True]), each of labels'
    shape, for `hidden @ weight.T (+ bias)`.

    hidden [..., H] with as many rows as labels has elements (labels already shifted: row n predicts y_n).
    Ignored positions give 0, 0, False. Under autocast, hidden and the head are cast as lm_head would be.
    """
    h2, weight, bias, y, softcap, no_autocast = head_inputs(hidden, weight, bias, labels, softcap)
    with no_autocast:
        logp, ent, top1, mean = FusedLinearTokenLogProbsFunction.apply(
            h2, weight, bias, y, ignore_index, softcap, float(logit_scale), chunk_size, backend, mean_logits)
    out = (logp.view(labels.shape), ent.view(labels.shape), top1.view(labels.shape))
    return out if mean is None else out + (mean.view(labels.shape),)
