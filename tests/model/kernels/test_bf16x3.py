"""bf16x3: fp32 products of a bf16 activation with a small fp32 matrix from three bf16 pieces (CPU: the pieces
are multiplied in fp32; the GPU's bf16 GEMM with fp32 output is tested in tests/gpu/test_bf16x3_gpu.py)."""
import pytest
import torch

from turbotune.model.kernels._dispatch import interpret_mode
from turbotune.model.kernels.bf16x3 import reference_mm, split3, split3_reference, sum3, sum3_reference, wide_mm_fp32

triton_cases = pytest.mark.skipif(not interpret_mode(), reason="needs TRITON_INTERPRET=1 (set by .ci/run's pytest)")


def _wide_range(rows=61, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-30, 30, rows)
    s = (torch.randn(rows, cols, generator=g) * mags[:, None]).float()
    specials = torch.tensor([0.0, -0.0, 1.0, -3.0])[:cols]
    s[0, :len(specials)] = specials
    return s


def test_split3_is_exact_over_the_fp32_range():
    s = _wide_range()
    parts = split3_reference(s)
    assert parts.dtype == torch.bfloat16 and parts.shape == (61, 192)
    hi, mid, lo = parts.float().split(64, dim=1)
    assert torch.equal(hi + mid + lo, s)  # exact, not approximately


@triton_cases
@pytest.mark.parametrize("shape,transposed", [((61, 64), False), ((1, 1), False), ((33, 17), True),
                                              ((257, 16), True)])
def test_split3_kernel_is_exact(shape, transposed):
    """Exact like the reference wherever the smallest piece is a normal number (|s| above ~1e-31: LoRA factors
    and activations are far above). Below, Triton flushes subnormal pieces to zero, costing the last bits of
    fp32 (a relative 2^-20 at most)."""
    s = _wide_range(*shape[::-1], seed=3).t() if transposed else _wide_range(*shape, seed=3)
    parts = split3(s, backend="triton")
    assert parts.shape == (shape[0], 3 * shape[1]) and parts.dtype == torch.bfloat16
    hi, mid, lo = parts.float().split(shape[1], dim=1)
    normal = s.abs() > 1e-30
    assert torch.equal((hi + mid + lo)[normal], s[normal])
    assert ((hi + mid + lo) - s).abs().le(s.abs() * 2.0 ** -20).all()  # the flushed third piece at most
    assert (hi - s).abs().le(s.abs() * 2.0 ** -7).all()  # the first piece holds the leading 8 bits


@triton_cases
@pytest.mark.parametrize("m,n", [(1, 1), (5, 16), (1000, 48)])
def test_sum3_kernel_equals_the_reference(m, n):
    out = torch.randn(m, 3 * n, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(sum3(out, backend="triton"), sum3_reference(out), rtol=0, atol=0)


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
