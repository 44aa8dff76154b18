"""Per-token log-probs, entropies and top-1 hits of the fused head against the materialising reference (CPU,
Triton under the interpreter), gradients under an arbitrary upstream gradient included."""
import pytest
import torch

from turbotune.model.kernels.fused_token_logprobs import fused_linear_token_logprobs, linear_token_logprobs_reference

BACKENDS = ["torch", "triton"]


def _inputs(shape, h, v, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    with torch.no_grad():  # some targets are the top-1 logit, so is_top1 has hits to find
        top = torch.nn.functional.linear(hidden.float(), weight.float(), None if b is None else b.float()).argmax(-1)
    labels.view(-1)[1::3] = top.view(-1)[1::3]
    labels.view(-1)[::5] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,v,chunk,bias,softcap,scale", [
    ((3, 8), 1000, 7, True, None, 1.0),       # [B, L] labels, chunks < N, V not a multiple of the vocab block
    ((19,), 257, 5, False, 30.0, 1.0),        # softcap
    ((2, 5), 257, None, False, None, 0.25),   # logit_scale
])
def test_values_and_gradients_match_reference(backend, shape, v, chunk, bias, softcap, scale):
    hidden, weight, b, labels = _inputs(shape, 32, v, bias=bias)
    kw = dict(bias=b, softcap=softcap, logit_scale=scale)
    ref = linear_token_logprobs_reference(hidden, weight, labels, **kw)
    got = fused_linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, backend=backend, **kw)
    ignored = labels == -100
    for r, o in zip(ref, got):
        assert o.shape == labels.shape and o.dtype == r.dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], ref[2]) and not got[2][ignored].any() and got[2].any()
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and not got[1].requires_grad
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))  # not a plain sum
    (g_ref,) = torch.autograd.grad((ref[0] * upstream).sum(), hidden)
    (g_got,) = torch.autograd.grad((got[0] * upstream).sum(), hidden)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_and_no_grad(backend):
    hidden, weight, _, labels = _inputs((4, 6), 32, 300, dtype=torch.bfloat16)
    ref = linear_token_logprobs_reference(hidden, weight, labels)
    with torch.no_grad():
        got = fused_linear_token_logprobs(hidden, weight, labels, backend=backend)
    torch.testing.assert_close(got[0], ref[0].detach(), rtol=2e-2, atol=2e-2)
    assert not got[0].requires_grad


def test_trainable_head_is_refused():
    hidden, weight, _, labels = _inputs((4,), 16, 50)
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_token_logprobs(hidden, weight.requires_grad_(), labels, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v,chunk,softcap,scale", [(1000, 7, None, 1.0), (257, 5, 30.0, 0.5)])
def test_mean_logits_match_reference(backend, v, chunk, softcap, scale):
    """mean_logits=True (TRL's `mean_logits`): each target row's mean logit after scale and softcap, 0 where
    ignored; the other outputs and the gradient are unchanged."""
    hidden, weight, b, labels = _inputs((3, 8), 32, v, bias=True)
    kw = dict(bias=b, softcap=softcap, logit_scale=scale)
    ref = linear_token_logprobs_reference(hidden, weight, labels, mean_logits=True, **kw)
    got = fused_linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, backend=backend, mean_logits=True,
                                      **kw)
    assert len(got) == 4 and got[3].shape == labels.shape and not got[3].requires_grad
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5)
    assert (got[3][labels == -100] == 0).all() and got[3].abs().sum() > 0
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref[0].sum(), hidden)
    (g_got,) = torch.autograd.grad(got[0].sum(), hidden)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
