"""bf16x3 on the GPU at Qwen2-1.5B / Llama-3-8B shapes: torch.mm's bf16 GEMM with fp32 output over the three
bf16 pieces equals an fp32 GEMM of the upcast copy; the time of both is printed (not asserted).

Run: pytest tests/gpu/test_bf16x3_gpu.py -q -s
"""
import pytest
import torch
from conftest import cuda_time_ms

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from turbotune.model.kernels.bf16x3 import gpu_supported, reference_mm, wide_mm_fp32


def test_this_torch_has_fp32_output_bf16_gemms():
    assert gpu_supported(), "torch.mm(bf16, bf16, out_dtype=float32) is missing: fp32 adapters fall back to casts"


@pytest.mark.parametrize("n,k,r", [(4096, 1536, 16), (4096, 8960, 16), (4096, 14336, 16), (4096, 4096, 64)])
def test_bf16x3_equals_fp32_matmuls(n, k, r):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, k, device="cuda", generator=g).bfloat16()
    a_t = torch.randn(k, r, device="cuda", generator=g) * 0.02  # x A^T
    u = torch.randn(n, r, device="cuda", generator=g)            # x^T u (the dA product)
    pairs = [(x, a_t), (x.t(), u)]
    for wide, small in pairs:
        out, ref = wide_mm_fp32(wide, small), reference_mm(wide, small)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    t_ref = cuda_time_ms(lambda: [reference_mm(w, s) for w, s in pairs])
    t_new = cuda_time_ms(lambda: [wide_mm_fp32(w, s) for w, s in pairs])
    print(f"\n[{n}x{k}, r={r}] x A^T + x^T u: fp32 copy + fp32 GEMM {t_ref:.3f} ms, bf16x3 {t_new:.3f} ms")
