"""FlashAttention's varlen kernel (aten::_flash_attention_forward with sequence offsets) against the masked-SDPA
reference in fp32, bf16 on CUDA: values and gradients, grouped-query heads, offsets padded with empty sequences
and a max length above the longest sample (as packed rows under CUDA graphs give them); checks that the flash
kernel, not the fallback, ran.

Run: pytest tests/gpu/test_varlen_attention_gpu.py -q
"""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from turbotune.model.kernels import flash_support  # noqa: E402
from turbotune.model.kernels import varlen_attention as va  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import nrel  # noqa: E402


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv,window", [(2, None), (8, None), (2, 200)])
def test_varlen_matches_reference(d, hkv, window):
    g = torch.Generator(device="cuda").manual_seed(d + hkv)
    lengths = [300, 17, 900, 1, 450]
    total = 2048  # the bucket: the rest is the tail sequence
    q = torch.randn(total, 8, d, device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(total, hkv, d, device="cuda", generator=g).bfloat16().requires_grad_()
    v = torch.randn(total, hkv, d, device="cuda", generator=g).bfloat16().requires_grad_()
    offsets = va.sequence_offsets(torch.tensor(lengths, device="cuda"), total)
    out = va.varlen_attention(q, k, v, offsets, total, scale=d ** -0.5, window=window)
    kind = "varlen" if window is None else "varlen-window"
    assert flash_support._support.get((kind, q.device.index, torch.bfloat16, d)) is True, "flash did not run"
    ref = va.varlen_attention_reference(q.float(), k.float(), v.float(), offsets, d ** -0.5, window)
    assert nrel(out, ref) < 1e-2
    grad = torch.randn(out.shape, device="cuda", generator=g).bfloat16()
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.float())
    for a, b in zip(got, want):
        assert nrel(a, b) < 2e-2


def test_varlen_replays_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1024, 4, 64, device="cuda", generator=g).bfloat16() for _ in range(3))
    offsets = va.sequence_offsets(torch.tensor([100, 400], device="cuda"), 1024)
    eager = va.varlen_attention(q, k, v, offsets, 1024)  # runs flash once outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        va.varlen_attention(q, k, v, offsets, 1024)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = va.varlen_attention(q, k, v, offsets, 1024)
    offsets.copy_(va.sequence_offsets(torch.tensor([700, 10], device="cuda"), 1024))  # other samples, same shape
    graph.replay()
    torch.cuda.synchronize()
    assert nrel(out, va.varlen_attention_reference(q, k, v, offsets, None)) < 1e-2
    assert nrel(eager, out) > 1e-3  # the replay used the new offsets
