"""Gemma 2's soft-capped attention on the Triton kernels (kernels/softcap_attention.py), bf16 on CUDA, against the
fp32 reference: values and gradients, grouped-query heads, Gemma 2's head sizes (2B: 256 with 8 heads over 4;
9B: 256, 16 over 8; 27B: 128, 32 over 16), a binding window; a CUDA-graph replay; and a tiny Gemma 2 trained with
the switch against the stock eager model.

Run: pytest tests/gpu/test_softcap_attention_gpu.py -q -s   (-s prints the timings)
"""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from turbotune.model.kernels import flash_support  # noqa: E402
from turbotune.model.kernels import softcap_attention as sa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import nrel  # noqa: E402


def _qkv(b, length, hq, hkv, d, seed=0, spread=2.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(b, length, hq, d, device="cuda", generator=g) * spread).bfloat16().requires_grad_()
    k = (torch.randn(b, length, hkv, d, device="cuda", generator=g) * spread).bfloat16().requires_grad_()
    v = torch.randn(b, length, hkv, d, device="cuda", generator=g).bfloat16().requires_grad_()
    return q, k, v


@pytest.mark.parametrize("hq,hkv,d", [(8, 4, 256), (16, 8, 256), (32, 16, 128)])
@pytest.mark.parametrize("length,window", [(1000, None), (1024, 300)])
def test_kernels_match_reference(hq, hkv, d, length, window):
    q, k, v = _qkv(2, length, hq, hkv, d, seed=d + hq)
    scale, cap = d ** -0.5, 5.0  # scores of spread 2 inputs reach past a cap of 5: the cap binds
    out = sa.softcap_attention(q, k, v, scale, cap, window)
    kind = "softcap" if window is None else "softcap-window"
    assert flash_support._support.get((kind, q.device.index, torch.bfloat16, d)) is True, "the kernels did not run"
    ref = sa.softcap_attention_reference(q.float(), k.float(), v.float(), scale, cap, window)
    assert nrel(out, ref) < 1e-2
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert nrel(a, b) < 2e-2, name


def test_packed_row_matches_reference():
    """A packed row's sample offsets (varlen_attention.sequence_offsets): attention stays inside each sample."""
    from turbotune.model.kernels.varlen_attention import sequence_offsets
    q, k, v = _qkv(1, 2048, 16, 8, 256, seed=3)
    offsets = sequence_offsets(torch.tensor([300, 17, 900], device="cuda"), 2048)
    out = sa.softcap_attention(q, k, v, 1 / 16, 5.0, 1000, offsets=offsets)
    assert flash_support._support.get(("softcap-window-packed", 0, torch.bfloat16, 256)) is True
    starts = sa.sample_starts(offsets, 2048)
    ref = sa.softcap_attention_reference(q.float(), k.float(), v.float(), 1 / 16, 5.0, 1000, starts)
    assert nrel(out, ref) < 1e-2
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.float())):
        assert nrel(a, b) < 2e-2


def test_graph_replay_and_timing():
    """Not a speed target (those live in the bench): prints the kernels against the eager attention transformers
    runs for Gemma 2, and checks forward and backward replay from a CUDA graph."""
    from types import SimpleNamespace

    from conftest import cuda_time_ms
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv(2, 2048, 16, 8, 256)
    scale = 256 ** -0.5
    sa.softcap_attention(q, k, v, scale, 50.0)  # the probe, outside the capture

    def ours():
        out = sa.softcap_attention(q, k, v, scale, 50.0)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    mask = torch.full((2048, 2048), float("-inf"), device="cuda").triu(1).bfloat16()[None, None]
    module = SimpleNamespace(num_key_value_groups=2, training=True, head_dim=256)

    def eager():
        out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                         scaling=scale, softcap=50.0)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    print(f"\ngemma2-9b attention fwd+bwd, 2 x 2048: kernels {cuda_time_ms(ours):.2f} ms, "
          f"eager {cuda_time_ms(eager):.2f} ms")
    expected = ours()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = ours()
    graph.replay()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_gemma2_trains_like_stock(tmp_path, monkeypatch):
    """A tiny Gemma 2 in bf16 (a cap that binds, a window shorter than the batch): the patched model with the
    switch equals stock eager attention within bf16 rounding, loss and LoRA gradients."""
    from conftest import make_tiny_model, nonzero_lora_b

    from turbotune import FastModel
    from turbotune.bench.presets import _placeholder_tokenizer

    monkeypatch.setenv("TURBOTUNE_SOFTCAP_ATTENTION", "1")
    tokenizer = _placeholder_tokenizer({"vocab_size": 1024})  # one token per id (the GPU machine has no SmolLM2)
    folder = make_tiny_model(tmp_path, tokenizer, "gemma2", head_dim=64, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=64, query_pre_attn_scalar=64,
                             attn_logit_softcapping=1.0)

    def build(patch):
        m, _ = FastModel.from_pretrained(str(folder), dtype=torch.bfloat16, verbose=False,
                                         patch=patch)
        return nonzero_lora_b(FastModel.get_peft_model(m, r=8, random_state=5, verbose=False,
                                                       use_gradient_checkpointing=True))

    ids = torch.randint(0, 1000, (2, 200), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    losses, grads = [], []
    for patch in (False, True):
        model = build(patch)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])
    for n, g in grads[0].items():
        assert nrel(grads[1][n], g) < 5e-2, n
