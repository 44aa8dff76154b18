"""Attention inside each sample of a packed row from sequence offsets (kernels/varlen_attention.py), on the CPU:
the offsets, and the reference against per-sample SDPA (values and gradients, grouped-query heads). The
FlashAttention kernel itself: tests/gpu/test_varlen_attention_gpu.py."""
import pytest
import torch
import torch.nn.functional as F

from turbotune.model.kernels import varlen_attention as va


def test_offsets_have_a_fixed_size_and_close_the_row():
    got = va.sequence_offsets(torch.tensor([3, 2]), 8, slots=6)
    assert got.dtype == torch.int32 and got.tolist() == [0, 3, 5, 8, 8, 8, 8]  # 5..8: the row's tail, then empty
    assert va.sequence_offsets(torch.tensor([3, 5]), 8, slots=4).tolist() == [0, 3, 8, 8, 8]


def _per_sample(q, k, v, lengths, scale):
    """Each sample's causal attention on its own (the padded batch's view)."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("hkv", [4, 2])
def test_reference_equals_per_sample_attention(hkv):
    g = torch.Generator().manual_seed(hkv)
    lengths = [5, 1, 9, 3]  # the last one stands for the bucket's tail
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(total, hkv, 8, generator=g, requires_grad=True)
    v = torch.randn(total, hkv, 8, generator=g, requires_grad=True)
    offsets = va.sequence_offsets(torch.tensor(lengths[:-1]), total, slots=8)
    got = va.varlen_attention(q, k, v, offsets, total, scale=0.3)  # the CPU takes the reference
    want = _per_sample(q, k, v, lengths, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn(want.shape, generator=g)
    got_g = torch.autograd.grad(got, (q, k, v), grad)
    want_g = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reference_with_a_window_equals_per_sample_windowed_attention():
    """A packed row of a sliding-window model (Mistral, Phi-3, Gemma 3's local layers): inside each sample, the
    last `window` keys only, as the padded batch's window mask gives each sample."""
    from turbotune.model.kernels.windowed_attention import windowed_attention_reference
    g = torch.Generator().manual_seed(3)
    lengths, window = [9, 2, 12], 4
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    offsets = va.sequence_offsets(torch.tensor(lengths[:-1]), total, slots=6)
    got = va.varlen_attention(q, k, v, offsets, total, scale=0.3, window=window)
    want, start = [], 0
    for n in lengths:
        want.append(windowed_attention_reference(*(t[start:start + n].unsqueeze(0) for t in (q, k, v)),
                                                 window, 0.3)[0])
        start += n
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)
    unwindowed = va.varlen_attention(q, k, v, offsets, total, scale=0.3)
    assert (got - unwindowed).abs().max() > 1e-3  # the window binds in the 9- and 12-token samples
