"""Soft-capped causal attention (Gemma 2): the Triton kernels (interpreted on CPU) against the reference, and the
reference against transformers' own Gemma 2 eager attention."""
import pytest
import torch

from turbotune.model.kernels.softcap_attention import softcap_attention, softcap_attention_reference

CASES = [  # batch, length, query heads, kv heads, head size, window
    (2, 37, 4, 2, 16, None),
    (1, 40, 2, 2, 32, 9),
    (2, 19, 4, 1, 16, 50),  # a window longer than the sequence: plain causal
]


def _inputs(b, length, hq, hkv, d, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, length, hq, d, generator=g) * spread).requires_grad_()
    k = (torch.randn(b, length, hkv, d, generator=g) * spread).requires_grad_()
    v = torch.randn(b, length, hkv, d, generator=g).requires_grad_()
    return q, k, v


def _run(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_reference_values_and_gradients(case):
    b, length, hq, hkv, d, window = case
    q, k, v = _inputs(b, length, hq, hkv, d)
    kw = dict(scale=d ** -0.5, softcap=4.0, window=window)
    ours = _run(softcap_attention, q, k, v, backend="triton", **kw)
    ref = _run(softcap_attention_reference, q, k, v, **kw)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)


def test_the_cap_and_the_window_change_the_result():
    """The inputs drive scores well past the cap, and the window hides keys: a kernel ignoring either fails."""
    q, k, v = _inputs(1, 33, 2, 2, 16, spread=4.0)
    capped = softcap_attention(q, k, v, scale=0.25, softcap=2.0, backend="triton")
    uncapped = softcap_attention(q, k, v, scale=0.25, softcap=1e6, backend="triton")
    windowed = softcap_attention(q, k, v, scale=0.25, softcap=2.0, window=5, backend="triton")
    assert (capped - uncapped).abs().max() > 0.1 and (capped - windowed).abs().max() > 0.1
    torch.testing.assert_close(windowed[:, :5], capped[:, :5])  # the first 5 queries see every key before them


@pytest.mark.parametrize("window", [None, 6])
def test_reference_equals_transformers_gemma2_eager_attention(window):
    """The reference is transformers' Gemma 2 attention: the same cap, causal (sliding) mask and softmax."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _inputs(2, 21, 4, 2, 16)
    i, j = torch.arange(21)[:, None], torch.arange(21)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    mask = torch.zeros(21, 21).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    stock, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                       scaling=0.25, softcap=3.0)
    ours = softcap_attention_reference(q, k, v, scale=0.25, softcap=3.0, window=window)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_packed_rows_stay_inside_each_sample():
    """offsets (a packed row of three samples): the kernels against the reference, and the reference against each
    sample's own attention."""
    from turbotune.model.kernels.varlen_attention import sequence_offsets
    lengths = [11, 4, 22]
    q, k, v = _inputs(1, sum(lengths), 4, 2, 16, seed=5)
    offsets = sequence_offsets(torch.tensor(lengths[:-1]), sum(lengths), slots=8)
    kw = dict(scale=0.25, softcap=4.0, window=9, offsets=offsets)
    ours = _run(softcap_attention, q, k, v, backend="triton", **kw)
    ref = _run(softcap_attention, q, k, v, backend="torch", **kw)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)
    start, parts = 0, []
    for n in lengths:
        parts.append(softcap_attention_reference(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n],
                                                 0.25, 4.0, 9))
        start += n
    torch.testing.assert_close(ref[0], torch.cat(parts, dim=1), rtol=1e-5, atol=1e-6)
