"""RMSNorm kernel (Triton, interpreted on CPU) against the reference and HF's Llama / Qwen2 / Gemma norms."""
import os

import pytest
import torch

from turbotune.model.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference

EPS = 1e-6
CASTINGS = [("llama", 0.0), ("gemma", 1.0), ("llama", 0.5)]
SHAPES = [(2, 3, 41), (1, 1, 9), (3, 341), (5, 64)]


def _tols(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _bf16_ulps(a, b):
    """Distance in bf16 units in the last place (sign-magnitude bit patterns mapped to a line)."""
    def line(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (line(a) - line(b)).abs()


def _to_bf16_like_kernel(t):
    """fp32 -> bf16 as the kernel's store does. Triton's CPU interpreter rounds toward zero (compiled
    kernels round to nearest even), so emulate that on CPU to check the kernel's exact op sequence."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return t.to(torch.bfloat16)


def _emulated(x, w, offset, casting):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    if casting == "gemma":
        return _to_bf16_like_kernel(y * (offset + w.float()))
    v = w.float() + offset
    if w.dtype == torch.bfloat16:  # torch adds the offset in the weight's dtype
        v = _to_bf16_like_kernel(v).float()
    out = v * _to_bf16_like_kernel(y).float()
    return _to_bf16_like_kernel(out) if torch.promote_types(w.dtype, x.dtype) == torch.bfloat16 else out


def _run(x, w, offset, casting, backend, w_grad=True):
    xa = x.clone().requires_grad_()
    wa = w.clone().requires_grad_(w_grad)
    fn = rms_norm if backend else rms_norm_reference
    kw = dict(backend=backend) if backend else {}
    y = fn(xa, wa, EPS, offset, casting, **kw)
    torch.manual_seed(123)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    return y, xa.grad, wa.grad


@pytest.mark.parametrize("casting,offset", CASTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(casting, offset, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2).to(dtype)
    w = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype)
    y, dx, dw = _run(x, w, offset, casting, "triton")
    yr, dxr, dwr = _run(x, w, offset, casting, None)
    assert y.dtype == yr.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    torch.testing.assert_close(y, yr, **_tols(dtype))
    torch.testing.assert_close(dx, dxr, **_tols(dtype))
    torch.testing.assert_close(dw, dwr, **_tols(dtype))


@pytest.mark.parametrize("casting,offset", CASTINGS)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_bf16_forward_is_exact_to_one_ulp(casting, offset, wdtype):
    """Same fp32 op sequence and roundings as the reference: at most 1 ulp apart (the sum order)."""
    torch.manual_seed(0)
    x = (torch.randn(16, 341) * 2).to(torch.bfloat16)
    w = (torch.randn(341) * 0.5 + 1).to(wdtype)
    y = rms_norm(x, w, EPS, offset, casting, backend="triton")
    ref = _emulated(x, w, offset, casting)
    assert y.dtype == rms_norm_reference(x, w, EPS, offset, casting).dtype == ref.dtype
    if y.dtype == torch.bfloat16:
        assert _bf16_ulps(y, ref).max().item() <= 1
    else:  # fp32 weights on bf16 activations, llama casting: the output is fp32, products of bf16 values
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=0)


def test_mixed_dtypes_and_grads():
    """fp32 norm weights on bf16 activations (peft's prepare_model_for_kbit_training keeps norms fp32)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 41).to(torch.bfloat16)
    w = torch.randn(41) * 0.1 + 1
    for casting, offset in CASTINGS:
        y, dx, dw = _run(x, w, offset, casting, "triton")
        yr, dxr, dwr = _run(x, w, offset, casting, None)
        assert y.dtype == yr.dtype and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
        torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dx, dxr, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dw, dwr, rtol=2e-2, atol=5e-2)  # bf16 y, summed over rows


def test_saves_no_output_sized_tensor():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 41, requires_grad=True)
    w = torch.randn(41, requires_grad=True)
    y = rms_norm(x, w, EPS, backend="triton")
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    big = [t for t in saved if t.numel() == y.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # only the input itself
    rstd = [t for t in saved if t.numel() == 14]
    assert len(rstd) == 1 and rstd[0].dtype == torch.float32
    torch.testing.assert_close(rstd[0], torch.rsqrt(x.detach().pow(2).mean(-1) + EPS).flatten())


@pytest.mark.parametrize("casting,offset", CASTINGS[:2])
def test_frozen_weight(casting, offset):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 41)
    w = torch.randn(41) * 0.1 + 1
    y, dx, dw = _run(x, w, offset, casting, "triton", w_grad=False)
    yr, dxr, _ = _run(x, w, offset, casting, None, w_grad=False)
    assert dw is None
    torch.testing.assert_close(y, yr, **_tols(torch.float32))
    torch.testing.assert_close(dx, dxr, **_tols(torch.float32))
    # weight-only gradient (x needs none)
    wa = w.clone().requires_grad_()
    rms_norm(x, wa, EPS, offset, casting, backend="triton").sum().backward()
    wr = w.clone().requires_grad_()
    rms_norm_reference(x, wr, EPS, offset, casting).sum().backward()
    torch.testing.assert_close(wa.grad, wr.grad, **_tols(torch.float32))


def test_strided_inputs():
    """Row-strided views are read in place; views that can't be flattened to rows are copied."""
    torch.manual_seed(0)
    w = torch.randn(41, requires_grad=True)
    for x in (torch.randn(3, 4, 82)[..., :41], torch.randn(4, 3, 41).transpose(0, 1)):
        xa = x.detach().requires_grad_()
        y = rms_norm(xa, w, EPS, backend="triton")
        yr = rms_norm_reference(xa, w, EPS)
        torch.testing.assert_close(y, yr, **_tols(torch.float32))
        g = torch.randn(y.shape)
        dx, dw = torch.autograd.grad(y, [xa, w], g)
        dxr, dwr = torch.autograd.grad(yr, [xa, w], g)
        torch.testing.assert_close(dx, dxr, **_tols(torch.float32))
        torch.testing.assert_close(dw, dwr, **_tols(torch.float32))


def test_many_rows_per_program():
    """More rows than backward programs: each program accumulates a chunk, then the partials are summed."""
    torch.manual_seed(0)
    x = torch.randn(37, 9)
    w = torch.randn(9)
    _, dx, dw = _run(x, w, 0.0, "llama", "triton")
    _, dxr, dwr = _run(x, w, 0.0, "llama", None)
    torch.testing.assert_close(dx, dxr, **_tols(torch.float32))
    torch.testing.assert_close(dw, dwr, **_tols(torch.float32))


def test_torch_backend_and_errors():
    torch.manual_seed(0)
    x = torch.randn(3, 41)
    w = torch.randn(41)
    assert torch.equal(rms_norm(x, w, EPS, backend="torch"), rms_norm_reference(x, w, EPS))
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))  # auto on CPU
    with pytest.raises(ValueError):
        rms_norm(x, w, EPS, casting="t5", backend="triton")
    with pytest.raises(ValueError):
        rms_norm(x, w[:40], EPS, backend="triton")
    assert RMSNormFunction.apply(x, w, EPS, 0.0, "llama").shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module", ["llama", "qwen2", "gemma"])
def test_matches_hf_modules(module, dtype):
    if module == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
        casting, offset = "llama", 0.0
    elif module == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm as Norm
        casting, offset = "llama", 0.0
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as Norm
        casting, offset = "gemma", 1.0
    torch.manual_seed(0)
    norm = Norm(41, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.3)
    norm = norm.to(dtype)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = (torch.randn(3, 5, 41) * 3).to(dtype).requires_grad_()
    ref = norm(x)
    g = torch.randn(ref.shape).to(dtype)
    dx_ref, dw_ref = torch.autograd.grad(ref, [x, norm.weight], g)
    y = rms_norm(x, norm.weight, eps, offset, casting, backend="triton")
    dx, dw = torch.autograd.grad(y, [x, norm.weight], g)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, **_tols(dtype))
    torch.testing.assert_close(dx, dx_ref, **_tols(dtype))
    torch.testing.assert_close(dw, dw_ref, **(_tols(dtype) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)))
