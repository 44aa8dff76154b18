"""NF4 dequantisation on CUDA: the compiled Triton kernel (backend="auto") and the PyTorch reference against
bitsandbytes' CUDA `dequantize_4bit`, bit for bit, at realistic weight shapes; buffer reuse; and a timing print
(not asserted) against bitsandbytes. Run with -s to see the timings."""
import pytest
import torch
from conftest import cuda_time_ms

bnbF = pytest.importorskip("bitsandbytes.functional")

from turbotune.model.kernels._dispatch import use_triton  # noqa: E402
from turbotune.model.kernels.nf4_dequant import dequantize_nf4_triton  # noqa: E402
from turbotune.model.quant import clear_dequant_buffers, dequantize_nf4, nf4_code, nf4_storage  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Qwen2-1.5B MLP (gate/up [8960, 1536], down [1536, 8960]), Llama-3-8B MLP ([14336, 4096] / [4096, 14336]), and
# small odd ones (partial last block; odd numel).
SHAPES = [(1536, 8960), (8960, 1536), (4096, 14336), (14336, 4096), (33, 130), (33, 33), (1, 64)]
# Kernel tuning variants (bytes_per_program, num_warps, pair_table); the first is the default.
VARIANTS = [(1024, 4, False), (1024, 4, True), (4096, 8, True), (512, 2, False)]


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    clear_dequant_buffers()
    yield
    clear_dequant_buffers()


def _quantize(shape, dtype, nested, blocksize=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(dtype)
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def _mismatch(got, ref):
    bad = (got != ref).sum().item()
    return f"{bad} of {ref.numel()} differ, max |diff| {(got.float() - ref.float()).abs().max().item()}"


def test_auto_picks_triton():
    assert use_triton(torch.empty(1, device="cuda"), "auto")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "bpp{}-w{}-{}".format(*v[:2], "pair" if v[2] else "2x16"))
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_bitsandbytes_cuda(shape, dtype, nested, variant):
    packed, qs = _quantize(shape, dtype, nested)
    ref = bnbF.dequantize_4bit(packed, qs)
    st = nf4_storage(packed, qs)
    bpp, warps, pair = variant
    got = dequantize_nf4_triton(st.packed, st.absmax, nf4_code("cuda"), st.blocksize, torch.empty_like(ref),
                                absmax2=st.absmax2, code2=st.code2, blocksize2=st.blocksize2, offset=st.offset,
                                bytes_per_program=bpp, num_warps=warps, pair_table=pair)
    assert torch.equal(got, ref), _mismatch(got, ref)
    if variant == VARIANTS[0]:  # the public paths once: auto (the Triton kernel's defaults) and the reference
        got = dequantize_nf4(packed, qs)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref), _mismatch(got, ref)
        got = dequantize_nf4(packed, qs, backend="torch", out=torch.empty_like(ref))
        assert torch.equal(got, ref), _mismatch(got, ref)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_other_blocksizes_cuda(blocksize):
    for nested in (True, False):
        packed, qs = _quantize((4096, 1024), torch.bfloat16, nested, blocksize=blocksize)
        ref = bnbF.dequantize_4bit(packed, qs)
        got = dequantize_nf4(packed, qs)
        assert torch.equal(got, ref), _mismatch(got, ref)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_into_16bit_cuda(out_dtype):
    """A fp32-quantised weight dequantised into bf16 / fp16 = bitsandbytes' fp32 result rounded once."""
    packed, qs = _quantize((4096, 4096), torch.float32, True)
    ref = bnbF.dequantize_4bit(packed, qs).to(out_dtype)
    got = dequantize_nf4(packed, qs, dtype=out_dtype)
    assert torch.equal(got, ref), _mismatch(got, ref)


def test_buffer_reuse_cuda():
    a, qa = _quantize((8960, 1536), torch.bfloat16, True, seed=1)
    b, qb = _quantize((8960, 1536), torch.bfloat16, True, seed=2)
    wa = dequantize_nf4(a, qa)
    ptr = wa.data_ptr()
    before = torch.cuda.memory_allocated()
    wb = dequantize_nf4(b, qb)
    assert wb.data_ptr() == ptr and torch.cuda.memory_allocated() == before  # nothing new allocated
    assert torch.equal(wb, bnbF.dequantize_4bit(b, qb))
    assert dequantize_nf4(a, qa, slot="other").data_ptr() != ptr


@pytest.mark.parametrize("shape", [(1536, 8960), (4096, 14336)], ids=str)
def test_timing_vs_bitsandbytes(shape):
    """Printed, not asserted: ours (into the reused buffer) vs bitsandbytes' dequantize_4bit (fresh output each
    call, double-quantised absmax decoded by a separate kernel first), bf16, double quantisation."""
    packed, qs = _quantize(shape, torch.bfloat16, True)
    n = packed.numel() * 2
    ours = cuda_time_ms(lambda: dequantize_nf4(packed, qs), iters=50, warmup=5)
    theirs = cuda_time_ms(lambda: bnbF.dequantize_4bit(packed, qs), iters=50, warmup=5)
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    theirs_out = cuda_time_ms(lambda: bnbF.dequantize_4bit(packed, qs, out=out), iters=50, warmup=5)
    gbs = lambda ms: (n * 2.5) / (ms * 1e-3) / 1e9  # 0.5 byte read + 2 bytes written per element  # noqa: E731
    print(f"\nNF4 dequant {shape} bf16, double quant [{torch.cuda.get_device_name()}]: "
          f"turbotune {ours * 1e3:.1f} us ({gbs(ours):.0f} GB/s) | bitsandbytes {theirs * 1e3:.1f} us "
          f"({gbs(theirs):.0f} GB/s), with out= {theirs_out * 1e3:.1f} us | speed-up {theirs / ours:.2f}x")
