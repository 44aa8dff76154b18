"""The fp32 rank-r products read straight from 16-bit activations (kernels/skinny_fp32.py), against plain
PyTorch fp32 matmuls, under TRITON_INTERPRET=1 on awkward shapes, strides and dtypes."""
import pytest
import torch

from turbotune.model.kernels.skinny_fp32 import (
    skinny_mm_t,
    skinny_mm_t_reference,
    skinny_tn,
    skinny_tn_reference,
)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,r", [(1, 5, 1), (37, 64, 8), (70, 100, 16), (130, 33, 24), (65, 128, 64)])
def test_mm_t(dtype, n, k, r):
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(n, k, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g)
    out = skinny_mm_t(x, a, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (n, r)
    _close(out, skinny_mm_t_reference(x, a))


def test_mm_t_strided_operands():
    """u = dY B is x A^T with A = B^T, a transposed view: strides, not copies."""
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(96, 16, generator=g)
    _close(skinny_mm_t(dy, b.t(), backend="triton"), torch.mm(dy.float(), b))
    x = torch.randn(96, 40, generator=g).bfloat16().t()  # a non-contiguous x
    a = torch.randn(16, 96, generator=g)
    _close(skinny_mm_t(x, a, backend="triton"), skinny_mm_t_reference(x, a))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,m,r,split", [(1, 5, 1, None), (37, 64, 8, None), (300, 100, 16, 3), (257, 70, 16, 5),
                                         (130, 129, 64, None), (0, 20, 4, None)])
def test_tn(dtype, n, m, r, split):
    g = torch.Generator().manual_seed(n + m)
    y = torch.randn(n, m, generator=g).to(dtype)
    z = torch.randn(n, r, generator=g)
    out = skinny_tn(y, z, backend="triton", split=split)
    assert out.dtype == torch.float32 and out.shape == (m, r)
    _close(out, skinny_tn_reference(y, z))


def test_tn_gives_da_transposed():
    """dA = s u^T x: skinny_tn(x, u) is dA^T."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 40, generator=g).bfloat16()
    u = torch.randn(50, 16, generator=g)
    _close(skinny_tn(x, u, backend="triton").t(), torch.mm(u.t(), x.float()))


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="fp32"):
        skinny_mm_t(torch.randn(4, 8), torch.randn(2, 8).bfloat16(), backend="triton")
    with pytest.raises(ValueError, match="rank"):
        skinny_mm_t(torch.randn(4, 8), torch.randn(65, 8), backend="triton")
    with pytest.raises(ValueError, match="columns"):
        skinny_mm_t(torch.randn(4, 8), torch.randn(2, 9), backend="triton")
    with pytest.raises(ValueError, match="rows"):
        skinny_tn(torch.randn(4, 8), torch.randn(5, 2), backend="triton")
