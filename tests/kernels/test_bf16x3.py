"""bf16x3: fp32 products of a bf16 activation with a small fp32 matrix from three bf16 pieces (CPU: the pieces
are multiplied in fp32; the GPU's bf16 GEMM with fp32 output is tested in tests/gpu/test_bf16x3_gpu.py)."""
import pytest
import torch

from turbotune.kernels.bf16x3 import reference_mm, split3, wide_mm_fp32


def test_split3_is_exact_over_the_fp32_range():
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-30, 30, 61)
    s = (torch.randn(61, 64, generator=g) * mags[:, None]).float()
    s[0, :4] = torch.tensor([0.0, -0.0, 1.0, -3.0])
    parts = split3(s, dim=1)
    assert parts.dtype == torch.bfloat16 and parts.shape == (61, 192)
    hi, mid, lo = parts.float().split(64, dim=1)
    assert torch.equal(hi + mid + lo, s)  # exact, not approximately
    assert torch.equal(split3(s, dim=0).float().view(3, 61, 64).sum(0), s)


@pytest.mark.parametrize("m,k,n", [(1, 7, 1), (33, 257, 16), (128, 96, 48)])
@pytest.mark.parametrize("transposed", [False, True])
def test_wide_mm_fp32_equals_the_fp32_recipe(m, k, n, transposed):
    g = torch.Generator().manual_seed(m + k)
    wide = torch.randn(k, m, generator=g).bfloat16().t() if transposed else torch.randn(m, k, generator=g).bfloat16()
    small = torch.randn(k, n, generator=g) * 0.02
    out, ref = wide_mm_fp32(wide, small), reference_mm(wide, small)
    assert out.dtype == torch.float32 and out.shape == (m, n) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # and far closer than rounding the small operand to bf16 (what a plain bf16 adapter matmul does)
    coarse = torch.mm(wide.float(), small.bfloat16().float())
    assert (out - ref).abs().max() < (coarse - ref).abs().max() / 100
