"""bf16 checks of the fused linear+CE and fused LoRA ops on CUDA at realistic sizes (Qwen2-1.5B-like shapes).

Run: pytest tests/gpu/test_fused_gpu.py -q        (skipped without a GPU)
Timings: bench/kernel_bench.py --op fused_linear_ce,lora_mlp.
"""
import tempfile

import pytest
import torch

from turbotune.model.kernels.fused_linear_ce import fused_linear_cross_entropy, linear_cross_entropy_reference

pytestmark = pytest.mark.gpu

N_TOK, HIDDEN, VOCAB, INTER = 4096, 1536, 151936, 8960
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _nrel(a, b):
    """Norm-relative error ||a - b|| / ||b|| (robust to a few one-ulp outliers)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _ce_inputs(train_w, bias=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N_TOK, HIDDEN, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_(train_w)
    b = (torch.randn(VOCAB, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_() if bias else None
    labels = torch.randint(0, VOCAB, (N_TOK,), device="cuda", generator=g)
    labels[torch.rand(N_TOK, device="cuda", generator=g) < 0.1] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("train_w,bias,softcap", [(False, False, None), (True, True, 30.0)])
def test_fused_ce_bf16_cuda(backend, train_w, bias, softcap):
    hidden, weight, b, labels = _ce_inputs(train_w, bias)
    ts = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    ref = linear_cross_entropy_reference(hidden, weight, labels, bias=b, softcap=softcap)
    rg = torch.autograd.grad(ref, ts)
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=b, softcap=softcap, backend=backend)
    og = torch.autograd.grad(out, ts)
    assert abs(out.item() - ref.item()) < 1e-2 * max(1.0, abs(ref.item()))
    for o, r in zip(og, rg):
        assert o.dtype == r.dtype
        assert _nrel(o, r) < 1e-2


def test_fused_ce_memory_cuda():
    hidden, weight, _, labels = _ce_inputs(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    peak_fused = torch.cuda.max_memory_allocated() - base
    hidden.grad = None
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy_reference(hidden, weight, labels).backward()
    peak_ref = torch.cuda.max_memory_allocated() - base
    # fused: one 512 x V bf16 chunk (156 MB) + grad_hidden; reference: bf16 + fp32 logits and their grads (GBs)
    assert peak_fused < 0.1 * peak_ref, (peak_fused, peak_ref)


# --------------------------------------------------------------------------------------------- LoRA
def _peft_layer(quant4=False, fp32_adapters=True):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=12, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=256)
    torch.manual_seed(0)
    if quant4:
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig
        with tempfile.TemporaryDirectory() as d:
            LlamaForCausalLM(cfg).save_pretrained(d)
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cuda",
                                                     dtype=torch.bfloat16)
    else:
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL7, lora_dropout=0.0),
                             autocast_adapter_dtype=fp32_adapters)
    pm.train()
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.02)
    layer = pm.base_model.model.model.layers[0]
    return layer.self_attn, layer.mlp


def _lora_grads(outs, x, mods):
    g = torch.Generator(device="cuda").manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=g)).sum() for o in outs)
    params = [x] + [m.lora_A["default"].weight for m in mods] + [m.lora_B["default"].weight for m in mods]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("quant4,adapter_precision", [(False, "peft"), (False, "input"), (True, "peft")])
def test_fused_lora_bf16_cuda(quant4, adapter_precision):
    from turbotune.model.kernels.fused_lora import lora_linear, lora_mlp, lora_part, lora_qkv
    attn, mlp = _peft_layer(quant4)
    x = torch.randn(2, N_TOK // 2, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases = [
        ([attn.q_proj, attn.k_proj, attn.v_proj], lambda: [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)],
         lambda ps: list(lora_qkv(x, *ps, adapter_precision=adapter_precision))),
        ([attn.o_proj], lambda: [attn.o_proj(x)],
         lambda ps: [lora_linear(x, *ps, adapter_precision=adapter_precision)]),
        ([mlp.gate_proj, mlp.up_proj, mlp.down_proj], lambda: [mlp(x)],
         lambda ps: [lora_mlp(x, *ps, adapter_precision=adapter_precision)]),
    ]
    for mods, ref_fn, fused_fn in cases:
        parts = [lora_part(m) for m in mods]
        assert all(p is not None for p in parts)
        ref = ref_fn()
        rg = _lora_grads(ref, x, mods)
        out = fused_fn(parts)
        og = _lora_grads(out, x, mods)
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and _nrel(o, r) < 1e-2
        for o, r in zip(og, rg):
            assert o.dtype == r.dtype and _nrel(o, r) < 1e-2


# --------------------------------------------------------------------------------------------- timings (manual)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_token_logprobs_and_mean_logits_bf16_cuda(softcap):
    """The fused head's per-token log-probs (DPO/KTO) and TRL's mean logits, compiled kernel, bf16, 152k vocab."""
    from turbotune.model.kernels.fused_token_logprobs import (fused_linear_token_logprobs,
                                                              linear_token_logprobs_reference)
    hidden, weight, _, labels = _ce_inputs(False, seed=3)
    hidden, labels = hidden[:1024], labels[:1024]
    ref = linear_token_logprobs_reference(hidden, weight, labels, softcap=softcap, mean_logits=True)
    got = fused_linear_token_logprobs(hidden, weight, labels, softcap=softcap, backend="triton", mean_logits=True)
    kept = labels != -100
    assert _nrel(got[0][kept], ref[0][kept]) < 1e-2
    assert _nrel(got[1][kept], ref[1][kept]) < 1e-2
    assert _nrel(got[3][kept], ref[3][kept]) < 1e-2 and (got[3][~kept] == 0).all()
    (g_ref,) = torch.autograd.grad(ref[0].sum(), hidden)
    (g_got,) = torch.autograd.grad(got[0].sum(), hidden)
    assert _nrel(g_got, g_ref) < 2e-2
