"""Fused chunked linear + cross-entropy vs the materialising reference and F.cross_entropy (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from turbotune.model.kernels.fused_linear_ce import (default_chunk_size, fused_linear_cross_entropy,
                                                linear_cross_entropy_reference)

BACKENDS = ["torch", "triton"]


def _inputs(n, h, v, dtype=torch.float32, bias=False, train_w=True, ignore=(), seed=0, label_seed=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5 * 2).to(dtype).requires_grad_(train_w)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(label_seed or seed + 1))
    for i in ignore:
        labels[i] = -100
    return hidden, weight, b, labels


def _grads(loss, tensors):
    want = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, want)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _full_ce(hidden, weight, labels, bias=None, num_items=None, softcap=None, scale=1.0):
    """transformers-style: materialise logits, upcast, F.cross_entropy."""
    logits = F.linear(hidden, weight, bias).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,v,chunk,bias,softcap,scale,num_items", [
    (24, 1000, 7, True, None, 1.0, None),       # V not a multiple of the vocab block, chunks < N
    (19, 257, 5, False, 30.0, 1.0, None),       # softcap
    (16, 257, 16, True, None, 0.25, 40),        # logit_scale, num_items_in_batch
    (1, 257, None, False, 5.0, 2.0, None),      # N = 1
])
def test_fp32_matches_reference_and_torch_ce(backend, n, v, chunk, bias, softcap, scale, num_items):
    hidden, weight, b, labels = _inputs(n, 32, v, bias=bias, ignore=(0, 3) if n > 3 else ())
    kw = dict(bias=b, num_items_in_batch=num_items, softcap=softcap, logit_scale=scale)
    ref = linear_cross_entropy_reference(hidden, weight, labels, **kw)
    full = _full_ce(hidden, weight, labels, b, num_items, softcap, scale)
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend=backend, **kw)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(ref, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ts = (hidden, weight, b)
    for go, gr, gf in zip(_grads(out, ts), _grads(ref, ts), _grads(full, ts)):
        assert _rel(go, gr) < 1e-5
        assert _rel(go, gf) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_loose(backend):
    hidden, weight, b, labels = _inputs(20, 64, 1000, dtype=torch.bfloat16, bias=True, ignore=(2, 7))
    ref = linear_cross_entropy_reference(hidden, weight, labels, bias=b, softcap=15.0)
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=b, softcap=15.0, chunk_size=8, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    ts = (hidden, weight, b)
    for go, gr in zip(_grads(out, ts), _grads(ref, ts)):
        assert go.dtype == torch.bfloat16
        assert _rel(go, gr) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend):
    hidden, weight, b, labels = _inputs(6, 16, 100, bias=True, ignore=range(6))
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4, backend=backend)
    assert out.item() == 0.0
    for g in _grads(out, (hidden, weight, b)):
        assert torch.isfinite(g).all() and (g == 0).all()
    assert linear_cross_entropy_reference(hidden, weight, labels, bias=b).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_chunk_and_3d_hidden(backend):
    hidden, weight, _, labels = _inputs(16, 16, 300, ignore=range(4, 8))
    h3, y2 = hidden.view(2, 8, 16), labels.view(2, 8)
    ref = linear_cross_entropy_reference(h3, weight, y2)
    out = fused_linear_cross_entropy(h3, weight, y2, chunk_size=4, backend=backend)  # chunk 2 is all ignored
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (gh,) = torch.autograd.grad(out, hidden, retain_graph=False)
    (rh,) = torch.autograd.grad(ref, hidden)
    assert _rel(gh, rh) < 1e-5 and (gh[4:8] == 0).all()


def test_grad_accumulation_with_num_items_equals_full_batch():
    hidden, weight, b, labels = _inputs(30, 32, 500, bias=True, ignore=(1, 2, 17, 29))
    total = int((labels != -100).sum())
    full = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=8, backend="torch")
    g_full = _grads(full, (hidden, weight, b))
    l1 = fused_linear_cross_entropy(hidden[:13], weight, labels[:13], bias=b, num_items_in_batch=total,
                                    chunk_size=8, backend="torch")
    l2 = fused_linear_cross_entropy(hidden[13:], weight, labels[13:], bias=b,
                                    num_items_in_batch=torch.tensor(total), chunk_size=8, backend="torch")
    g1, g2 = _grads(l1, (hidden, weight, b)), _grads(l2, (hidden, weight, b))
    torch.testing.assert_close(l1 + l2, full, rtol=1e-5, atol=1e-6)
    for gf, a, c in zip(g_full, g1, g2):
        torch.testing.assert_close(a + c, gf, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_frozen_weight(backend):
    hidden, weight, _, labels = _inputs(10, 16, 130, train_w=False, ignore=(4,))
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3, backend=backend)
    (go,) = torch.autograd.grad(out * 3.5, hidden)
    (gr,) = torch.autograd.grad(ref * 3.5, hidden)
    assert _rel(go, gr) < 1e-5


def test_hidden_without_grad_and_eval():
    hidden, weight, b, labels = _inputs(9, 16, 130, bias=True)
    hidden.requires_grad_(False)
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4, backend="torch")
    ref = linear_cross_entropy_reference(hidden, weight, labels, bias=b)
    for go, gr in zip(_grads(out, (weight, b)), _grads(ref, (weight, b))):
        assert _rel(go, gr) < 1e-5
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="torch")
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert not out.requires_grad


def test_second_backward_raises():
    hidden, weight, _, labels = _inputs(4, 8, 50)
    out = fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_default_chunk_size_rule():
    # chunk logits ~ hidden states: C*V ~ N*H, power of two, floored at 512, capped at N
    assert default_chunk_size(4096, 151936, 1536) == 512          # memory rule alone: 64
    assert default_chunk_size(16384, 32000, 4096) == 4096         # 16384*4096/32000 = 2097.2 -> 4096
    assert default_chunk_size(100, 151936, 1536) == 100           # never more than N
    assert default_chunk_size(1, 10, 10) == 1
