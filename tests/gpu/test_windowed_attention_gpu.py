"""FlashAttention's sliding window (aten::_flash_attention_forward, window_size_left) against the masked-SDPA
reference in fp32, bf16 on CUDA: values and gradients, grouped-query heads, the head sizes of the families that
have windows (Phi-3 96, Mistral 128, Gemma 3 256). Also checks that the flash kernel, not the fallback, ran.

Run: pytest tests/gpu/test_windowed_attention_gpu.py -q -s   (-s prints the timings)
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from turbotune.model.kernels import flash_support  # noqa: E402
from turbotune.model.kernels import windowed_attention as wa  # noqa: E402


@pytest.fixture(autouse=True)
def _flash_window_on(monkeypatch):
    monkeypatch.delenv("TURBOTUNE_FLASH_WINDOW", raising=False)  # the default: on


def _nrel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("hkv,window", [(2, 100), (8, 511)])
def test_flash_window_matches_reference(d, hkv, window):
    g = torch.Generator(device="cuda").manual_seed(d)
    shape = lambda h: (2, 512, h, d)  # noqa: E731
    q = torch.randn(shape(8), device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(shape(hkv), device="cuda", generator=g).bfloat16().requires_grad_()
    v = torch.randn(shape(hkv), device="cuda", generator=g).bfloat16().requires_grad_()
    scale = d ** -0.5
    out = wa.windowed_attention(q, k, v, window, scale)
    assert flash_support._support.get(("window", q.device.index, torch.bfloat16, d)) is True, \
        "the flash window did not run"
    ref = wa.windowed_attention_reference(q.float(), k.float(), v.float(), window, scale)
    assert _nrel(out, ref) < 1e-2
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for a, b in zip(grads, ref_grads):
        assert _nrel(a, b) < 2e-2


def test_flash_window_is_faster_than_the_mask():
    """Not a speed target (those live in the bench): prints both, and checks the flash call is captured in a CUDA
    graph like the rest of the step."""
    from conftest import cuda_time_ms
    q = torch.randn(2, 2048, 32, 96, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    flash = cuda_time_ms(lambda: wa.windowed_attention(q, k, v, 2047))
    masked = cuda_time_ms(lambda: wa.windowed_attention_reference(q, k, v, 2047))
    print(f"\nphi3-mini attention, 2 x 2048, window 2047: flash {flash:.2f} ms, masked SDPA {masked:.2f} ms")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = wa.windowed_attention(q, k, v, 2047)
    graph.replay()
    torch.testing.assert_close(out, wa.windowed_attention(q, k, v, 2047))
