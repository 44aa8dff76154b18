"""Fused LoRA functions vs the real PEFT modules of a tiny Llama (fp32, bf16, bitsandbytes 4-bit; CPU)."""
import tempfile

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from turbotune.model.kernels.fused_lora import (  # noqa: E402
    fused_lora_unsupported_reason, lora_linear, lora_linear_reference, lora_mlp, lora_mlp_reference, lora_part,
    lora_qkv, lora_qkv_reference,
)

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config():
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, vocab_size=128)


def _wrap(model, **lora_kw):
    kw = dict(r=8, lora_alpha=16, target_modules=ALL7, lora_dropout=0.0)
    kw.update(lora_kw)
    pm = get_peft_model(model, LoraConfig(**kw))
    pm.train()
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero; make the adapter matter
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layer = pm.base_model.model.model.layers[0]
    return pm, layer.self_attn, layer.mlp


@pytest.fixture(scope="module")
def llama_fp32():
    torch.manual_seed(0)
    return _wrap(LlamaForCausalLM(_config()))


@pytest.fixture(scope="module")
def llama_4bit():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(_config()).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu", dtype=torch.float32)
    return _wrap(model)


def _x(dtype=torch.float32, requires_grad=True):
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(requires_grad)


def _adapters(mods):
    mods = [m for m in mods if hasattr(m, "lora_A")]  # plain frozen linears have none
    return [m.lora_A["default"].weight for m in mods] + [m.lora_B["default"].weight for m in mods]


def _grads(outs, x, mods):
    loss = sum((o.float() * torch.randn(o.shape, generator=torch.Generator().manual_seed(10 + i))).sum()
               for i, o in enumerate(outs))
    want = ([x] if x.requires_grad else []) + _adapters(mods)
    return torch.autograd.grad(loss, want)


def _compare(ref_outs, outs, ref_grads, grads, tol):
    for r, o in zip(ref_outs, outs):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o.float(), r.float(), rtol=tol, atol=tol * r.float().abs().max().item())
    assert len(ref_grads) == len(grads)
    for r, g in zip(ref_grads, grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        err = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
        assert err < tol, err


def _check_qkv(attn, x, tol, **kw):
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    ref = [m(x) for m in mods]
    rg = _grads(ref, x, mods)
    out = lora_qkv(x, *[lora_part(m) for m in mods], **kw)
    _compare(ref, out, rg, _grads(out, x, mods), tol)


def _check_o(attn, x, tol, **kw):
    ref = attn.o_proj(x)
    rg = _grads([ref], x, [attn.o_proj])
    out = lora_linear(x, lora_part(attn.o_proj), **kw)
    _compare([ref], [out], rg, _grads([out], x, [attn.o_proj]), tol)


def _check_mlp(mlp, x, tol, backend="auto", **kw):
    mods = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    ref = mlp(x)
    rg = _grads([ref], x, mods)
    out = lora_mlp(x, *[lora_part(m) for m in mods], act="silu", backend=backend, **kw)
    _compare([ref], [out], rg, _grads([out], x, mods), tol)


# --------------------------------------------------------------------------------------------- fp32
def test_qkv_fp32(llama_fp32):
    _check_qkv(llama_fp32[1], _x(), 1e-5)


def test_o_fp32(llama_fp32):
    _check_o(llama_fp32[1], _x(), 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mlp_fp32(llama_fp32, backend):
    _check_mlp(llama_fp32[2], _x(), 1e-5, backend)


def test_input_without_grad(llama_fp32):
    """First layer: x (from frozen embeddings) needs no grad; adapters still get theirs."""
    x = _x(requires_grad=False)
    _check_qkv(llama_fp32[1], x, 1e-5)
    _check_mlp(llama_fp32[2], x, 1e-5)


# --------------------------------------------------------------------------------------------- 4-bit
@pytest.mark.usefixtures("bnb_flat_dequant")
def test_4bit_qkv_o_mlp(llama_4bit):
    _, attn, mlp = llama_4bit
    assert attn.q_proj.get_base_layer().weight.quant_state is not None
    x = _x()
    _check_qkv(attn, x, 1e-4)
    _check_o(attn, x, 1e-4)
    _check_mlp(mlp, x, 1e-4)


@pytest.mark.usefixtures("bnb_flat_dequant")
@pytest.mark.parametrize("phase", ["forward", "recompute"])
def test_4bit_mlp_checkpoint_phases(llama_4bit, phase, monkeypatch):
    """"recompute": the dequantised gate/up weights are saved and the backward uses them instead of
    dequantising again; "forward" without a checkpoint around it (its stand-ins kept, never rebuilt): the
    backward sees they are not a recompute's and dequantises. Same values and gradients either way."""
    import turbotune.model.quant as quant
    _, _, mlp = llama_4bit
    x = _x()
    real = quant.dequantize_nf4
    calls = []
    monkeypatch.setattr(quant, "dequantize_nf4", lambda *a, **k: calls.append(k.get("slot")) or real(*a, **k))
    _check_mlp(mlp, x, 1e-4, checkpoint_phase=phase)
    # forward: gate, up, down; backward: down, then gate and up unless held
    assert len(calls) == (4 if phase == "recompute" else 6)
    assert ("mlp-up-held" in calls) == (phase == "recompute")
    if phase == "forward":  # the stand-ins alias no dequant buffer: a second MLP before the backward is harmless
        parts = [lora_part(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        y1 = lora_mlp(x, *parts, checkpoint_phase=phase)
        y2 = lora_mlp(x * 2, *parts, checkpoint_phase=phase)
        (y1.sum() + y2.sum()).backward()


# --------------------------------------------------------------------------------------------- bf16 base, fp32 adapters
@pytest.mark.parametrize("adapter_precision", ["peft", "input"])
def test_bf16_base_fp32_adapters(adapter_precision):
    torch.manual_seed(0)
    _, attn, mlp = _wrap(LlamaForCausalLM(_config()).to(torch.bfloat16))
    assert attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    x = _x(torch.bfloat16)
    tol = 2e-2 if adapter_precision == "peft" else 3e-2  # "input": bf16 rank-r products and adapter grads
    _check_qkv(attn, x, tol, adapter_precision=adapter_precision)
    _check_o(attn, x, tol, adapter_precision=adapter_precision)
    _check_mlp(mlp, x, tol, adapter_precision=adapter_precision)


# --------------------------------------------------------------------------------------------- partial targets
def test_partial_targets_rslora_and_gelu():
    """LoRA on q, v, up only (k, gate, down plain frozen nn.Linear), rsLoRA scaling, GeGLU activation."""
    torch.manual_seed(0)
    _, attn, mlp = _wrap(LlamaForCausalLM(_config()), target_modules=["q_proj", "v_proj", "up_proj"],
                         use_rslora=True)
    assert isinstance(attn.k_proj, torch.nn.Linear) and lora_part(attn.k_proj).A is None
    assert lora_part(attn.q_proj).scaling == pytest.approx(16 / 8 ** 0.5)
    x = _x()
    _check_qkv(attn, x, 1e-5)
    mods = [mlp.up_proj]
    ref = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    rg = _grads([ref], x, mods)
    out = lora_mlp(x, lora_part(mlp.gate_proj), lora_part(mlp.up_proj), lora_part(mlp.down_proj), act="gelu_tanh")
    _compare([ref], [out], rg, _grads([out], x, mods), 1e-5)


# --------------------------------------------------------------------------------------------- what is saved
@pytest.mark.usefixtures("bnb_flat_dequant")
def test_mlp_saves_no_h_and_no_dense_weight(llama_4bit):
    _, _, mlp = llama_4bit
    mods = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    x = _x()
    with torch.no_grad():
        e, g = mods[0](x), mods[1](x)
        h = F.silu(e) * g
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_mlp(x, *[lora_part(m) for m in mods])
    wide = [t for t in saved if t.shape[-1] == 160 and t.numel() >= 10 * 160]
    assert len(wide) == 2
    for t in wide:
        assert not torch.allclose(t.reshape(h.shape), h, atol=1e-4)  # e and g, never h
    assert any(torch.allclose(t.reshape(e.shape), e, atol=1e-5) for t in wide)
    assert any(torch.allclose(t.reshape(g.shape), g, atol=1e-5) for t in wide)
    dense_shapes = {(160, 64), (64, 160)}
    assert not any(tuple(t.shape) in dense_shapes for t in saved)  # neither a dense W nor a dequantised one
    assert not any(t.dtype == torch.uint8 for t in saved)
    y.sum().backward()


def test_qkv_saves_x_and_rank_r_only(llama_fp32):
    attn = llama_fp32[1]
    saved = []
    x = _x()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_qkv(x, *[lora_part(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(2, 5, 64), (10, 8), (10, 8), (10, 8)])


# --------------------------------------------------------------------------------------------- unsupported
def test_unsupported_reasons():
    torch.manual_seed(0)
    pm, attn, _ = _wrap(LlamaForCausalLM(_config()), lora_dropout=0.1)
    assert "lora_dropout=0.1" in fused_lora_unsupported_reason(attn.q_proj)
    assert lora_part(attn.q_proj) is None
    _, attn, _ = _wrap(LlamaForCausalLM(_config()), use_dora=True)
    assert "DoRA" in fused_lora_unsupported_reason(attn.q_proj)
    cfg = _config()
    cfg.attention_bias = True  # lora_bias needs a base bias
    _, attn, _ = _wrap(LlamaForCausalLM(cfg), lora_bias=True, target_modules=["q_proj"])
    assert fused_lora_unsupported_reason(attn.q_proj) == "bias on lora"
    pm, attn, _ = _wrap(LlamaForCausalLM(_config()))
    assert fused_lora_unsupported_reason(attn.q_proj) is None
    attn.q_proj.merge()
    assert fused_lora_unsupported_reason(attn.q_proj) == "merged"
    attn.q_proj.unmerge()
    with pm.disable_adapter():
        assert fused_lora_unsupported_reason(attn.q_proj) == "disable_adapters"
    attn.o_proj.get_base_layer().weight.requires_grad_(True)
    assert fused_lora_unsupported_reason(attn.o_proj) == "base weight is trainable"


# --------------------------------------------------------------------------------------------- fp32 adapter kernels
@pytest.mark.parametrize("backend", ["triton", "bf16x3", "auto"])
def test_bf16_base_fp32_adapters_without_fp32_copies(backend, monkeypatch):
    """fp32-adapter backend "triton" | "bf16x3" (a model's set_fp32_adapter_backend; here given to the parts):
    the fp32 rank-r products read bf16 activations without fp32 copies (kernels/skinny_fp32.py,
    kernels/bf16x3.py) and give what the torch path (fp32 copies + fp32 matmul, PEFT's recipe) gives."""
    from turbotune.model.kernels import lora_parts
    if backend == "auto":  # as on a GPU, with the width rule cutting through this model: each product its way
        monkeypatch.setattr(lora_parts, "_bf16x3_available", lambda wide: True)
        monkeypatch.setattr(lora_parts, "BF16X3_MIN_FEATURES", 100)  # gate/up dY, h: bf16x3; x, q/k/v dY: torch
    widths = []
    wide_mm = lora_parts.bf16x3.wide_mm_fp32
    monkeypatch.setattr(lora_parts.bf16x3, "wide_mm_fp32", lambda w, s: widths.append(max(w.shape)) or wide_mm(w, s))
    torch.manual_seed(0)
    _, attn, mlp = _wrap(LlamaForCausalLM(_config()).to(torch.bfloat16))
    x = _x(torch.bfloat16)
    results = {}
    for name in ("torch", backend):
        mods = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        outs = list(lora_qkv(x, *[lora_part(m, name) for m in mods[:3]]))
        outs.append(lora_mlp(x, *[lora_part(m, name) for m in mods[3:]], act="silu"))
        outs.append(lora_linear(x, lora_part(attn.o_proj, name)))
        results[name] = (outs, _grads(outs, x, mods + [attn.o_proj]))
    if backend == "auto":  # only the [tokens, 160] activations (gate/up dY, h) went the bf16x3 way
        assert set(widths) == {160}, widths  # [10 tokens, features] or its transpose
    (ro, rg), (to, tg) = results["torch"], results[backend]
    for r, o in zip(ro, to):
        torch.testing.assert_close(o.float(), r.float(), rtol=1e-2, atol=1e-2 * r.float().abs().max().item())
    for r, g in zip(rg, tg):
        assert g.dtype == r.dtype
        err = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
        assert err < (1e-2 if g.dtype == torch.bfloat16 else 1e-5), err  # x's grad is bf16; adapters' fp32


def test_adapters_sharing_x_share_one_gemm(monkeypatch):
    """bf16x3 way: q/k/v's x A^T come from one GEMM with the A's stacked, and their dA from one GEMM with the
    u's side by side (x read once); each equals its own product to fp32 rounding."""
    from turbotune.model.kernels import lora_parts
    torch.manual_seed(0)
    _, attn, _ = _wrap(LlamaForCausalLM(_config()).to(torch.bfloat16))
    parts = [lora_part(m, fp32_backend="bf16x3") for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    x2 = _x(torch.bfloat16, requires_grad=False).reshape(-1, 64)
    xc = lora_parts.CastCache(x2)
    lds = [torch.float32] * 3
    calls = []
    wide_mm = lora_parts.bf16x3.wide_mm_fp32
    monkeypatch.setattr(lora_parts.bf16x3, "wide_mm_fp32", lambda w, s: calls.append(s.shape) or wide_mm(w, s))
    joint = lora_parts.adapter_products(x2, xc, parts, lds)
    assert calls == [(64, 24)]  # one GEMM: [in, 3 r]
    us = [torch.randn(10, 8, generator=torch.Generator().manual_seed(j)) for j in range(3)]
    d_as = lora_parts.joint_a_grads(us, x2, parts)
    assert calls[1:] == [(10, 24)]
    for j, p in enumerate(parts):
        torch.testing.assert_close(joint[j], lora_parts.adapter_product(x2, xc, p, torch.float32),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_as[j], lora_parts._a_grad(us[j], x2, None, p, "bf16x3"),
                                   rtol=1e-6, atol=1e-6)
        assert d_as[j].shape == p.A.shape and d_as[j].is_contiguous()


def test_fp32_adapter_backend_is_validated():
    from turbotune.model.kernels import lora_parts
    with pytest.raises(ValueError):
        lora_parts.set_fp32_adapter_backend("cuda", torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- the references
@pytest.mark.parametrize("which", ["fp32", "4bit"])
@pytest.mark.usefixtures("bnb_flat_dequant")
def test_references_equal_peft_and_the_fused_functions(which, request):
    """lora_*_reference (plain PyTorch, kept beside the fused functions) give PEFT's values and gradients, and
    so do the fused functions: one chain fused == reference == PEFT."""
    _, attn, mlp = request.getfixturevalue(f"llama_{which}")
    x = _x()
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    mlp3 = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    for peft_outs, ref_fn, fused_fn, mods in [
        (lambda: [m(x) for m in qkv], lambda: lora_qkv_reference(x, *map(lora_part, qkv)),
         lambda: lora_qkv(x, *map(lora_part, qkv)), qkv),
        (lambda: [attn.o_proj(x)], lambda: [lora_linear_reference(x, lora_part(attn.o_proj))],
         lambda: [lora_linear(x, lora_part(attn.o_proj))], [attn.o_proj]),
        (lambda: [mlp(x)], lambda: [lora_mlp_reference(x, *map(lora_part, mlp3))],
         lambda: [lora_mlp(x, *map(lora_part, mlp3))], mlp3),
    ]:
        want = list(peft_outs())
        want_g = _grads(want, x, mods)
        for fn in (ref_fn, fused_fn):
            got = list(fn())
            _compare(want, got, want_g, _grads(got, x, mods), 1e-5 if which == "fp32" else 1e-4)
