"""Causal attention with soft-capped scores (Gemma 2), tiled: no [L, L] score matrix.

Gemma 2 caps every attention score: s = c · tanh(q·k · scale / c) (c = `attn_logit_softcapping`, 50). No
kernel PyTorch ships takes that cap (SDPA, FlashAttention), so transformers runs Gemma 2 on its eager attention:
a [B, H, L, L] score matrix in the compute dtype, its soft-cap, mask, softmax in fp32 and the product with V, each a
pass over L² values in memory, twice more in the backward, and no skipping of the causal half. At 2,048 tokens
that is most of a Gemma 2 9B layer's memory traffic.

These kernels keep the scores in registers, FlashAttention's way: the forward visits the key tiles at or below
each query tile's diagonal (and inside the window), keeps a running max and sum per query row, and saves the rows'
log-sum-exp; the backward recomputes the scores from it. The cap enters the backward through its derivative,
d s / d x = 1 − (s / c)².

    key j is visible to query i  iff  j <= i  (and i − j < window for a sliding-window layer)

Layout: q [B, L, Hq, D], k and v [B, L, Hkv, D] (Hq a multiple of Hkv: grouped-query heads read their group's
K/V), the layout the projections produce; the output is [B, L, Hq, D]. No padding: the caller runs it for batches
of whole sequences (the kernels work out the causal mask from positions), or for packed rows given their samples'
offsets (varlen_attention.sequence_offsets; each token's sample start then bounds its keys from below).
`softcap_attention_reference` is the same function in plain PyTorch (fp32 scores, an explicit mask): the CPU path
and what the tests compare against. Behind TURBOTUNE_SOFTCAP_ATTENTION=1 until its GPU tests have run.
"""
from __future__ import annotations

import os

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, tl, triton
from turbotune.model.kernels.flash_support import run_flash_or_reference
from turbotune.model.kernels.varlen_attention import sample_starts, visible_keys


def softcap_attention_enabled() -> bool:
    """TURBOTUNE_SOFTCAP_ATTENTION=1 runs Gemma 2's attention on these kernels (off until the GPU tests have run:
    built in the eleventh session without GPU time)."""
    return os.environ.get("TURBOTUNE_SOFTCAP_ATTENTION", "0") == "1"


def softcap_attention_reference(q, k, v, scale: float, softcap: float, window: int | None = None, starts=None):
    """Plain PyTorch: fp32 scores, the cap, the causal (window, sample) mask, fp32 softmax; output in q's dtype."""
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, L, D]
    group = qt.shape[1] // kt.shape[1]
    if group > 1:
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible_keys(q.shape[1], window, starts, q.device), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vt)
    return out.transpose(1, 2).to(q.dtype)


if HAS_TRITON:
    @triton.jit
    def _tanh(x):
        # tanh from exp (no libdevice call, so it runs under the CPU interpreter too); saturates to ±1
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _scores(q, k, offs_m, offs_n, length, scale, softcap, window, starts_m,
                HAS_WINDOW: tl.constexpr, HAS_STARTS: tl.constexpr):
        """Capped scores of one tile (fp32) with -inf where the key is not visible, and tanh of the cap.
        `starts_m`: each query row's sample start in a packed row (HAS_STARTS)."""
        x = tl.dot(q, tl.trans(k)) * scale
        t = _tanh(x / softcap)
        s = t * softcap
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < length)
        if HAS_WINDOW:
            visible = visible & (offs_m[:, None] - offs_n[None, :] < window)
        if HAS_STARTS:
            visible = visible & (offs_n[None, :] >= starts_m[:, None])
        return tl.where(visible, s, float("-inf")), t

    @triton.jit
    def _starts(STARTS, offs_m, length, HAS_STARTS: tl.constexpr):
        if HAS_STARTS:
            return tl.load(STARTS + offs_m, mask=offs_m < length, other=0)
        return offs_m * 0

    @triton.jit
    def _tile(P, b, h, offs, sb, sl, sh, offs_d, length):
        """Rows `offs` of head h of batch b ([len(offs), D]; zeros past the sequence)."""
        return tl.load(P + b * sb + h * sh + offs[:, None] * sl + offs_d[None, :], mask=(offs < length)[:, None],
                       other=0.0)

    @triton.jit
    def _query_tile(heads, group, BLOCK_M: tl.constexpr, D: tl.constexpr):
        """This program's query tile: its index, (batch·head, batch, head, kv head), row and column offsets."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        return pid_m, bh, bh // heads, h, h // group, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, D)

    @triton.jit
    def _key_range(pid_m, length, window, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The key tiles query tile pid_m sees: up to its diagonal, from its window's start (a tile boundary)."""
        hi = tl.minimum((pid_m + 1) * BLOCK_M, length)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pid_m * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        return lo, hi

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, STARTS, sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                    length, heads, group, scale, softcap, window,
                    HAS_WINDOW: tl.constexpr, HAS_STARTS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        pid_m, bh, b, h, hk, offs_m, offs_d = _query_tile(heads, group, BLOCK_M, D)
        rows = offs_m < length
        q = _tile(Q, b, h, offs_m, sqb, sql, sqh, offs_d, length)
        starts_m = _starts(STARTS, offs_m, length, HAS_STARTS)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        lo, hi = _key_range(pid_m, length, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = _tile(K, b, hk, offs_n, skb, skl, skh, offs_d, length)
            v = _tile(V, b, hk, offs_n, svb, svl, svh, offs_d, length)
            s, _t = _scores(q, k, offs_m, offs_n, length, scale, softcap, window, starts_m, HAS_WINDOW, HAS_STARTS)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=rows[:, None])
        tl.store(LSE + bh * length + offs_m, m_i + tl.log(l_safe), mask=rows)

    @triton.jit
    def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, STARTS,
                       sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdob, sdol, sdoh,
                       sdkb, sdkl, sdkh, sdvb, sdvl, sdvh,
                       length, heads, kv_heads, group, scale, softcap, window,
                       HAS_WINDOW: tl.constexpr, HAS_STARTS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """dK and dV of one key tile: every query head of the group, every query tile that sees the keys."""
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // kv_heads
        hk = bhk % kv_heads
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        cols = offs_n < length
        k = _tile(K, b, hk, offs_n, skb, skl, skh, offs_d, length)
        v = _tile(V, b, hk, offs_n, svb, svl, svh, offs_d, length)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        lo = pid_n * BLOCK_N // BLOCK_M * BLOCK_M
        hi = length
        if HAS_WINDOW:
            hi = tl.minimum((pid_n + 1) * BLOCK_N + window - 1, length)
        for g in range(0, group):
            h = hk * group + g
            bh = b * heads + h
            for start in range(lo, hi, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                rows = offs_m < length
                q = _tile(Q, b, h, offs_m, sqb, sql, sqh, offs_d, length)
                do = _tile(DO, b, h, offs_m, sdob, sdol, sdoh, offs_d, length)
                lse = tl.load(LSE + bh * length + offs_m, mask=rows, other=0.0)
                delta = tl.load(DELTA + bh * length + offs_m, mask=rows, other=0.0)
                starts_m = _starts(STARTS, offs_m, length, HAS_STARTS)
                s, t = _scores(q, k, offs_m, offs_n, length, scale, softcap, window, starts_m, HAS_WINDOW,
                               HAS_STARTS)
                p = tl.where(rows[:, None], tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None]) * (1.0 - t * t)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkl + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None])
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvl + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=cols[:, None])

    @triton.jit
    def _bwd_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, STARTS,
                      sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdob, sdol, sdoh, sdqb, sdql, sdqh,
                      length, heads, group, scale, softcap, window,
                      HAS_WINDOW: tl.constexpr, HAS_STARTS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """dQ of one query tile, over the key tiles it sees."""
        pid_m, bh, b, h, hk, offs_m, offs_d = _query_tile(heads, group, BLOCK_M, D)
        rows = offs_m < length
        q = _tile(Q, b, h, offs_m, sqb, sql, sqh, offs_d, length)
        do = _tile(DO, b, h, offs_m, sdob, sdol, sdoh, offs_d, length)
        lse = tl.load(LSE + bh * length + offs_m, mask=rows, other=0.0)
        delta = tl.load(DELTA + bh * length + offs_m, mask=rows, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        starts_m = _starts(STARTS, offs_m, length, HAS_STARTS)
        lo, hi = _key_range(pid_m, length, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = _tile(K, b, hk, offs_n, skb, skl, skh, offs_d, length)
            v = _tile(V, b, hk, offs_n, svb, svl, svh, offs_d, length)
            s, t = _scores(q, k, offs_m, offs_n, length, scale, softcap, window, starts_m, HAS_WINDOW, HAS_STARTS)
            p = tl.where(rows[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None]) * (1.0 - t * t)
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdql + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


def _blocks(d: int, interpret: bool) -> dict:
    """Tiles and launch settings: small tiles in the interpreter; on a GPU, tiles that keep a 256-wide head's
    q, k, v and accumulators within the registers and shared memory of one SM (fewer pipeline stages there)."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
    if d > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


class SoftcapAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, window, starts):
        bsz, length, heads, d = q.shape
        kv_heads = k.shape[2]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty_like(q)
        lse = torch.empty(bsz * heads, length, device=q.device, dtype=torch.float32)
        tiles = _blocks(d, not q.is_cuda)
        grid = (triton.cdiv(length, tiles["BLOCK_M"]), bsz * heads)
        _fwd_kernel[grid](q, k, v, out, lse, lse if starts is None else starts, q.stride(0), q.stride(1),
                          q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                          out.stride(0), out.stride(1), out.stride(2), length, heads, heads // kv_heads, scale,
                          softcap, window or 0, HAS_WINDOW=window is not None, HAS_STARTS=starts is not None,
                          D=d, **tiles)
        ctx.save_for_backward(q, k, v, out, lse, *(() if starts is None else (starts,)))
        ctx.scale, ctx.softcap, ctx.window = scale, softcap, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *starts = ctx.saved_tensors
        starts = starts[0] if starts else None
        bsz, length, heads, d = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        # delta = rowsum(dO ∘ O): the softmax backward's per-row term, [B·H, L] like the log-sum-exp
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).reshape(bsz * heads, length).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tiles = _blocks(d, not q.is_cuda)
        window = ctx.window or 0
        flags = dict(HAS_WINDOW=ctx.window is not None, HAS_STARTS=starts is not None, D=d, **tiles)
        starts = lse if starts is None else starts  # a pointer the kernels don't read without HAS_STARTS
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
        _bwd_kv_kernel[(triton.cdiv(length, tiles["BLOCK_N"]), bsz * kv_heads)](
            q, k, v, dout, lse, delta, dk, dv, starts, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2), length, heads, kv_heads, group, ctx.scale, ctx.softcap, window,
            **flags)
        _bwd_q_kernel[(triton.cdiv(length, tiles["BLOCK_M"]), bsz * heads)](
            q, k, v, dout, lse, delta, dq, starts, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            length, heads, group, ctx.scale, ctx.softcap, window, **flags)
        return dq, dk, dv, None, None, None, None


def kernel_shapes_ok(q, k, v) -> bool:
    """A head size the tiles take (a power of two from 16 to 256), GQA heads, matching dtypes."""
    d = q.shape[-1]
    return (16 <= d <= 256 and d & (d - 1) == 0 and v.shape[-1] == d and k.shape[-1] == d
            and q.shape[-2] % k.shape[-2] == 0 and q.dtype == k.dtype == v.dtype)


def softcap_attention(q, k, v, scale: float, softcap: float, window: int | None = None, offsets=None,
                      backend: str = "auto"):
    """Causal soft-capped attention (see the module docstring): the Triton kernels on a GPU, the reference
    elsewhere. `window` None (or not shorter than the sequence) means plain causal. `offsets`: a packed row's
    sample offsets (varlen_attention.sequence_offsets; batch of one row): attention stays inside each sample."""
    if window is not None and window >= q.shape[1]:
        window = None
    starts = None if offsets is None else sample_starts(offsets, q.shape[1])
    # On a GPU only 16-bit inputs: an fp32 tl.dot would run in TF32 there (the interpreter's is exact fp32)
    gpu_ok = not q.is_cuda or q.dtype in (torch.bfloat16, torch.float16)
    if not (kernel_shapes_ok(q, k, v) and gpu_ok and use_triton(q, backend)):
        return softcap_attention_reference(q, k, v, scale, softcap, window, starts)
    run = lambda: SoftcapAttentionFunction.apply(q, k, v, float(scale), float(softcap), window, starts)  # noqa: E731
    if not q.is_cuda:  # the CPU interpreter (tests)
        return run()
    # The first call on a device, dtype and head size compiles forward and backward on a small probe, so a tile
    # that does not fit this GPU falls back here, not in the middle of a backward pass (flash_support).
    kind = "softcap" + ("-window" if window is not None else "") + ("-packed" if starts is not None else "")
    return run_flash_or_reference(kind, q, run,
                                  lambda: softcap_attention_reference(q, k, v, scale, softcap, window, starts),
                                  "the soft-capped attention kernels", errors=(Exception,),
                                  first=lambda: _probe(q, k, window, starts is not None))


def _probe(q, k, window, packed: bool):
    """Forward and backward of the kernels on a 2-tile sequence shaped like q and k (compiles the variant)."""
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    with torch.enable_grad():  # the first call may come from a no-grad pass (a reference model's forward)
        x = torch.randn(1, 128, heads, d, device=q.device, dtype=q.dtype, requires_grad=True)
        y = torch.randn(1, 128, kv_heads, d, device=q.device, dtype=q.dtype, requires_grad=True)
        starts = sample_starts(torch.tensor([0, 50, 128], dtype=torch.int32, device=q.device), 128) if packed else None
        out = SoftcapAttentionFunction.apply(x, y, y, d ** -0.5, 50.0, None if window is None else 64, starts)
        out.sum().backward()
    torch.cuda.synchronize(q.device)
