"""Fused, chunked lm_head + cross-entropy: the loss of a causal LM without materialising its [N, V] logits.

Forward equations (per token row n, hidden h_n in R^H, lm_head weight W in R^{V x H}, optional bias b):

    o_n   = W h_n + b                                   raw logits (model dtype, as nn.Linear gives them)
    z0_n  = logit_scale * o_n                           in fp32
    z_n   = c * tanh(z0_n / c)   if softcap c else z0_n
    l_n   = logsumexp(z_n) - z_n[y_n]                   per-token loss (0 where y_n == ignore_index)
    loss  = (sum_n l_n) / D,   D = num_items_in_batch if given else #{n : y_n != ignore_index}
                               (D is clamped to >= 1, so a batch with no targets gives loss 0, grads 0)

Gradients (p_n = softmax(z_n), e_y the one-hot of the target, t_n = tanh(z0_n / c)):

    dloss/dz_n  = (p_n - e_y) / D                        (0 for ignored rows)
    dloss/dz0_n = dloss/dz_n * (1 - t_n^2)               (softcap only: d(c tanh(u/c))/du = 1 - tanh^2)
    dloss/do_n  = logit_scale * dloss/dz0_n  =: g_n      ("dlogits", written over the chunk's logits)
    dloss/dh_n  = g_n W                                  [N, V] x [V, H]
    dloss/dW    = sum_n g_n^T h_n                        [V, N] x [N, H]  (only when W is trainable)
    dloss/db    = sum_n g_n                              (only when the bias is trainable)

How it runs: the whole backward is computed inside the autograd forward, `chunk_size` rows at a time. For a
chunk: logits = hidden_chunk @ W^T (+ b) into one reused [C, V] buffer in the model dtype; a row kernel (Triton:
one program per row, online max / sum-exp over vocab blocks in fp32, then a second sweep that writes g_n back
over the row; PyTorch on CPU, still chunked) gives l_n and g_n; then grad_hidden[chunk] = g @ W and grad_W +=
g^T @ hidden_chunk. What is kept for backward: grad_hidden [N, H] (and grad_W / grad_bias when trainable) --
not the hidden states, not the logits. The autograd backward only multiplies these by grad_output (skipped
when it is exactly 1.0, the usual case) and hands them out once.

Numerics: the logits are rounded to the model dtype before the fp32 loss math, like `lm_head(h).float()` in
transformers, and g is rounded to the model dtype, like autograd's gradient of bf16 logits. grad_W is
accumulated across chunks in W's dtype (addmm accumulates each chunk in fp32; the running sum is rounded once
per chunk). fp16: g already carries 1/D when it is rounded (before any GradScaler factor), so very small
probabilities can flush to zero -- prefer bf16.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from turbotune._compat import autocast_dtype
from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, next_power_of_2, tl, triton

__all__ = ["linear_cross_entropy_reference", "fused_linear_cross_entropy", "default_chunk_size",
           "FusedLinearCrossEntropyFunction"]

# Floor on the rows per chunk. Each chunk's GEMMs ([C, H] x [H, V]) stream all of W and do ~C flops per byte of
# it (bf16); small chunks are bandwidth-bound. Measured on an H200 (N=4096, H=1536, V=151936, bf16, fwd+bwd,
# frozen W / trainable W): C=64: 20.2 / 45.1 ms, 128: 11.3 / 23.8, 256: 7.7 / 14.0, 512: 7.1 / 11.1,
# 1024: 7.0 / 10.2; the unfused reference: 12.9 / 15.4 ms at a 7.1 GB peak (fused, C=512: 160 MB).
MIN_CHUNK = 512
# Vocab tile of the row kernel (elements per step of the online softmax); 8 warps keep 16 fp32 per thread.
CE_BLOCK_V = 4096
CE_WARPS = 8


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: the chunk's logits take about as much memory as the hidden states.

    Memory math (model dtype of b bytes): the unfused path holds the logits [N, V] (b bytes each), their fp32
    copy for the loss (4) and its fp32 gradient (4): about N*V*(b + 8) bytes -- 6 GB for N=4096,
    V=151936, bf16. The fused path holds one [C, V] buffer (logits, overwritten by their gradient) plus
    grad_hidden [N, H]. Setting C*V ~= N*H makes the chunk as large as the hidden states:

        C = next_pow2(ceil(N * H / V)), clamped to [MIN_CHUNK, N]

    The power of two keeps the number of distinct GEMM shapes small; the MIN_CHUNK floor (512) keeps the
    per-chunk GEMMs out of the bandwidth-bound regime (each streams all of W once per chunk): with V=151936 and
    H=1536 the memory rule alone would give 64 rows, 2.8x slower than 512 rows on an H200, and 512 rows cost
    only 156 MB of bf16 logits against the unfused path's ~7 GB peak.
    """
    if n_tokens <= 0:
        return 1
    c = next_power_of_2(max(1, math.ceil(n_tokens * hidden / max(vocab, 1))))
    return int(max(1, min(n_tokens, max(MIN_CHUNK, c))))


# --------------------------------------------------------------------------------------------- reference
def linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100, num_items_in_batch=None,
                                   softcap=None, logit_scale=1.0):
    """Plain PyTorch: materialises the [N, V] logits, upcast to fp32 (what transformers' loss does)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    logits = F.linear(h, weight, bias).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    return total / _denominator(y, ignore_index, num_items_in_batch)


def _denominator(labels, ignore_index, num_items_in_batch) -> torch.Tensor:
    """D as a 0-dim fp32 tensor on labels' device (no host sync), clamped to >= 1."""
    if num_items_in_batch is None:
        d = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        d = num_items_in_batch.to(device=labels.device)
    else:
        d = torch.tensor(float(num_items_in_batch), device=labels.device)
    return d.float().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- row kernels
if HAS_TRITON:

    @triton.jit
    def _capped(o, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """(z, t): z = softcap * tanh(scale * o / softcap) (or scale * o), t the tanh (fp32)."""
        z = o * scale
        if HAS_SOFTCAP:
            # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp -> inf gives 1, exp -> 0 gives -1)
            t = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
            z = softcap * t
        else:
            t = z
        return z, t

    @triton.jit
    def _capped_tile(ptr, off, n_cols, scale, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """(cols, mask, z, t) of the row's vocab tile at `off`: its columns, which of them are in the row, and
        `_capped` of its logits (read in fp32, 0 past the row's end)."""
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        o = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z, t = _capped(o, scale, softcap, HAS_SOFTCAP)
        return cols, mask, z, t

    @triton.jit
    def _ce_rows_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, inv_denom_ptr, ent_ptr, top1_ptr, mean_ptr,
                        n_cols, ignore_index, scale, softcap, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        WRITE_STATS: tl.constexpr, WRITE_MEAN: tl.constexpr, BLOCK_V: tl.constexpr):
        # One program per row. Sweep 1: online max m and sum-exp d over vocab tiles. Sweep 2: overwrite the
        # row with g = scale * (1 - t^2) * (softmax - onehot) / D in the logits' dtype and, with WRITE_STATS,
        # sum p * z for the entropy lse - sum p z; the target is top-1 when z_y reaches the row's max. With
        # WRITE_MEAN, sweep 1 also sums z for the row's mean logit (TRL's mean_logits).
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if WRITE_STATS:
                tl.store(ent_ptr + row, 0.0)
                tl.store(top1_ptr + row, 0)
            if WRITE_MEAN:
                tl.store(mean_ptr + row, 0.0)
            if WRITE_GRAD:
                for off in range(0, n_cols, BLOCK_V):
                    cols = off + tl.arange(0, BLOCK_V)
                    tl.store(ptr + cols, tl.zeros([BLOCK_V], tl.float32).to(logits_ptr.dtype.element_ty),
                             mask=cols < n_cols)
            return
        m = float("-inf")
        d = 0.0
        zsum = 0.0
        for off in range(0, n_cols, BLOCK_V):
            _, mask, z, _ = _capped_tile(ptr, off, n_cols, scale, softcap, HAS_SOFTCAP, BLOCK_V)
            if WRITE_MEAN:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        if WRITE_MEAN:
            tl.store(mean_ptr + row, zsum / n_cols)
        o_y = tl.load(ptr + label).to(tl.float32)
        z_y, _ = _capped(o_y, scale, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - z_y)
        if WRITE_GRAD or WRITE_STATS:
            coef = scale * tl.load(inv_denom_ptr)
            pz = 0.0
            for off in range(0, n_cols, BLOCK_V):
                cols, mask, z, t = _capped_tile(ptr, off, n_cols, scale, softcap, HAS_SOFTCAP, BLOCK_V)
                p = tl.exp(z - lse)
                if WRITE_STATS:
                    pz += tl.sum(tl.where(mask, p * z, 0.0), axis=0)
                if WRITE_GRAD:
                    g = tl.where(cols == label, p - 1.0, p)
                    if HAS_SOFTCAP:
                        g = g * (1.0 - t * t)
                    tl.store(ptr + cols, (g * coef).to(logits_ptr.dtype.element_ty), mask=mask)
            if WRITE_STATS:
                tl.store(ent_ptr + row, lse - pz)
                tl.store(top1_ptr + row, (z_y >= m).to(tl.int8))


def _ce_rows_triton(logits, labels, loss_rows, inv_denom, ignore_index, scale, softcap, write_grad, stats=None):
    rows, n_cols = logits.shape
    block = min(CE_BLOCK_V, max(16, next_power_of_2(n_cols)))
    ent, top1, mean = (*stats, None)[:3] if stats is not None else (loss_rows, loss_rows, None)  # unused if not
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, loss_rows, inv_denom, ent, top1, loss_rows if mean is None else mean,
        n_cols, ignore_index, float(scale), float(softcap if softcap is not None else 1.0),
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, WRITE_STATS=stats is not None,
        WRITE_MEAN=mean is not None, BLOCK_V=block, num_warps=CE_WARPS)


def _ce_rows_torch(logits, labels, loss_rows, inv_denom, ignore_index, scale, softcap, write_grad, stats=None):
    """Same contract as the kernel, in PyTorch on one chunk: loss rows into `loss_rows`, g over `logits`,
    and with `stats` = (entropy, top1[, mean]) the rows' entropies, whether each target is a top-1 logit and
    (if a third buffer is given) each row's mean logit."""
    z = logits.float()
    if scale != 1.0:
        z = z * scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, safe).squeeze(1)
    loss_rows.copy_(torch.where(valid, lse - z_y, torch.zeros_like(lse)))
    if stats is not None:
        ent, top1 = stats[:2]
        if len(stats) > 2:
            stats[2].copy_(torch.where(valid, z.mean(-1), torch.zeros_like(lse)))
        p = torch.softmax(z, dim=-1)
        ent.copy_(torch.where(valid, lse - (p * z).sum(-1), torch.zeros_like(lse)))
        top1.copy_(valid & (z_y >= z.amax(-1)))
    if not write_grad:
        return
    g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the fp32 scratch
    g.scatter_add_(1, safe, -valid.to(g.dtype).unsqueeze(1))
    if t is not None:
        g.mul_(1.0 - t * t)
    g.mul_((valid.to(g.dtype) * (inv_denom * scale)).unsqueeze(1))
    logits.copy_(g)


# --------------------------------------------------------------------------------------------- the chunk loop
def _chunked_rows(hidden, weight, bias, labels, ignore_index, inv_denom, softcap, logit_scale, chunk_size, backend,
                  need_h, need_w, need_b, stats=None):
    """Per-row losses l_n [N] fp32 and, as asked, dloss/dhidden [N, H], dloss/dW, dloss/db (loss = sum_n l_n *
    inv_denom), `chunk_size` rows at a time through one reused [C, V] logits buffer. `stats` = (entropy [N]
    fp32, top1 [N] int8[, mean logit [N] fp32]) buffers to fill as well."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
    c = chunk_size or default_chunk_size(n, vocab, hdim)
    buf = torch.empty(min(c, n), vocab, dtype=hidden.dtype, device=hidden.device) if n else None
    w_t = weight.t()
    b = bias.to(hidden.dtype) if bias is not None else None
    rows_fn = _ce_rows_triton if use_triton(hidden, backend) else _ce_rows_torch
    for start in range(0, n, c):
        end = min(start + c, n)
        h = hidden[start:end]
        logits = buf[: end - start]
        if b is None:
            torch.mm(h, w_t, out=logits)
        else:
            torch.addmm(b, h, w_t, out=logits)
        chunk_stats = None if stats is None else tuple(x[start:end] for x in stats)
        rows_fn(logits, labels[start:end], loss_rows[start:end], inv_denom, ignore_index, logit_scale, softcap,
                need_h or need_w or need_b, chunk_stats)
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if need_w:
            grad_w.addmm_(logits.t(), h)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    return loss_rows, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------- autograd
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """loss = CE(hidden @ W^T + b); the gradients are computed in forward, chunk by chunk (module docstring).

    Kept for backward (as ctx attributes, released after the one backward): grad_hidden [N, H] in hidden's
    dtype when hidden requires grad, grad_W [V, H] in W's dtype and grad_b [V] in fp32 when those are trainable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, num_items_in_batch, softcap, logit_scale,
                chunk_size, backend):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        ctx.bias_dtype = bias.dtype if bias is not None else None
        labels = labels.contiguous()
        inv_denom = (1.0 / _denominator(labels, ignore_index, num_items_in_batch)).reshape(1)
        loss_rows, grad_h, grad_w, grad_b = _chunked_rows(hidden, weight, bias, labels, ignore_index, inv_denom,
                                                          softcap, logit_scale, chunk_size, backend,
                                                          need_h, need_w, need_b)
        ctx.grads = (grad_h, grad_w, grad_b)
        # A fresh 0-d tensor, not a view: trainers scale the loss in place (loss /= grad_accum).
        return loss_rows.sum() * inv_denom[0]

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward ran twice (its gradients are handed out once)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        # Always scale (an exact no-op for the usual grad_output == 1): testing it with .item() would make the
        # host wait for the device once per micro-batch, and a host-bound step cannot afford that stall.
        grad_h = grad_h.mul_(grad_output) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_output) if grad_w is not None else None
        grad_b = grad_b.mul_(grad_output) if grad_b is not None else None
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, num_items_in_batch=None,
                               softcap=None, logit_scale=1.0, chunk_size=None, backend="auto"):
    """CE loss of `hidden @ weight.T (+ bias)` against `labels` (already shifted), never holding [N, V] logits.

    hidden [..., H] (flattened to [N, H]), weight [V, H], labels [...] with N elements. Reduction: sum over
    non-ignored tokens / num_items_in_batch (or / their count here). Returns a 0-dim fp32 tensor.
    Under autocast, hidden / weight / bias are cast to the autocast dtype first (as lm_head would be).
    """
    h2, weight, bias, y, softcap, no_autocast = head_inputs(hidden, weight, bias, labels, softcap)
    with no_autocast:
        return FusedLinearCrossEntropyFunction.apply(h2, weight, bias, y, ignore_index, num_items_in_batch, softcap,
                                                     float(logit_scale), chunk_size, backend)


def head_inputs(hidden, weight, bias, labels, softcap):
    """The head's inputs as the chunk loop takes them: hidden [N, H] contiguous, labels [N] on its device, the
    weight (and bias) in hidden's dtype or, under autocast, everything in the autocast dtype as lm_head would
    run, with a context that switches autocast off for the loop itself; softcap <= 0 read as none."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h2.device)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} elements but hidden has {h2.shape[0]} rows")
    if weight.shape[-1] != h2.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {h2.shape[-1]}")
    if softcap is not None and softcap <= 0:
        softcap = None
    amp = autocast_dtype(h2.device.type)
    if amp is not None:
        h2, weight = h2.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    elif weight.dtype != h2.dtype:
        weight = weight.to(h2.dtype)
    no_autocast = torch.autocast(h2.device.type, enabled=False) if amp is not None else contextlib.nullcontext()
    return h2.contiguous(), weight, bias, y, softcap, no_autocast

