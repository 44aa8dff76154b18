"""The in-place fp32 adapter kernels on the GPU at Qwen2-1.5B / Llama-3-8B shapes: equal to fp32 matmuls of
upcast copies, and (printed, not asserted) their time against that torch path.

Run: pytest tests/gpu/test_skinny_fp32_gpu.py -q -s
"""
import pytest
import torch
from conftest import cuda_time_ms

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from turbotune.model.kernels.skinny_fp32 import (
    skinny_mm_t,
    skinny_mm_t_reference,
    skinny_tn,
    skinny_tn_reference,
)


@pytest.mark.parametrize("n,k,r", [(4096, 1536, 16), (4096, 8960, 16), (4096, 14336, 16), (4096, 4096, 64)])
def test_skinny_kernels_equal_fp32_matmuls(n, k, r):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16()
    a = torch.randn(r, k, device="cuda", generator=g) * 0.02
    u = torch.randn(n, r, device="cuda", generator=g)
    ref1, ref2 = skinny_mm_t_reference(x, a), skinny_tn_reference(x, u)
    out1, out2 = skinny_mm_t(x, a), skinny_tn(x, u)
    torch.testing.assert_close(out1, ref1, rtol=1e-4, atol=1e-4 * ref1.abs().max().item())
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-4 * ref2.abs().max().item())
    t_ref = cuda_time_ms(lambda: (skinny_mm_t_reference(x, a), skinny_tn_reference(x, u)))
    t_new = cuda_time_ms(lambda: (skinny_mm_t(x, a), skinny_tn(x, u)))
    print(f"\n[{n}x{k}, r={r}] x A^T + x^T u: torch (fp32 copy) {t_ref:.3f} ms, in place {t_new:.3f} ms")
