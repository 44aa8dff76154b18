"""NF4 dequantisation (Triton, interpreted on CPU, and the PyTorch reference) against bitsandbytes, bit for bit;
the shared output buffers; and the fused LoRA functions on a 4-bit tiny Llama going through it."""
import tempfile

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

import turbotune.model.kernels.nf4_dequant as nd  # noqa: E402
from turbotune.model.kernels._dispatch import interpret_mode  # noqa: E402
from turbotune.model.kernels.nf4_dequant import dequantize_nf4_into, dequantize_nf4_reference  # noqa: E402
from turbotune.model.quant import (  # noqa: E402
    NF4_CODE,
    bnb_cpu_dequant_misreads_rows,
    bnb_dequantize_flat,
    clear_dequant_buffers,
    dequant_buffer,
    dequant_buffers_nbytes,
    dequantize_nf4,
    nf4_code,
    nf4_storage,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 33 x 130: blocks of 64 straddle rows and the last block is partial (4290 = 67 * 64 + 2).
# 33 x 33: odd numel (the last byte's low nibble is padding) and an odd row (bitsandbytes' generic CPU path).
SHAPES = [(64, 64), (96, 80), (33, 130), (1, 64), (33, 33)]
BACKENDS = ["triton", "torch"]
# Kernel tuning variants (bytes_per_program, num_warps, pair_table); the first is the default.
VARIANTS = [(1024, 4, False), (1024, 4, True), (4096, 8, True), (512, 2, False)]


def _bnb_dequant(packed, qs, dtype=None):
    """bitsandbytes' own result, over the flattened weight (the layout its blocks are defined on; its AVX-512
    CPU kernel misreads rows that straddle blocks, see quant.bnb_dequantize_flat). force_eager: its generic
    CPU path (odd numel) is torch.compile'd, which would cost ~8 s per shape here for the same arithmetic."""
    with torch.compiler.set_stance("force_eager"):
        return bnb_dequantize_flat(packed, qs, dtype)


def _quantize(shape, dtype, nested, blocksize=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", **kw)


def _same_bits(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), (got.float() - ref.float()).abs().max().item()


def test_nf4_code_is_bitsandbytes_table():
    assert torch.equal(nf4_code("cpu"), bnbF.get_4bit_type("nf4", device="cpu").float())
    assert len(NF4_CODE) == 16


# --------------------------------------------------------------------------------------------- bitsandbytes' layout
def _per_row_blocks(packed, qs):
    """What bitsandbytes 0.50's AVX-512 CPU kernel computes: each row restarts the block count."""
    flat = bnb_dequantize_flat(packed, qs, torch.float32).view(qs.shape)
    rows, cols = qs.shape
    absmax = flat.new_tensor(qs.absmax if not qs.nested else bnbF.dequantize_blockwise(qs.absmax, qs.state2)
                             + qs.offset)
    col_block = torch.arange(cols) // qs.blocksize
    wrong = absmax[torch.arange(rows).unsqueeze(1) * (cols // qs.blocksize) + col_block]
    right = absmax[(torch.arange(rows).unsqueeze(1) * cols + torch.arange(cols)) // qs.blocksize]
    return (flat / right * wrong).to(qs.dtype)


def test_probe_tells_a_per_row_block_kernel(monkeypatch):
    """bnb_cpu_dequant_misreads_rows: False for a dequantisation in bitsandbytes' own layout, True for the per-row
    lookup; and the flat helper equals our reference on a straddling shape whatever this CPU's kernel does."""
    packed, qs = _quantize((32, 96), torch.float32, False)
    assert torch.equal(bnb_dequantize_flat(packed, qs), dequantize_nf4(packed, qs, backend="torch").clone())
    monkeypatch.setattr(bnbF, "dequantize_4bit", lambda p, q: bnb_dequantize_flat(p, q))
    assert not bnb_cpu_dequant_misreads_rows()
    monkeypatch.setattr(bnbF, "dequantize_4bit", _per_row_blocks)
    assert bnb_cpu_dequant_misreads_rows()


# --------------------------------------------------------------------------------------------- bit identity
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_bitsandbytes(shape, dtype, nested):
    packed, qs = _quantize(shape, dtype, nested)
    assert qs.nested == nested
    ref = _bnb_dequant(packed, qs)
    for backend in BACKENDS:
        _same_bits(dequantize_nf4(packed, qs, out=torch.empty(shape, dtype=dtype), backend=backend), ref)


def _triton_variant(packed, qs, out, variant):
    """dequantize_nf4_triton with the tuning knobs of `variant` into `out`."""
    st = nf4_storage(packed, qs)
    bpp, warps, pair = variant
    return nd.dequantize_nf4_triton(st.packed, st.absmax, nf4_code("cpu"), st.blocksize, out, absmax2=st.absmax2,
                                    code2=st.code2, blocksize2=st.blocksize2, offset=st.offset,
                                    bytes_per_program=bpp, num_warps=warps, pair_table=pair)


@pytest.mark.skipif(not interpret_mode(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "bpp{}-w{}-{}".format(*v[:2], "pair" if v[2] else "2x16"))
def test_variants_bit_identical(variant, nested):
    """Every tuning variant against bitsandbytes: partial last block, odd numel, one block, blocks larger than
    a program's bytes (4096), in each output dtype; plus a fp32-quantised weight rounded once into bf16 / fp16."""
    cases = [((33, 130), 64), ((33, 33), 64), ((1, 64), 64), ((96, 80), 128), ((17, 48), 256), ((96, 80), 4096)]
    for shape, bs in cases:
        for dtype in DTYPES:
            packed, qs = _quantize(shape, dtype, nested, blocksize=bs)
            _same_bits(_triton_variant(packed, qs, torch.empty(shape, dtype=dtype), variant), _bnb_dequant(packed, qs))
    packed, qs = _quantize((33, 130), torch.float32, nested, seed=5)
    for dtype in DTYPES[:2]:
        _same_bits(_triton_variant(packed, qs, torch.empty(33, 130, dtype=dtype), variant),
                   _bnb_dequant(packed, qs, dtype))


def test_pair_table_and_knob_errors():
    code = nf4_code("cpu")
    t = nd._pair_table(code)
    assert nd._pair_table(code) is t and t.dtype == torch.int64 and t.numel() == 256  # cached
    pairs = t.view(torch.float32).view(256, 2)
    b = torch.arange(256)
    assert torch.equal(pairs[:, 0], code[b >> 4]) and torch.equal(pairs[:, 1], code[b & 15])
    packed, qs = _quantize((64, 64), torch.bfloat16, False)
    out = torch.empty(64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bytes_per_program"):
        _triton_variant(packed, qs, out, (1000, 4, False))
    with pytest.raises(ValueError, match="num_warps"):
        _triton_variant(packed, qs, out, (1024, 3, False))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes(blocksize):
    for nested in (False, True):
        packed, qs = _quantize((96, 80), torch.bfloat16, nested, blocksize=blocksize)
        ref = _bnb_dequant(packed, qs)
        for backend in BACKENDS:
            out = torch.empty(96, 80, dtype=torch.bfloat16)
            _same_bits(dequantize_nf4(packed, qs, out=out, backend=backend), ref)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_output_dtype_other_than_quant_state(out_dtype):
    """fp32-quantised weight dequantised into another dtype: bitsandbytes' dequantisation into that dtype (what
    its matmul_4bit does for such an input), i.e. the fp32 value rounded once -- equal to fp32 result .to()."""
    for nested in (False, True):
        packed, qs = _quantize((33, 130), torch.float32, nested, seed=5)
        ref = _bnb_dequant(packed, qs, out_dtype)
        _same_bits(ref, _bnb_dequant(packed, qs).to(out_dtype))
        for backend in BACKENDS:
            _same_bits(dequantize_nf4(packed, qs, dtype=out_dtype, backend=backend).clone(), ref)


def test_reference_function_directly():
    packed, qs = _quantize((33, 130), torch.bfloat16, True)
    st = nf4_storage(packed, qs)
    got = dequantize_nf4_reference(st.packed, st.absmax, nf4_code("cpu"), st.blocksize, st.shape, torch.bfloat16,
                                   absmax2=st.absmax2, code2=st.code2, blocksize2=st.blocksize2, offset=st.offset)
    _same_bits(got, _bnb_dequant(packed, qs))


def test_nibble_order_and_double_quant_formula():
    """Hand-built storage: element 2i is the high nibble; absmax = code2[u8] * absmax2[b // bs2] + offset."""
    packed = torch.tensor([0x0F, 0x7A, 0x30], dtype=torch.uint8)  # codes 0,15 | 7,10 | 3,0
    code2 = torch.linspace(-1, 1, 256)
    absmax_u8 = torch.tensor([200, 17], dtype=torch.uint8)
    absmax2 = torch.tensor([0.75])
    offset = torch.tensor([0.5])
    kw = dict(absmax2=absmax2, code2=code2, blocksize2=256, offset=offset)
    code = nf4_code("cpu")
    s = [code2[200] * 0.75 + 0.5, code2[17] * 0.75 + 0.5]
    want = torch.stack([code[0] * s[0], code[15] * s[0], code[7] * s[0], code[10] * s[0], code[3] * s[1]])
    for backend in BACKENDS:
        out = torch.empty(5)
        dequantize_nf4_into(packed, absmax_u8, code, 4, out, backend=backend, **kw)  # 5 elements: blocks of 4
        _same_bits(out, want)


def test_params4bit_quant_storage_and_errors():
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    p = p._quantize("cpu") if hasattr(p, "_quantize") else p.to("cpu")
    assert p.quant_state is not None
    ref = _bnb_dequant(p.data, p.quant_state)
    _same_bits(dequantize_nf4(p, backend="triton").clone(), ref)           # a Params4bit on its own
    _same_bits(dequantize_nf4(p.data, p.quant_state, backend="torch").clone(), ref)
    # packed in another storage dtype (FSDP's quant_storage): the same bytes
    packed, qs = _quantize((64, 64), torch.bfloat16, False, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    _same_bits(dequantize_nf4(packed, qs, backend="triton").clone(), _bnb_dequant(packed, qs))
    # not NF4 / bad arguments
    fp4, qs4 = bnbF.quantize_4bit(torch.randn(64, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        dequantize_nf4(fp4, qs4)
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_nf4(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bf16 / fp16 / fp32"):
        dequantize_nf4(packed, qs, dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous tensor of 4096"):
        dequantize_nf4(packed, qs, out=torch.empty(64, 63, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(packed, qs, backend="cuda")


# --------------------------------------------------------------------------------------------- buffers
def test_buffer_reused_per_shape_dtype_slot():
    clear_dequant_buffers()
    a, qa = _quantize((96, 80), torch.bfloat16, True, seed=1)
    b, qb = _quantize((96, 80), torch.bfloat16, True, seed=2)
    c, qc = _quantize((80, 96), torch.bfloat16, True, seed=3)
    ra, rb, rc = _bnb_dequant(a, qa), _bnb_dequant(b, qb), _bnb_dequant(c, qc)
    for backend in BACKENDS:
        wa = dequantize_nf4(a, qa, backend=backend)
        _same_bits(wa, ra)
        ptr = wa.data_ptr()
        wb = dequantize_nf4(b, qb, backend=backend)
        assert wb.data_ptr() == ptr                     # same (shape, dtype, device): the same buffer ...
        _same_bits(wa, rb)                              # ... so the first result was overwritten (the contract)
        wc = dequantize_nf4(c, qc, backend=backend)     # another shape: another buffer
        assert wc.data_ptr() != ptr
        _same_bits(wc, rc)
        _same_bits(wb, rb)                              # untouched by the other shape
        assert dequantize_nf4(a, qa, dtype=torch.float32, backend=backend).data_ptr() not in (ptr, wc.data_ptr())
        assert dequantize_nf4(a, qa, slot="up", backend=backend).data_ptr() != ptr
        assert dequantize_nf4(a, qa, backend=backend).data_ptr() == ptr   # allocated once, across calls
        mine = torch.empty(96, 80, dtype=torch.bfloat16)
        assert dequantize_nf4(a, qa, out=mine, backend=backend) is mine
    assert dequant_buffer((96, 80), torch.bfloat16, "cpu").data_ptr() == ptr
    assert dequant_buffers_nbytes("cpu") == 96 * 80 * (2 + 2 + 4 + 2)  # bf16 x2 shapes, fp32, slot "up"
    clear_dequant_buffers()
    assert dequant_buffers_nbytes() == 0


# --------------------------------------------------------------------------------------------- a real 4-bit model
def _llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, vocab_size=128)


def _load_4bit(dtype):
    pytest.importorskip("transformers")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(_llama_config()).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        return LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu", dtype=dtype)


def test_tiny_llama_linear4bit_weights():
    """Every bnb.nn.Linear4bit of a tiny Llama loaded by transformers with BitsAndBytesConfig (NF4, double
    quantisation, bf16)."""
    model = _load_4bit(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7
    for m in layers:
        qs = m.weight.quant_state
        assert qs.nested and qs.quant_type == "nf4" and qs.dtype == torch.bfloat16
        ref = _bnb_dequant(m.weight.data, qs)
        for backend in BACKENDS:
            got = dequantize_nf4(m.weight, backend=backend)
            assert got.shape == (m.out_features, m.in_features)
            _same_bits(got, ref)


# --------------------------------------------------------------------------------------------- fused LoRA
def _peft_4bit_fp32():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    model = _load_4bit(torch.float32)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    pm.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero; make the adapter matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layer = pm.base_model.model.model.layers[0]
    return layer.self_attn, layer.mlp


def _run(fn, x, mods):
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(10 + i))).sum()
               for i, o in enumerate(outs))
    params = [x] + [m.lora_A["default"].weight for m in mods] + [m.lora_B["default"].weight for m in mods]
    return [o.detach() for o in outs], torch.autograd.grad(loss, params)


def _close(ref, got, tol=1e-4):
    for r, o in zip(ref[0], got[0]):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol * r.abs().max().item())
    for r, g in zip(ref[1], got[1]):
        assert ((g - r).abs().max() / r.abs().max()).item() < tol


@pytest.mark.usefixtures("bnb_flat_dequant")
def test_fused_lora_4bit_matches_peft(monkeypatch):
    """Fused MLP (gate and up share one [160, 64] buffer) and qkv (k and v share one [32, 64] buffer) on a 4-bit
    tiny Llama, through dense_weight -> dequantize_nf4 with the reference and with the Triton kernel forced,
    forward and backward, against PEFT's own modules."""
    import turbotune.model.kernels.nf4_dequant as nd
    import turbotune.model.quant as tq
    from turbotune.model.kernels.fused_lora import dense_weight, lora_mlp, lora_part, lora_qkv

    attn, mlp = _peft_4bit_fp32()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    mlp_mods = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    qkv_mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    ref_mlp = _run(lambda t: mlp(t), x, mlp_mods)
    ref_qkv = _run(lambda t: tuple(m(t) for m in qkv_mods), x, qkv_mods)

    seen = []
    real = tq.dequantize_nf4
    monkeypatch.setattr(tq, "dequantize_nf4", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    for backend in BACKENDS:
        monkeypatch.setattr(tq, "dequantize_nf4_into",
                            lambda *a, backend="auto", _b=backend, **kw: nd.dequantize_nf4_into(*a, backend=_b, **kw))
        clear_dequant_buffers()
        gate, up = lora_part(mlp.gate_proj), lora_part(mlp.up_proj)
        wg = dense_weight(gate, torch.float32)
        _same_bits(wg, _bnb_dequant(gate.weight.data, gate.weight.quant_state))
        assert dense_weight(up, torch.float32).data_ptr() == wg.data_ptr()  # one buffer for both

        seen.clear()
        _close(ref_mlp, _run(lambda t: lora_mlp(t, *[lora_part(m) for m in mlp_mods]), x, mlp_mods))
        assert len(seen) == 6  # forward gate, up, down; backward down, gate, up
        assert len({seen[i].data_ptr() for i in (0, 1, 4, 5)}) == 1
        seen.clear()
        _close(ref_qkv, _run(lambda t: lora_qkv(t, *[lora_part(m) for m in qkv_mods]), x, qkv_mods))
        assert len(seen) == 6 and seen[1].data_ptr() == seen[2].data_ptr()  # k and v
    clear_dequant_buffers()
