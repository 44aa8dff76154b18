"""Rotary position embedding applied to q and k together, in place, in one kernel launch.

Forward, per token and head, with x = [x1, x2] split at D/2 and cos = [c1, c2], sin = [s1, s2]
(HF: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]):

    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2

Backward (the transpose of that linear map), given do = [d1, d2]:

    dx1 = d1 * c1 + d2 * s2
    dx2 = d2 * c2 - d1 * s1

HF's tables repeat the frequencies (c1 == c2, s1 == s2), so the backward is the inverse rotation: the same
map with sin negated. The kernel uses the exact transpose above, which equals it for HF's tables and stays
correct even if the halves differed.

Layout: q [batch, seq, n_q_heads, D], k [batch, seq, n_kv_heads, D] (GQA: head counts may differ), unit
stride on D, any strides elsewhere (views of the projection outputs). One program per token rotates all
its q and k heads. Positions come either
  (a) already gathered: cos/sin [batch or 1, seq, D] (what HF's rotary embedding returns), or
  (b) as tables cos/sin [max_positions, D] plus position_ids [batch or 1, seq] (packed sequences).
Everything is computed in fp32 and rounded once to q/k's dtype; HF computes in the input dtype (three
roundings in bf16), so bf16 results can differ from it by an ulp.
"""
from __future__ import annotations

import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels._triton_utils import HAS_TRITON, next_power_of_2, tl, triton

__all__ = ["rope_reference", "RoPEFunction", "apply_rope_"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _gathered(cos, sin, position_ids):
    """cos/sin per token, [batch or 1, seq, D]."""
    if position_ids is not None:
        return cos[position_ids], sin[position_ids]
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: torch.Tensor | None = None):
    """Out-of-place HF math on [batch, seq, heads, D] tensors: x * cos + rotate_half(x) * sin."""
    cos, sin = _gathered(cos, sin, position_ids)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


# --------------------------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _rotate_heads(x_ptr, c1, c2, s1, s2, base, head_stride, n_heads, half, d,
                      BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        ptrs = x_ptr + base + h[:, None] * head_stride + d[None, :]
        mask = (h[:, None] < n_heads) & (d[None, :] < half)
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(ptrs, o1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + half, o2.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, seq_len,
                     q_sb, q_ss, q_sh, k_sb, k_ss, k_sh,
                     cs_sb, cs_ss, pos_sb, pos_ss, n_qh, n_kh, half,
                     HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
        tok = tl.program_id(0)
        b = (tok // seq_len).to(tl.int64)
        s = (tok % seq_len).to(tl.int64)
        if HAS_POS:
            # table mode: row = position_ids[b, s]; cs_ss is the table's row stride
            row = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.int64)
            cs_off = row * cs_ss
        else:
            cs_off = b * cs_sb + s * cs_ss  # cs_sb == 0 when cos/sin has batch 1
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        c1 = tl.load(cos_ptr + cs_off + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cs_off + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cs_off + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cs_off + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, c1, c2, s1, s2, b * q_sb + s * q_ss, q_sh, n_qh, half, d, BACKWARD, BLOCK_QH)
        _rotate_heads(k_ptr, c1, c2, s1, s2, b * k_sb + s * k_ss, k_sh, n_kh, half, d, BACKWARD, BLOCK_KH)


def _num_warps(block_h: int, block_d: int) -> int:
    # each program holds two [BLOCK_H, BLOCK_D] fp32 tiles per tensor; ~16 elements per thread
    n = max(block_h, 1) * block_d * 2
    return 1 if n <= 512 else 2 if n <= 1024 else 4 if n <= 4096 else 8 if n <= 8192 else 16


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _writable(t: torch.Tensor) -> bool:
    """Unit stride on D and no broadcast (stride-0) dimension, so an in-place write is well defined."""
    return t.stride(-1) == 1 and all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape))


def _check(q, k, cos, sin, position_ids):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be [batch, seq, heads, head_dim]")
    B, S, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq or head_dim")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if cos.shape != sin.shape or cos.shape[-1] != D:
        raise ValueError(f"cos/sin must have the same shape ending in head_dim={D}, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if position_ids is None:
        if cos.dim() not in (2, 3) or cos.shape[-2] != S or (cos.dim() == 3 and cos.shape[0] not in (1, B)):
            raise ValueError(f"without position_ids, cos/sin must be [batch or 1, seq={S}, {D}], "
                             f"got {tuple(cos.shape)}")
    else:
        if cos.dim() != 2:
            raise ValueError(f"with position_ids, cos/sin must be tables [max_positions, {D}], got {tuple(cos.shape)}")
        if position_ids.dim() != 2 or position_ids.shape[1] != S or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must be [batch or 1, seq={S}], got {tuple(position_ids.shape)}")


def _launch(q, k, cos, sin, position_ids, backward: bool):
    """Rotate q and k in place (backward=True applies the transpose). q, k have unit stride on D."""
    B, S, n_qh, D = q.shape
    n_kh = k.shape[2]
    if B * S == 0:
        return
    cos, sin = _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if position_ids is None:
        if cos.dim() == 2:
            cs_sb, cs_ss = 0, cos.stride(0)
        else:
            cs_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
            cs_ss = cos.stride(1)
        pos, pos_sb, pos_ss = cos, 0, 0  # pos pointer unused
    else:
        cs_sb, cs_ss = 0, cos.stride(0)
        pos = position_ids
        pos_sb = 0 if pos.shape[0] == 1 else pos.stride(0)
        pos_ss = pos.stride(1)
    half = D // 2
    block_d = next_power_of_2(half)
    block_qh, block_kh = next_power_of_2(n_qh), next_power_of_2(n_kh)
    _rope_kernel[(B * S,)](
        q, k, cos, sin, pos, S,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cs_sb, cs_ss, pos_sb, pos_ss, n_qh, n_kh, half,
        HAS_POS=position_ids is not None, BACKWARD=backward,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d,
        num_warps=_num_warps(max(block_qh, block_kh), block_d))


class RoPEFunction(torch.autograd.Function):
    """In-place RoPE on q and k; the backward rotates dq, dk back in place.

    q and k are marked dirty (ctx.mark_dirty) when neither is a view. Autograd refuses mark_dirty on a view
    in a Function with two outputs, and q/k are usually views (`q_proj(x).view(B, S, H, D)`): then the data
    is still rotated in place, the version counters of q and k (and so of their bases) are bumped so any
    stale saved copy fails loudly in backward instead of giving wrong gradients, and the returned tensors
    carry this Function's history. Use the returned (q, k) downstream, not the tensors passed in.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids=None):
        _check(q, k, cos, sin, position_ids)
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("apply_rope_ needs q and k with unit stride on head_dim (it works in place)")
        for t in (q, k):
            base = t._base if t._is_view() else t
            if t.requires_grad and base.is_leaf:
                raise RuntimeError("apply_rope_ works in place: q/k must not be (views of) leaves requiring grad")
        _launch(q, k, cos, sin, position_ids, backward=False)
        if q._is_view() or k._is_view():
            torch.autograd.graph.increment_version(q)
            torch.autograd.graph.increment_version(k)
        else:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        # The incoming gradients are rotated in place. Copy when that is unsafe: a gradient without unit
        # stride on D, an expanded (overlapping) one, or dq and dk sharing memory.
        dq = dq if _writable(dq) else dq.contiguous()
        dk = dk if _writable(dk) else dk.contiguous()
        if dk.untyped_storage().data_ptr() == dq.untyped_storage().data_ptr():
            dk = dk.clone()
        _launch(dq, dk, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None, backend: str = "auto"):
    """Rotate q [B, S, Hq, D] and k [B, S, Hk, D] in place; returns (q, k) (the same tensors).

    cos/sin: per token [B or 1, S, D] when position_ids is None, else tables [max_positions, D] indexed by
    position_ids [B or 1, S]. Autograd-aware (q and k must not be leaves that require grad, as for any
    in-place op). backend="torch" computes the reference out of place and copies it back into q and k.
    """
    if not use_triton(q, backend):
        _check(q, k, cos, sin, position_ids)
        q_embed, k_embed = rope_reference(q, k, cos, sin, position_ids)
        return q.copy_(q_embed), k.copy_(k_embed)
    return RoPEFunction.apply(q, k, cos, sin, position_ids)
