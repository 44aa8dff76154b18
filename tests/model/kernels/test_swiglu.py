"""SwiGLU / GeGLU kernels (Triton, interpreted on CPU) against the PyTorch reference and HF's MLPs."""
import pytest
import torch

from turbotune.model.kernels.swiglu import (
    ActMulFunction, act_mul_backward, act_mul_forward, geglu, geglu_reference, swiglu, swiglu_reference,
)

REFS = {"silu": swiglu_reference, "gelu_tanh": geglu_reference}
OPS = {"silu": swiglu, "gelu_tanh": geglu}
SHAPES = [(2, 3, 41), (1, 1, 9), (3, 341), (1, 2, 64)]


def _tols(dtype):
    # bf16: the kernel rounds once where the reference rounds twice, and Triton's CPU interpreter truncates
    # fp32 -> bf16 instead of rounding to nearest: up to ~2 ulp (2^-7 relative).
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _inputs(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype)


def _ref_grads(gate, up, dh, act):
    """Autograd of the reference in fp32 (the exact math the kernel implements before its one rounding)."""
    g = gate.detach().float().clone().requires_grad_()
    u = up.detach().float().clone().requires_grad_()
    h = REFS[act](g, u)
    h.backward(dh.float())
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(act, dtype, shape):
    gate, up = _inputs(shape, dtype)
    h = act_mul_forward(gate, up, act, backend="triton")
    assert h.dtype == dtype and h.shape == gate.shape
    torch.testing.assert_close(h, REFS[act](gate, up), **_tols(dtype))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_autograd(act, dtype, shape):
    gate, up = _inputs(shape, dtype)
    dh = torch.randn(shape).to(dtype)
    h, dg, du = act_mul_backward(dh, gate, up, act, backend="triton")
    h_ref, dg_ref, du_ref = _ref_grads(gate, up, dh, act)
    for got, ref in ((h, h_ref), (dg, dg_ref), (du, du_ref)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref, **_tols(dtype))
    # and against autograd run in the input dtype, as HF's MLP does
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    REFS[act](g, u).backward(dh)
    torch.testing.assert_close(dg, g.grad, **_tols(dtype))
    torch.testing.assert_close(du, u.grad, **_tols(dtype))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_backward_inplace_aliases_buffers(act):
    gate, up = _inputs((3, 41), torch.bfloat16)
    dh = torch.randn(3, 41).to(torch.bfloat16)
    expect = act_mul_backward(dh, gate, up, act, backend="triton")
    d2, g2, u2 = dh.clone(), gate.clone(), up.clone()
    got = act_mul_backward(d2, g2, u2, act, backend="triton", inplace=True)
    # documented mapping: h -> dh's buffer, dgate -> gate's, dup -> up's
    assert [t.data_ptr() for t in got] == [d2.data_ptr(), g2.data_ptr(), u2.data_ptr()]
    for a, b in zip(got, expect):
        assert torch.equal(a, b)


def test_strided_gate_up_views():
    """gate/up as column halves of one fused gate_up output: no copy needed, in place writes into them."""
    torch.manual_seed(1)
    gate_up = torch.randn(2, 5, 2 * 41)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    torch.testing.assert_close(act_mul_forward(gate, up, backend="triton"), swiglu_reference(gate, up))
    dh = torch.randn(2, 5, 41)
    h_ref, dg_ref, du_ref = _ref_grads(gate, up, dh, "silu")
    h, dg, du = act_mul_backward(dh, gate, up, backend="triton", inplace=True)
    assert dg.data_ptr() == gate.data_ptr() and du.data_ptr() == up.data_ptr()
    torch.testing.assert_close(gate_up, torch.cat([dg_ref, du_ref], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_function(act, dtype):
    gate, up = _inputs((3, 1, 41), dtype)
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h1 = OPS[act](g1, u1, backend="triton")
    h2 = REFS[act](g2, u2)
    torch.testing.assert_close(h1, h2, **_tols(dtype))
    saved = h1.grad_fn.saved_tensors  # only gate and up, nothing of the output
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {g1.data_ptr(), u1.data_ptr()}
    w = torch.randn(h1.shape).to(dtype)
    (h1 * w).sum().backward(retain_graph=True)
    (h2 * w).sum().backward()
    torch.testing.assert_close(g1.grad, g2.grad, **_tols(dtype))
    torch.testing.assert_close(u1.grad, u2.grad, **_tols(dtype))
    # the Function's backward is not in place: a second backward through the graph gives the same grads
    first = g1.grad.clone()
    (h1 * w).sum().backward()
    torch.testing.assert_close(g1.grad, 2 * first)


def test_only_one_input_requires_grad():
    gate, up = _inputs((4, 9), torch.float32)
    g = gate.clone().requires_grad_()
    ActMulFunction.apply(g, up, "silu", "triton").sum().backward()
    g_ref = gate.clone().requires_grad_()
    swiglu_reference(g_ref, up).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_torch_backend(act):
    gate, up = _inputs((3, 41), torch.float32)
    dh = torch.randn(3, 41)
    assert torch.equal(act_mul_forward(gate, up, act, backend="torch"), REFS[act](gate, up))
    t = act_mul_backward(dh, gate, up, act, backend="torch")
    k = act_mul_backward(dh, gate, up, act, backend="triton")
    for a, b in zip(t, k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = gate.clone().requires_grad_()
    out = OPS[act](g, up, backend="torch")
    assert out.grad_fn is not None and torch.equal(out, REFS[act](gate, up))
    d, gg, uu = dh.clone(), gate.clone(), up.clone()
    res = act_mul_backward(d, gg, uu, act, backend="torch", inplace=True)
    assert [r.data_ptr() for r in res] == [d.data_ptr(), gg.data_ptr(), uu.data_ptr()]
    # auto on a CPU tensor is the reference
    assert torch.equal(act_mul_forward(gate, up, act), REFS[act](gate, up))


def test_bad_arguments():
    gate, up = _inputs((2, 9), torch.float32)
    with pytest.raises(ValueError):
        act_mul_forward(gate, up, "gelu", backend="triton")  # exact-erf gelu is not this op
    with pytest.raises(ValueError):
        act_mul_forward(gate, up[:, :4], backend="triton")


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_matches_hf_mlp(model):
    """HF's LlamaMLP / GemmaMLP against the same weights with the fused activation swapped in."""
    if model == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP as MLP
        cfg = LlamaConfig(hidden_size=24, intermediate_size=41, hidden_act="silu",
                          num_attention_heads=2, num_key_value_heads=2)
        act = "silu"
    else:
        from transformers import GemmaConfig
        from transformers.models.gemma.modeling_gemma import GemmaMLP as MLP
        cfg = GemmaConfig(hidden_size=24, intermediate_size=41, hidden_activation="gelu_pytorch_tanh",
                          num_attention_heads=2, num_key_value_heads=2, head_dim=12)
        act = "gelu_pytorch_tanh"
    torch.manual_seed(0)
    mlp = MLP(cfg)
    x = torch.randn(2, 3, 24, requires_grad=True)
    ref = mlp(x)
    gref = torch.autograd.grad(ref.sum(), [x, mlp.gate_proj.weight, mlp.up_proj.weight])
    out = mlp.down_proj(ActMulFunction.apply(mlp.gate_proj(x), mlp.up_proj(x), act, "triton"))
    got = torch.autograd.grad(out.sum(), [x, mlp.gate_proj.weight, mlp.up_proj.weight])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, gref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
