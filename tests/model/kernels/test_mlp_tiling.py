"""The token-tiled fused LoRA MLP: the same values and gradients as lora_mlp (fp32, CPU), its chunk rule, a patched
model with the tiling forced on, and the planner's tiled working set."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import nonzero_lora_b
from test_fused_lora import _config, _wrap
from transformers import LlamaForCausalLM

from turbotune.model.kernels.fused_lora import lora_mlp, lora_part
from turbotune.model.kernels import mlp_tiling
from turbotune.model.kernels.mlp_tiling import (
    MLP_TILE_BUDGET_BYTES,
    OFFLOAD_MLP_TILE_BUDGET_BYTES,
    TILE_MULTIPLE,
    TokenTiledMLPFunction,
    mlp_tile_budget,
    mlp_token_chunk,
    tiled_lora_mlp,
)


@pytest.fixture(scope="module")
def mlp_fp32():
    torch.manual_seed(0)
    return _wrap(LlamaForCausalLM(_config()))[2]


def _parts(mlp):
    return [lora_part(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]


def _leaves(parts):
    return [t for p in parts for t in (p.A, p.B) if t is not None]


def _run(fn, x, parts, **kw):
    y = fn(x, *parts, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    want = ([x] if x.requires_grad else []) + _leaves(parts)
    return y, torch.autograd.grad(y, want, dy)


def _assert_rel(got, ref, tol=1e-5):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert err < tol, err


def _check(mlp, x, chunk, **kw):
    parts = _parts(mlp)
    y_ref, g_ref = _run(lora_mlp, x, parts, **kw)
    y, g = _run(tiled_lora_mlp, x, parts, chunk_tokens=chunk, **kw)
    _assert_rel(y, y_ref)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        _assert_rel(a, b)


# --------------------------------------------------------------------------------------------- values, gradients
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("lead,chunk", [((37,), 16), ((2, 20), 8), ((1, 37), 36), ((3, 11), 5)])
def test_tiled_matches_lora_mlp(mlp_fp32, act, lead, chunk):
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    _check(mlp_fp32, x, chunk, act=act)


def test_tiled_input_without_grad(mlp_fp32):
    """x needs no gradient (the first layer's embeddings): only the six A / B get one."""
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(4))
    _check(mlp_fp32, x, 16)


def test_tiled_partial_targets_and_rslora():
    """LoRA on up only (gate, down plain frozen nn.Linear), rsLoRA scaling."""
    torch.manual_seed(0)
    mlp = _wrap(LlamaForCausalLM(_config()), target_modules=["up_proj"], use_rslora=True)[2]
    assert _parts(mlp)[0].A is None
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    _check(mlp, x, 16, act="gelu_tanh")


def test_tiled_saves_only_x_and_adapters(mlp_fp32):
    """Kept from forward to backward: x and the six A / B, no [N, I] tensor and no rank-r product."""
    parts = _parts(mlp_fp32)
    x = torch.randn(48, 64).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = tiled_lora_mlp(x, *parts, chunk_tokens=16)
    assert type(y.grad_fn).__name__ == TokenTiledMLPFunction.__name__ + "Backward"
    assert sorted(tuple(t.shape) for t in saved) == sorted([(48, 64)] + [tuple(t.shape) for t in _leaves(parts)])
    y.sum().backward()
    assert x.grad is not None and all(t.grad is not None for t in _leaves(parts))
    for t in _leaves(parts):
        t.grad = None


def test_tiled_output_unused_same_gradients(mlp_fp32):
    """A recompute whose output nobody reads: zeros for y, no MLP computed in forward, the same gradients."""
    parts = _parts(mlp_fp32)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    _, g_ref = _run(lora_mlp, x, parts)
    calls = []
    apply = mlp_tiling.LoRAMLPFunction.apply
    mlp_tiling.LoRAMLPFunction.apply = lambda *a: calls.append(a[-1]) or apply(*a)
    try:
        y, g = _run(tiled_lora_mlp, x, parts, chunk_tokens=16, output_unused=True)
    finally:
        mlp_tiling.LoRAMLPFunction.apply = apply
    assert torch.count_nonzero(y) == 0
    assert calls == [True, True, True]   # no forward chunk; each of the backward's three chunks skips its down GEMM
    for a, b in zip(g, g_ref):
        _assert_rel(a, b)


# --------------------------------------------------------------------------------------------- chunk rule
def test_mlp_token_chunk():
    mib = 1024 ** 2
    assert mlp_token_chunk(4096, 8960, 2) is None                       # 70 MiB: fits
    assert mlp_token_chunk(8192, 8192, 4, budget_bytes=256 * mib) is None  # exactly the budget
    for n, i, b in ((131072, 8960, 2), (1 << 20, 14336, 2), (65536, 8960, 4)):
        c = mlp_token_chunk(n, i, b)
        assert c is not None and c % TILE_MULTIPLE == 0 and TILE_MULTIPLE <= c < n
        assert c * i * b <= 512 * mib < (c + TILE_MULTIPLE) * i * b   # the largest that fits
    assert mlp_token_chunk(100_000, 1 << 20, 2, budget_bytes=mib) == TILE_MULTIPLE   # floor of one multiple
    assert mlp_token_chunk(200, 1 << 20, 2, budget_bytes=mib) is None  # one chunk would cover every token


def test_mlp_tile_budget(monkeypatch):
    monkeypatch.setenv("TURBOTUNE_OFFLOAD_MLP_TILE", "0")
    assert {mlp_tile_budget(m) for m in (None, "none", "recompute", "offload")} == {MLP_TILE_BUDGET_BYTES}
    monkeypatch.delenv("TURBOTUNE_OFFLOAD_MLP_TILE", raising=False)  # the default: offload tiles
    assert mlp_tile_budget("offload") == OFFLOAD_MLP_TILE_BUDGET_BYTES < MLP_TILE_BUDGET_BYTES
    assert mlp_tile_budget("recompute") == MLP_TILE_BUDGET_BYTES
    # Qwen2-1.5B at 4,096 tokens: untiled when recomputed, tiled under offload
    assert mlp_token_chunk(4096, 8960, 2, mlp_tile_budget("offload")) == 768
    assert mlp_token_chunk(4096, 8960, 2, mlp_tile_budget("recompute")) is None


# --------------------------------------------------------------------------------------------- patched model
def _model(folder, checkpointing):
    from turbotune import FastModel
    model, _ = FastModel.from_pretrained(str(folder), verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, random_state=5, verbose=False,
                                     use_gradient_checkpointing=checkpointing)
    return nonzero_lora_b(model)


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True, "offload"])
def test_patched_model_tiled_equals_untiled(tiny_llama_dir, monkeypatch, checkpointing):
    from turbotune.model.families import llama_like, patch_model

    model = _model(tiny_llama_dir, checkpointing)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    calls = []
    tiled = llama_like.tiled_lora_mlp
    monkeypatch.setattr(llama_like, "tiled_lora_mlp", lambda *a, **k: calls.append(k["chunk_tokens"]) or tiled(*a, **k))

    loss_ref, grads_ref = _loss_and_grads(model, ids, labels)     # 48 tokens: below the budget, untiled
    assert not calls
    monkeypatch.setattr(llama_like, "mlp_token_chunk", lambda n, i, b, budget: 16 if n > 16 else None)
    loss, grads = _loss_and_grads(model, ids, labels)
    assert calls and set(calls) == {16}
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    for n in grads:
        _assert_rel(grads[n], grads_ref[n])

    calls.clear()  # the toggle turns it off
    patch_model(model, mlp_tiling=False)
    loss_off, _ = _loss_and_grads(model, ids, labels)
    assert not calls and abs(loss_off.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())


# --------------------------------------------------------------------------------------------- planner
def test_planner_tiled_working_set_smaller(monkeypatch):
    from turbotune.planner import predict as planner
    from turbotune.planner import layers as planner_layers
    from turbotune.bench.presets import preset_config

    shape = planner.model_shape(preset_config("qwen2-1.5b"))
    H, I, b, a = shape.hidden, shape.intermediate, 2, 4
    cast = a if I < planner_layers.bf16x3_min_features() else 0  # no fp32 copy of [N, I] where bf16x3 runs
    n_short, n_long = 4096, 131072
    short = planner.layer_working_bytes(shape, n_short, "turbotune", b, a, False)
    assert short["mlp_chunk"] is None and short["mlp"] == n_short * I * (b + cast)   # unchanged below the budget
    tiled = planner.layer_working_bytes(shape, n_long, "turbotune", b, a, False)
    c = tiled["mlp_chunk"]
    assert c == mlp_token_chunk(n_long, I, b) and tiled["mlp"] == c * (I * (3 * b + cast) + H * b)
    saved = planner.layer_saved_bytes_per_token(shape, "turbotune", 16, b, a, n_tokens=n_long)
    assert saved["mlp_e_g"] == 0 and saved["mlp_xa"] == 0

    monkeypatch.setattr(planner_layers, "mlp_tile_chunk", lambda *args: None)   # the untiled formula
    untiled = planner.layer_working_bytes(shape, n_long, "turbotune", b, a, False)
    assert untiled["mlp"] == n_long * I * (b + cast)
    assert tiled["mlp"] < untiled["mlp"] and tiled["total"] <= untiled["total"]
    # saved e, g + working set of the one MLP: tiled, a fixed chunk's; untiled, grows with N
    assert tiled["mlp"] * 4 < 2 * n_long * I * b + untiled["mlp"]   # N / C = 4.4 here
    plan_untiled = planner.predict_peak(shape, n_long, 1, checkpointing="none")
    monkeypatch.undo()
    plan_tiled = planner.predict_peak(shape, n_long, 1, checkpointing="none")
    assert plan_tiled.total_bytes < plan_untiled.total_bytes
    assert "MLP tiled over" in next(i.note for i in plan_tiled.items if i.key == "layer_working")


def test_offload_tiles_unless_switched_off(tiny_llama_dir, monkeypatch):
    """Offloaded checkpointing tiles the MLP at its own (smaller) budget (TURBOTUNE_OFFLOAD_MLP_TILE=0: it does
    not), and the loss and every LoRA gradient equal the untiled model's; other modes keep the ordinary budget."""
    from turbotune.model.families import llama_like

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    ref_model = _model(tiny_llama_dir, True)
    ref_model.train()
    loss_ref, grads_ref = _loss_and_grads(ref_model, ids, ids)
    del ref_model

    calls = []
    tiled = llama_like.tiled_lora_mlp
    monkeypatch.setattr(llama_like, "tiled_lora_mlp",
                        lambda *a, **k: calls.append((k["chunk_tokens"], k["output_unused"])) or tiled(*a, **k))
    # one [16, I] row block per budget: 48 tokens tile into three chunks
    model = _model(tiny_llama_dir, "offload")
    model.train()
    intermediate = model.config.intermediate_size
    monkeypatch.setattr(mlp_tiling, "OFFLOAD_MLP_TILE_BUDGET_BYTES", 16 * intermediate * 4)
    monkeypatch.setattr(mlp_tiling, "TILE_MULTIPLE", 16)
    monkeypatch.setenv("TURBOTUNE_OFFLOAD_MLP_TILE", "0")
    _loss_and_grads(model, ids, ids)
    assert not calls   # switched off
    monkeypatch.delenv("TURBOTUNE_OFFLOAD_MLP_TILE")
    loss, grads = _loss_and_grads(model, ids, ids)
    n_layers = model.config.num_hidden_layers
    assert calls.count((16, False)) == n_layers and calls.count((16, True)) == n_layers   # forward, recompute
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        _assert_rel(grads[n], grads_ref[n])


def test_planner_offload_tiles_unless_switched_off(monkeypatch):
    from turbotune.bench.presets import preset_config
    from turbotune.planner import predict as planner

    shape = planner.model_shape(preset_config("qwen2-1.5b"))
    monkeypatch.setenv("TURBOTUNE_OFFLOAD_MLP_TILE", "0")
    before = planner.predict_peak(shape, 2048, 2, checkpointing="offload")
    monkeypatch.delenv("TURBOTUNE_OFFLOAD_MLP_TILE")
    after = planner.predict_peak(shape, 2048, 2, checkpointing="offload")
    recompute = planner.predict_peak(shape, 2048, 2, checkpointing="recompute")
    assert after.per_layer_saved["mlp_e_g"] == 0 and before.per_layer_saved["mlp_e_g"] > 0
    assert recompute.per_layer_saved["mlp_e_g"] > 0
    assert after.allocated_bytes < before.allocated_bytes
    assert "MLP tiled over 768 tokens" in next(i.note for i in after.items if i.key == "layer_working")
