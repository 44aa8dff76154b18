"""Compiled Triton kernels (SwiGLU/GeGLU, RMSNorm, RoPE) on CUDA against their references, in bf16.

Same checks as tests/kernels but compiled (backend="auto" must pick Triton on CUDA tensors), plus realistic
sizes (4096 tokens x 2048 / 4096 hidden, Llama-style MLP and attention shapes) and 64-bit offsets.
"""
import pytest
import torch

from turbotune.model.kernels._dispatch import use_triton
from turbotune.model.kernels.rmsnorm import rms_norm, rms_norm_reference
from turbotune.model.kernels.rope import apply_rope_, rope_reference
from turbotune.model.kernels.swiglu import (
    act_mul_backward, act_mul_forward, geglu, geglu_reference, swiglu, swiglu_reference,
)

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
TOL = dict(rtol=1e-2, atol=1e-2)
REFS = {"silu": swiglu_reference, "gelu_tanh": geglu_reference}
OPS = {"silu": swiglu, "gelu_tanh": geglu}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)


def _close_rel(got, ref, rel=1e-2):
    """Elementwise tolerance scaled to the tensor's largest value (for long reductions and grads)."""
    torch.testing.assert_close(got.float(), ref.float(), rtol=rel, atol=rel * ref.float().abs().max().item())


def _bf16_ulps(a, b):
    def line(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (line(a) - line(b)).abs()


def test_auto_picks_triton():
    assert use_triton(torch.empty(1, device="cuda"), "auto")


# ----------------------------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(2, 3, 41), (1, 1, 9), (3, 341), (4096, 11008), (2, 2048, 8192)])
def test_act_mul(act, shape):
    gate = torch.randn(shape, device="cuda", dtype=BF16) * 3
    up = torch.randn(shape, device="cuda", dtype=BF16)
    dh = torch.randn(shape, device="cuda", dtype=BF16)
    h = act_mul_forward(gate, up, act)
    ref = REFS[act](gate, up)
    torch.testing.assert_close(h, ref, **TOL)
    # one rounding of the fp32 value here: within 1 ulp of the fp64 truth. (The reference rounds twice, and
    # its gelu_tanh loses precision in 1 + tanh(z) for z << 0, so it is not the yardstick for ulps.)
    g64 = gate.double()
    if act == "silu":
        truth = g64 * torch.sigmoid(g64) * up.double()
    else:  # gelu_tanh as g * sigma(2z): no cancellation, so fp64 is exact enough everywhere
        truth = g64 * torch.sigmoid(2 * 0.7978845608028654 * (g64 + 0.044715 * g64 ** 3)) * up.double()
    big = truth.abs() > 1e-30  # ulps are meaningless where bf16 flushes to zero
    assert _bf16_ulps(h[big], truth[big].to(BF16)).max().item() <= 1
    g32, u32 = gate.float().requires_grad_(), up.float().requires_grad_()
    h32 = REFS[act](g32, u32)
    h32.backward(dh.float())
    h2, dg, du = act_mul_backward(dh, gate, up, act)
    assert torch.equal(h2, h)
    torch.testing.assert_close(dg.float(), g32.grad, **TOL)
    torch.testing.assert_close(du.float(), u32.grad, **TOL)
    # in place into the buffers, same values
    d2, ga, ua = dh.clone(), gate.clone(), up.clone()
    res = act_mul_backward(d2, ga, ua, act, inplace=True)
    assert [r.data_ptr() for r in res] == [d2.data_ptr(), ga.data_ptr(), ua.data_ptr()]
    assert torch.equal(res[0], h2) and torch.equal(res[1], dg) and torch.equal(res[2], du)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul_autograd_fused_views(act):
    gate_up = (torch.randn(4096, 2 * 5632, device="cuda", dtype=BF16)).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    w = torch.randn(4096, 5632, device="cuda", dtype=BF16)
    (OPS[act](gate, up) * w).sum().backward()
    got = gate_up.grad.clone()
    gate_up.grad = None
    g32 = gate_up.detach().float().requires_grad_()
    (REFS[act](*g32.chunk(2, dim=-1)) * w.float()).sum().backward()
    torch.testing.assert_close(got.float(), g32.grad, **TOL)


# ----------------------------------------------------------------------------------------------- rmsnorm
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("shape", [(2, 3, 41), (1, 1, 9), (3, 341), (4096, 2048), (2, 2048, 4096), (1024, 8192)])
@pytest.mark.parametrize("wdtype", [BF16, torch.float32])
def test_rmsnorm(casting, offset, shape, wdtype):
    x = (torch.randn(shape, device="cuda") * 2).to(BF16).requires_grad_()
    w = (torch.randn(shape[-1], device="cuda") * 0.3 + 1).to(wdtype).requires_grad_()
    y = rms_norm(x, w, 1e-6, offset, casting)
    ref = rms_norm_reference(x, w, 1e-6, offset, casting)
    assert y.dtype == ref.dtype
    if y.dtype == BF16:
        # same op sequence and roundings; the sum of squares is a different-order sum and rsqrt may differ
        # in the last fp32 bit, which can flip the rounding of y (then w * y can land 2 ulp away): rare
        ulps = _bf16_ulps(y, ref)
        assert ulps.max().item() <= 2 and (ulps > 0).float().mean().item() < 1e-2
    else:
        torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    g = torch.randn_like(ref)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    dx32, dw32 = torch.autograd.grad(rms_norm_reference(x32, w32, 1e-6, offset, casting), [x32, w32], g.float())
    assert dx.dtype == BF16 and dw.dtype == wdtype
    _close_rel(dx, dx32)
    _close_rel(dw, dw32)
    # frozen weight: only dx
    w.requires_grad_(False)
    dx_frozen = torch.autograd.grad(rms_norm(x, w, 1e-6, offset, casting), x, g)[0]
    assert torch.equal(dx_frozen, dx)


def test_rmsnorm_64bit_offsets():
    """x with more than 2^31 elements: rows past the int32 range are normalised correctly."""
    rows, n = (1 << 31) // 4096 + 8, 4096
    x = torch.randn(rows, n, device="cuda", dtype=BF16)
    w = torch.randn(n, device="cuda", dtype=BF16)
    y = rms_norm(x, w, 1e-6)
    tail = slice(rows - 16, rows)
    assert _bf16_ulps(y[tail], rms_norm_reference(x[tail], w, 1e-6)).max().item() <= 2
    del x, y
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- rope
def _tables(max_pos, d, dtype=BF16):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,S,Hq,Hk,D", [(3, 5, 4, 2, 80), (1, 1, 2, 1, 8), (2, 7, 3, 3, 96),
                                         (2, 2048, 32, 8, 128), (1, 4096, 16, 16, 64), (4, 1024, 40, 8, 80)])
def test_rope(B, S, Hq, Hk, D):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    x = torch.randn(B, S, 64, device="cuda", dtype=BF16, requires_grad=True)
    w = torch.randn((Hq + 2 * Hk) * D, 64, device="cuda", dtype=BF16) * 0.1
    ct, st = _tables(S + 16, D)
    pos = torch.randint(0, S + 16, (B, S), device="cuda")

    def project():
        qkv = x @ w.T
        return qkv[..., :Hq * D].view(B, S, Hq, D), qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D)

    q, k = project()
    qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), ct[pos], st[pos])
    qe, ke = qe.transpose(1, 2), ke.transpose(1, 2)
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    ref_dx = torch.autograd.grad((qe.float() * gq).sum() + (ke.float() * gk).sum(), x)[0]
    for position_ids in (None, pos):
        q, k = project()
        cos, sin = (ct[pos], st[pos]) if position_ids is None else (ct, st)
        qo, ko = apply_rope_(q, k, cos, sin, position_ids)
        assert qo.data_ptr() == q.data_ptr()
        torch.testing.assert_close(qo, qe, **TOL)
        torch.testing.assert_close(ko, ke, **TOL)
        dx = torch.autograd.grad((qo.float() * gq).sum() + (ko.float() * gk).sum(), x)[0]
        _close_rel(dx, ref_dx)
    # fp32 against the reference: tight
    q32, k32 = torch.randn(B, S, Hq, D, device="cuda"), torch.randn(B, S, Hk, D, device="cuda")
    ct32, st32 = _tables(S + 16, D, torch.float32)
    rq, rk = rope_reference(q32, k32, ct32, st32, pos)
    apply_rope_(q32, k32, ct32, st32, pos)
    torch.testing.assert_close(q32, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k32, rk, rtol=1e-5, atol=1e-5)
