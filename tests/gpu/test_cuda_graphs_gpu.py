"""CUDA-graph replay of a training micro-step equals the eager step (losses, gradients, optimizer updates).

Run on a GPU: pytest tests/gpu/test_cuda_graphs_gpu.py -q
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from turbotune.bench.presets import build_preset_model
    return build_preset_model("tiny", 0, tmp_path_factory.mktemp("graphs"), "cuda", log=lambda *a: None)


def _model(folder, dtype, checkpointing, qlora=False, precision="peft"):
    from turbotune import FastModel
    m, _ = FastModel.from_pretrained(str(folder), dtype=dtype, load_in_4bit=qlora, verbose=False)
    m = FastModel.get_peft_model(m, r=8, use_gradient_checkpointing=checkpointing, verbose=False,
                                 random_state=1, adapter_precision=precision)
    m.train()
    return m


def _run(m, graphs, batches, ga=2):
    from turbotune.training.cuda_graphs import GraphedMicroStep
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    step = GraphedMicroStep(m, params, enabled=graphs, warmup=1)
    losses = []
    for i, ids in enumerate(batches):
        losses.append(step({"input_ids": ids, "labels": ids}, 1.0 / ga).float().item())
        if (i + 1) % ga == 0:
            opt.step()
            step.zero_grad() if step.active else opt.zero_grad(set_to_none=True)
    return losses, [p.detach().float().clone() for p in params], step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_graph_replay_equals_eager(tiny_dir, dtype, checkpointing):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 64), generator=g).cuda() for _ in range(8)]
    batches.insert(5, torch.randint(0, 512, (2, 40), generator=g).cuda())  # a new shape mid-run: eager
    batches.insert(6, batches[5].clone())
    ref_losses, ref_params, _ = _run(_model(tiny_dir, dtype, checkpointing), False, batches)
    losses, params, step = _run(_model(tiny_dir, dtype, checkpointing), True, batches)
    assert step.active, step.disabled_reason
    assert step.captures >= 1 and step.replays >= 5
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (losses, ref_losses)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_graph_replay_qlora(tiny_dir):
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 64), generator=g).cuda() for _ in range(6)]
    ref_losses, ref_params, _ = _run(_model(tiny_dir, torch.bfloat16, True, qlora=True), False, batches)
    losses, params, step = _run(_model(tiny_dir, torch.bfloat16, True, qlora=True), True, batches)
    assert step.replays >= 3
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b))
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def _grads_after_one_pass(m, ids):
    torch.manual_seed(5)
    for n, p in m.named_parameters():  # B = 0 at init would make every dA zero: give B values (same in both)
        if p.requires_grad and "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    m(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.float().clone() for p in m.parameters() if p.requires_grad]


def test_qlora_recompute_held_weights_match_no_checkpointing(tiny_dir):
    """On the GPU (Triton dequantisation, bf16): the recompute's kept gate/up weights give the gradients of the
    step without checkpointing, which dequantises everything in the backward."""
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
    ref = _grads_after_one_pass(_model(tiny_dir, torch.bfloat16, False, qlora=True), ids)
    got = _grads_after_one_pass(_model(tiny_dir, torch.bfloat16, True, qlora=True), ids)
    worst = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(got, ref))
    assert worst < 1e-2, worst


def test_input_precision_close_to_peft(tiny_dir):
    """bf16 adapter math ("input") differs from PEFT's fp32 adapter math by rounding only: the same losses to
    bf16 precision and the same gradients to ~1% (norm-relative). Compared on gradients, not on weights after
    AdamW steps: Adam turns tiny gradient differences of near-zero entries into full-size update differences."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 512, (2, 64), generator=g).cuda() for _ in range(4)]
    ref_losses, _, _ = _run(_model(tiny_dir, torch.bfloat16, False), False, batches)
    losses, _, _ = _run(_model(tiny_dir, torch.bfloat16, False, precision="input"), False, batches)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-2 * abs(b)
    ref = _grads_after_one_pass(_model(tiny_dir, torch.bfloat16, False), batches[0])
    got = _grads_after_one_pass(_model(tiny_dir, torch.bfloat16, False, precision="input"), batches[0])
    worst = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(got, ref))
    assert worst < 3e-2, worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_packed_rows_replay_graphs_like_eager(tiny_dir, tmp_path, dtype):
    """turbotune train's GPU default: packed rows of one shape, replayed from CUDA graphs after two eager
    steps (the short last micro-batch filled with a label-free row); per-step losses equal the eager run's."""
    from transformers import AutoTokenizer

    from turbotune.bench.packing import make_length_mix
    from turbotune.training.config import TrainConfig
    from turbotune.training.trainer import Trainer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    samples = make_length_mix(0, 40, 512, lo=5, hi=120)

    def run(graphs):
        model = _model(tiny_dir, dtype, False)
        cfg = TrainConfig(output_dir=str(tmp_path / f"g{graphs}"), batch_size=2, grad_accum=2, max_steps=6,
                          packing=None, max_seq_length=256, cuda_graphs=graphs, lr=1e-3, warmup_steps=0, seed=3)
        t = Trainer(cfg, model, tok, samples, progress=False)
        assert cfg.packing is True  # the GPU default
        result = t.train()
        return [h["loss"] for h in result.history], t.micro

    eager, m0 = run(False)
    graphed, m1 = run(True)
    assert not m0.active and m1.active and m1.replays > 0, (m1.disabled_reason, m1.replays)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(graphed, eager):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (graphed, eager)


def test_trainer_packed_rows_with_sequence_offsets_equal_the_document_mask(tiny_dir, tmp_path, monkeypatch):
    """TURBOTUNE_FLASH_VARLEN (the default): turbotune train's packed rows carry fixed-size sample offsets and every
    layer runs FlashAttention's varlen kernel over the rows end to end, replayed from graphs; per-step losses equal
    the run with transformers' document mask (bf16: flash and masked SDPA round differently)."""
    from transformers import AutoTokenizer

    from turbotune.bench.packing import make_length_mix
    from turbotune.model.kernels import flash_support
    from turbotune.training.config import TrainConfig
    from turbotune.training.trainer import Trainer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    samples = make_length_mix(0, 40, 512, lo=5, hi=120)

    def run(varlen):
        monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1" if varlen else "0")  # on by default
        model = _model(tiny_dir, torch.bfloat16, False)
        cfg = TrainConfig(output_dir=str(tmp_path / f"v{varlen}"), batch_size=2, grad_accum=2, max_steps=6,
                          packing=None, max_seq_length=256, cuda_graphs=True, lr=1e-3, warmup_steps=0, seed=3)
        t = Trainer(cfg, model, tok, samples, progress=False)
        assert t.collate.sequence_offsets == varlen
        result = t.train()
        return [h["loss"] for h in result.history], t.micro

    masked, _ = run(False)
    offsets, micro = run(True)
    assert micro.active and micro.replays > 0, micro.disabled_reason
    assert any(k[0] == "varlen" and ok for k, ok in flash_support._support.items()), flash_support._support
    for a, b in zip(offsets, masked):
        assert abs(a - b) <= 5e-3 * max(1.0, abs(b)), (offsets, masked)


def test_captured_attention_stays_causal_without_a_mask(tiny_dir, monkeypatch):
    """Plain rows (no position_ids, no mask): the captured step's SDPA calls get is_causal and no mask, as the
    eager ones do (transformers would otherwise build a full mask while capturing: about 3x slower attention)."""
    import torch.nn.functional as F
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal")),
                     torch.cuda.is_current_stream_capturing()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    _, _, step = _run(_model(tiny_dir, torch.bfloat16, True), True, [ids] * 4)
    assert step.captures == 1, step.disabled_reason
    during_capture = [s for s in seen if s[2]]
    assert during_capture and all(no_mask and causal for no_mask, causal, _ in during_capture), seen


def test_graph_replay_with_offloaded_checkpointing_equals_eager(tiny_dir):
    """capture_offload=True: the layer inputs' copies to pinned host memory and back are captured (static
    host buffers from the eager warm-ups) and the replayed steps equal the eager offloaded steps."""
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    from turbotune.training.cuda_graphs import GraphedMicroStep

    def run(graphs):
        m = _model(tiny_dir, torch.bfloat16, "offload")
        oc = get_offloaded_checkpointing(m)
        oc.config.min_offload_bytes = 0  # the tiny model's inputs are small: offload them anyway
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        step = GraphedMicroStep(m, params, enabled=graphs, warmup=1, capture_offload=True)
        g = torch.Generator().manual_seed(0)
        losses = []
        for i in range(8):
            ids = torch.randint(0, 512, (2, 64), generator=g).cuda()
            losses.append(step({"input_ids": ids, "labels": ids}, 0.5).float().item())
            if i % 2 == 1:
                opt.step()
                step.zero_grad() if step.active else opt.zero_grad(set_to_none=True)
        return losses, [p.detach().float().clone() for p in params], step, oc

    ref_losses, ref_params, _, _ = run(False)
    losses, params, step, oc = run(True)
    assert step.active and step.replays >= 5, step.disabled_reason
    assert oc.stats["offloaded_inputs"] > 0 and oc._host_pool.allocated > 0
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (losses, ref_losses)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("qlora", [False, True])
def test_recompute_without_the_down_projection_keeps_gradients(tiny_dir, qlora, monkeypatch):
    """bf16 on the GPU (4-bit base too): the recompute skips the MLP's down projection (recompute.py) and the
    LoRA gradients still equal those of a run without checkpointing."""
    if qlora:
        pytest.importorskip("bitsandbytes")
    import turbotune.model.families.llama_like as ll
    from turbotune.model.kernels.fused_lora import lora_mlp
    flags = []
    monkeypatch.setattr(ll, "lora_mlp", lambda *a, **k: flags.append(k.get("output_unused")) or lora_mlp(*a, **k))
    ids = torch.randint(0, 512, (2, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        m = _model(tiny_dir, torch.bfloat16, checkpointing, qlora=qlora)
        for name, p in m.named_parameters():  # non-zero B, so every A gets a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device="cuda").manual_seed(1))
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    assert True in flags  # the recompute did skip
    for name, ref in grads[0].items():
        err = ((grads[1][name] - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        assert err < 1e-2, (name, err)
