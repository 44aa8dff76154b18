"""Offloaded gradient checkpointing (turbotune.model.checkpointing), on the CPU.

On the CPU the saved inputs are already on the host, so no copy happens, but the mechanism is the one the GPU
runs: the layer forward without autograd, one saved input per layer, the prefetch of the layer before in the
backward, the recompute (with the forward's RNG state) and the gradients through it.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_model  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune._compat import checkpointing_enable, is_checkpointing  # noqa: E402
from turbotune.model.checkpointing import (  # noqa: E402
    OffloadConfig, OffloadedCheckpointing, estimate_offload_memory, find_decoder_layers,
    get_offloaded_checkpointing, offloaded_bytes_per_layer)
from turbotune.model.lora import enable_gradient_checkpointing  # noqa: E402
from turbotune.model.state import turbo_state  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_ON_HOST = OffloadConfig(min_offload_bytes=0)  # tiny tensors: offload them anyway so the path runs


def _tiny_peft(lora_dropout=0.0, attention_dropout=0.0, input_grads=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=attention_dropout,
                      attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=lora_dropout))
    _nonzero_lora_b(model)
    if input_grads:
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model.train()


def _nonzero_lora_b(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _batch(vocab=256, batch=2, seq=16):
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids}


def _loss_and_grads(model, batch, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b, rtol=1e-6, atol=1e-8):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 3 * 7 * 2
    for name, g in grads_a.items():
        assert g.abs().sum() > 0, name  # every adapter gets a gradient, layer 0 included
        torch.testing.assert_close(grads_b[name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("input_grads", [False, True], ids=["input-no-grad", "input-requires-grad"])
def test_offload_equals_no_checkpointing_and_transformers(input_grads):
    batch = _batch()
    plain = _loss_and_grads(_tiny_peft(input_grads=input_grads), batch)

    hf = _tiny_peft(input_grads=True)  # transformers' checkpointing needs inputs that require grad
    checkpointing_enable(hf, use_reentrant=False)
    _assert_same(plain, _loss_and_grads(hf, batch))

    model = _tiny_peft(input_grads=input_grads)
    layers = find_decoder_layers(model)
    assert layers is model.base_model.model.model.layers
    seen = []
    layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    oc = OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    _assert_same(plain, _loss_and_grads(model, batch))
    assert seen == [input_grads]  # without input grads, layer 0's LoRA grads come through the parameter inputs
    assert oc.stats["recomputes"] == 3


def test_stats_and_prefetch_order(monkeypatch):
    model = _tiny_peft()
    oc = OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    order = []
    prefetch = oc._prefetch
    monkeypatch.setattr(oc, "_prefetch", lambda entry: (order.append(entry.index), prefetch(entry)))
    recomputed = []
    for i, layer in enumerate(find_decoder_layers(model)):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: recomputed.append(i) if torch.is_grad_enabled() else None)

    loss = model(**_batch()).loss
    per_layer = 2 * 16 * 64 * 4
    assert oc.stats == dict(saved_inputs=3, offloaded_inputs=2, offloaded_bytes=2 * per_layer, kept_on_device=1,
                            prefetches=0, prefetch_hits=0, sync_restores=0, recomputes=0)
    assert recomputed == []  # the forward ran without autograd
    loss.backward()
    # backward visits layers 2, 1, 0; each one, once its own input is in hand, prefetches the one before it
    assert recomputed == [2, 1, 0]
    assert order == [1, 0]
    assert oc.stats["prefetches"] == 2 and oc.stats["prefetch_hits"] == 2 and oc.stats["sync_restores"] == 0
    assert oc.stats["recomputes"] == 3 and oc._pending == []

    # the last layer offloaded too: its input is the one restored without a prefetch
    oc.remove()
    oc = OffloadedCheckpointing(OffloadConfig(min_offload_bytes=0, keep_last_on_gpu=False)).apply(model)
    model(**_batch()).loss.backward()
    assert oc.stats["saved_inputs"] == 3 and oc.stats["offloaded_inputs"] == 3 and oc.stats["kept_on_device"] == 0
    assert oc.stats["sync_restores"] == 1 and oc.stats["prefetch_hits"] == 2

    # default threshold (1 MiB): these inputs are too small to be worth a copy; plain recompute
    oc.remove()
    oc = OffloadedCheckpointing().apply(model)
    model(**_batch()).loss.backward()
    assert oc.stats["saved_inputs"] == 3 and oc.stats["offloaded_inputs"] == 0 and oc.stats["prefetches"] == 0
    assert oc.stats["recomputes"] == 3


def test_enabled_false_is_plain_recompute():
    batch = _batch()
    plain = _loss_and_grads(_tiny_peft(), batch)
    model = _tiny_peft()
    with OffloadedCheckpointing(enabled=False, min_offload_bytes=0).apply(model) as oc:
        _assert_same(plain, _loss_and_grads(model, batch))
        assert oc.stats["kept_on_device"] == 3 and oc.stats["offloaded_inputs"] == 0 and oc.stats["recomputes"] == 3


def test_dropout_masks_replayed_in_recompute():
    batch = _batch()
    plain = _loss_and_grads(_tiny_peft(lora_dropout=0.2, attention_dropout=0.2), batch, seed=11)
    again = _loss_and_grads(_tiny_peft(lora_dropout=0.2, attention_dropout=0.2), batch, seed=12)
    assert not torch.equal(plain[0], again[0])  # dropout is live: another seed, another loss

    model = _tiny_peft(lora_dropout=0.2, attention_dropout=0.2)
    oc = OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    _assert_same(plain, _loss_and_grads(model, batch, seed=11))
    # the global RNG stream after the step is the one without checkpointing (the recompute forks it)
    ref_model = _tiny_peft(lora_dropout=0.2, attention_dropout=0.2)
    torch.manual_seed(11)
    ref_model(**batch).loss.backward()
    expected_next = torch.rand(4)
    torch.manual_seed(11)
    model(**batch).loss.backward()
    assert torch.equal(torch.rand(4), expected_next)

    # without replaying the RNG state the recompute draws other masks: the test above is sensitive to it
    oc.remove()
    OffloadedCheckpointing(OffloadConfig(min_offload_bytes=0, preserve_rng_state=False)).apply(model)
    loss, grads = _loss_and_grads(model, batch, seed=11)
    torch.testing.assert_close(loss, plain[0])  # the forward is the same...
    assert any(not torch.allclose(grads[n], g) for n, g in plain[1].items())  # ...the backward is not


def test_remove_restores_forwards_and_context_manager():
    model = _tiny_peft()
    layers = list(find_decoder_layers(model))
    before = [layer.forward for layer in layers]
    assert all("forward" not in layer.__dict__ for layer in layers)
    with OffloadedCheckpointing(ALL_ON_HOST).apply(model) as oc:
        assert get_offloaded_checkpointing(model) is oc and oc.applied
        assert all("forward" in layer.__dict__ for layer in layers)
        with pytest.raises(Exception, match="already applied"):
            OffloadedCheckpointing().apply(model)
    assert get_offloaded_checkpointing(model) is None and not oc.applied
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert [layer.forward for layer in layers] == before
    oc.remove()  # idempotent
    n = oc.stats["saved_inputs"]
    model(**_batch()).loss.backward()
    assert oc.stats["saved_inputs"] == n  # no longer involved


def test_eval_no_grad_and_generate_bypass():
    model = _tiny_peft()
    batch = _batch()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
        gen_ref = model.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=5, do_sample=False,
                                 use_cache=True, pad_token_id=0)
    oc = OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, ref)
        gen = model.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=5, do_sample=False,
                             use_cache=True, pad_token_id=0)
    assert torch.equal(gen, gen_ref)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert oc.stats["saved_inputs"] == 0


def test_apply_turns_transformers_checkpointing_off_and_lora_routing():
    model = _tiny_peft(input_grads=True)
    checkpointing_enable(model, use_reentrant=False)
    assert is_checkpointing(model)
    oc = OffloadedCheckpointing().apply(model)
    assert not is_checkpointing(model)
    # switched back on behind our back (e.g. by a Trainer): transformers' checkpointing runs, with a warning
    checkpointing_enable(model, use_reentrant=False)
    with pytest.warns(UserWarning, match="no offload"):
        model(**_batch()).loss.backward()
    assert oc.stats["saved_inputs"] == 0
    oc.remove()

    enable_gradient_checkpointing(model, "offload")
    first = get_offloaded_checkpointing(model)
    # the defaults, except that a model without dropout needs no RNG state saved for the recompute
    assert first is not None and first.config == OffloadConfig(preserve_rng_state=False)
    assert not is_checkpointing(model)
    enable_gradient_checkpointing(model, "offload")  # again: replaced, not nested
    assert get_offloaded_checkpointing(model) is not first and not first.applied
    enable_gradient_checkpointing(model, True)  # transformers' checkpointing instead
    assert get_offloaded_checkpointing(model) is None and is_checkpointing(model)
    enable_gradient_checkpointing(model, "offload")
    enable_gradient_checkpointing(model, False)
    assert get_offloaded_checkpointing(model) is None and not is_checkpointing(model)
    assert all("forward" not in layer.__dict__ for layer in find_decoder_layers(model))


@pytest.fixture(scope="module")
def tiny3_dir(tmp_path_factory, smol_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-3"), smol_tokenizer, "llama", num_hidden_layers=3)


def test_fastmodel_patched_offload(tiny3_dir, smol_tokenizer):
    """The patched fused forwards (fused LoRA, RoPE in place, RMSNorm, fused CE) under the recompute."""
    def run(mode):
        model, _ = FastModel.from_pretrained(str(tiny3_dir), patch=True, verbose=False)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=mode, verbose=False)
        _nonzero_lora_b(model)
        model.train()
        return model, _loss_and_grads(model, _batch(vocab=len(smol_tokenizer)))

    _, plain = run(False)
    model, offload = run("offload")
    _assert_same(plain, offload, rtol=1e-5, atol=1e-7)
    oc = get_offloaded_checkpointing(model)
    assert oc is not None and not is_checkpointing(model)
    assert oc.stats["saved_inputs"] == 3 and oc.stats["recomputes"] == 3
    assert turbo_state(model.get_base_model()).patches  # the family patch is in place


class _TupleLayer(nn.Module):
    """A 4.x-style decoder layer: returns a tuple; takes a gate tensor (requiring grad) from outside the layer."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, hidden_states, attention_mask=None, gate=None, position_embeddings=None, use_cache=False):
        cos, sin = position_embeddings
        h = self.drop(torch.tanh(self.lin(hidden_states))) * gate * cos + sin
        return (hidden_states + h * attention_mask, None)


class _TupleModel(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.layers = nn.ModuleList(_TupleLayer(d) for _ in range(n))

    def forward(self, x):
        mask = torch.ones(x.shape[:-1] + (1,))
        pe = (torch.full((x.shape[-1],), 0.9), torch.full((x.shape[-1],), 0.1))
        for layer in self.layers:
            x = layer(x, attention_mask=mask, gate=self.gate * 1.0, position_embeddings=pe, use_cache=True)[0]
        return x.square().mean()


def test_tuple_outputs_grad_kwargs_retain_graph_and_inplace_check():
    torch.manual_seed(0)
    ref = _TupleModel().train()
    model = _TupleModel().train()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)

    def grads(m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = m(x)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    expected = grads(ref)
    oc = OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    assert find_decoder_layers(model) is model.layers
    loss, got = grads(model)
    torch.testing.assert_close(loss, expected[0])
    for name, g in expected[1].items():  # `gate` reaches the layers as a kwarg tensor that requires grad
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-8, msg=name)

    # retain_graph: the saved inputs survive the first backward; the second one doubles the gradients
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = model(x)
    loss.backward(retain_graph=True)
    loss.backward()
    for name, g in expected[1].items():
        torch.testing.assert_close(model.get_parameter(name).grad, 2 * g, rtol=1e-6, atol=1e-8, msg=name)

    # a forward whose graph is dropped leaves nothing pending
    model(x)
    assert all(r() is None for r in oc._pending)

    # an input edited in place after the forward cannot be recomputed: an error, not wrong gradients
    oc.remove()
    OffloadedCheckpointing(enabled=False).apply(model)
    h = torch.randn(2, 5, 8, requires_grad=True) * 1.0
    out = model.layers[0](h, attention_mask=torch.ones(2, 5, 1), gate=model.gate,
                          position_embeddings=(torch.ones(8), torch.zeros(8)))[0]
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    # ... and so is a layer that edits its own input (the saved copy could not match what the layer used)
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, hidden_states):
            return self.lin(hidden_states.mul_(2.0))

    holder = nn.Module()
    holder.layers = nn.ModuleList([Inplace()])
    OffloadedCheckpointing(ALL_ON_HOST).apply(holder)
    with pytest.raises(RuntimeError, match="modified in place"):
        holder.layers[0](torch.randn(2, 8))


def test_autocast_state_replayed_in_recompute():
    """Mixed precision: the recompute runs under the forward's autocast state (here CPU bf16 autocast)."""
    torch.manual_seed(0)
    ref, model = _TupleModel(d=16).train(), _TupleModel(d=16).train()
    model.load_state_dict(ref.state_dict())
    OffloadedCheckpointing(ALL_ON_HOST).apply(model)
    x = torch.randn(2, 5, 16)
    grads = []
    for m in (ref, model):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x)
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_memory_helpers():
    assert offloaded_bytes_per_layer(2, 4096, 4096, torch.bfloat16) == 2 * 4096 * 4096 * 2
    assert offloaded_bytes_per_layer(1, 10, 8, "fp32") == 320
    per = 1 * 8192 * 4096 * 2
    m = estimate_offload_memory(32, 1, 8192, 4096, "bf16")
    assert m.per_layer_bytes == per and m.offloaded_layers == 31
    assert m.host_bytes == 31 * per and m.device_saved_bytes == per and m.device_backward_bytes == 2 * per
    assert m.device_saved_by_offload == 31 * per
    off = estimate_offload_memory(32, 1, 8192, 4096, torch.bfloat16, OffloadConfig(enabled=False))
    assert off.host_bytes == 0 and off.device_saved_bytes == 32 * per
    small = estimate_offload_memory(32, 1, 16, 64, torch.bfloat16)  # 2 KiB per layer < 1 MiB threshold
    assert small.offloaded_layers == 0
    every = estimate_offload_memory(32, 1, 8192, 4096, torch.bfloat16, OffloadConfig(keep_last_on_gpu=False))
    assert every.offloaded_layers == 32 and every.device_saved_bytes == 0


# ------------------------------------------------------------------------------------------------------ GPU
# Not run here (no GPU): these check what the CPU cannot, the copies, streams and the memory actually saved.
# Run: pytest tests/test_checkpointing.py -q -m gpu -s      (-s prints the step times and memory)

def _nrel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("pin_memory", [True, False])
def test_gpu_offload_grads_and_pinned_copies(pin_memory):
    batch = {k: v.cuda() for k, v in _batch().items()}
    plain = _loss_and_grads(_tiny_peft().cuda(), batch)
    model = _tiny_peft().cuda()
    oc = OffloadedCheckpointing(OffloadConfig(min_offload_bytes=0, pin_memory=pin_memory)).apply(model)
    loss = model(**batch).loss
    saved = [r() for r in oc._pending]
    assert [e.index for e in saved] == [0, 1, 2]
    assert [e.tensor.device.type for e in saved] == ["cpu", "cpu", "cuda"]  # the last one stays
    assert all(e.tensor.is_pinned() == pin_memory for e in saved[:2])
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.cuda.synchronize()
    got = (loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    _assert_same(plain, got, rtol=1e-5, atol=1e-6)
    assert oc.stats["prefetches"] == 2 and oc.stats["prefetch_hits"] == 2 and oc.stats["sync_restores"] == 0


@pytest.mark.gpu
def test_gpu_fastmodel_patched_offload(tiny3_dir, smol_tokenizer):
    def run(mode):
        model, _ = FastModel.from_pretrained(str(tiny3_dir), patch=True, verbose=False)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=mode, verbose=False)
        _nonzero_lora_b(model)
        get = get_offloaded_checkpointing(model)
        if get is not None:
            get.config.min_offload_bytes = 0
        model.train()
        batch = {k: v.cuda() for k, v in _batch(vocab=len(smol_tokenizer), seq=64).items()}
        return model, _loss_and_grads(model, batch)

    _, plain = run(False)
    model, offload = run("offload")
    assert _nrel(offload[0], plain[0]) < 1e-3
    for name, g in plain[1].items():
        assert _nrel(offload[1][name], g) < 1e-2, name
    assert get_offloaded_checkpointing(model).stats["offloaded_inputs"] == 2


@pytest.mark.gpu
def test_gpu_memory_saved_vs_transformers_checkpointing():
    """bf16, 8 layers, 8k tokens: the saved inputs (16 MiB a layer) leave the GPU; the step stays correct."""
    import gc
    import time

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers, seq, hidden = 8, 8192, 1024
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    _nonzero_lora_b(model)
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 1024, (1, seq), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def step():
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator retire blocks the side-stream copies were reading
        held = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return dict(loss=loss.detach(), grads=grads, held=held, peak=peak, seconds=seconds)

    enable_gradient_checkpointing(model, True)
    step()  # warm-up
    hf = step()
    enable_gradient_checkpointing(model, "offload")
    oc = get_offloaded_checkpointing(model)
    step()
    off = step()
    per_layer = offloaded_bytes_per_layer(1, seq, hidden, torch.bfloat16)
    assert oc.stats["offloaded_inputs"] == 2 * (layers - 1)  # two steps, last layer kept
    print(f"\nafter forward: transformers ckpt holds {hf['held'] / 2**20:.0f} MiB, offload {off['held'] / 2**20:.0f}"
          f" MiB (expected saving {(layers - 1) * per_layer / 2**20:.0f} MiB); backward peak {hf['peak'] / 2**20:.0f}"
          f" vs {off['peak'] / 2**20:.0f} MiB; step {hf['seconds'] * 1e3:.1f} vs {off['seconds'] * 1e3:.1f} ms")
    assert hf["held"] - off["held"] >= 0.9 * (layers - 1) * per_layer
    assert off["peak"] <= hf["peak"]
    assert _nrel(off["loss"], hf["loss"]) < 1e-3
    for name, g in hf["grads"].items():
        assert _nrel(off["grads"][name], g) < 2e-2, name
