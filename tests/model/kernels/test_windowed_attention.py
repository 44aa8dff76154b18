"""Sliding-window causal attention without a mask from transformers (model/kernels/windowed_attention.py): the
window's convention is transformers' own, and the function equals attention written out by hand (CPU: the
masked-SDPA reference; the FlashAttention window is compared with it in tests/gpu/test_windowed_attention_gpu.py)."""
import pytest
import torch

from turbotune.model.kernels.windowed_attention import window_mask, windowed_attention


@pytest.mark.parametrize("length,window", [(9, 4), (16, 15), (5, 1)])
def test_window_mask_is_transformers_convention(length, window):
    masking_utils = pytest.importorskip("transformers.masking_utils")
    fn = masking_utils.sliding_window_causal_mask_function(window)
    t = torch.tensor
    expected = torch.tensor([[bool(fn(t(0), t(0), t(i), t(j))) for j in range(length)] for i in range(length)])
    assert torch.equal(window_mask(length, window), expected)


def _by_hand(q, k, v, window, scale):
    """softmax(q k^T * scale) v over the visible keys, one query at a time, grouped heads expanded."""
    b, length, hq, d = q.shape
    groups = hq // k.shape[2]
    out = torch.zeros_like(q)
    for i in range(length):
        lo = max(0, i - window + 1)
        for h in range(hq):
            kk, vv = k[:, lo:i + 1, h // groups], v[:, lo:i + 1, h // groups]
            w = torch.softmax(torch.einsum("bd,bjd->bj", q[:, i, h], kk) * scale, dim=-1)
            out[:, i, h] = torch.einsum("bj,bjd->bd", w, vv)
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_windowed_attention_equals_attention_by_hand(hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, hq, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 12, hkv, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 12, hkv, 8, generator=g, requires_grad=True)
    out = windowed_attention(q, k, v, window=5, scale=0.3)
    ref = _by_hand(q, k, v, 5, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_window_not_shorter_than_sequence_is_plain_causal():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(windowed_attention(q, k, v, window=6), plain)
