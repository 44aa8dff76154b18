"""GraphedMicroStep on the CPU: it must be an exact, inactive pass-through there, and its bookkeeping (shape
keys, gradient buffers) must keep replay equal to eager. The capture itself is tested in tests/gpu."""
import pytest
import torch

from turbotune import FastModel
from turbotune.model.lora import uses_dropout
from turbotune.training.cuda_graphs import GraphedMicroStep, why_not_graphable


def _model(folder, **kw):
    m, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, verbose=False)
    m = FastModel.get_peft_model(m, r=4, verbose=False, **kw)
    m.train()
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


def test_cpu_model_is_eager_and_exact(tiny_llama_dir):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _model(tiny_llama_dir, use_gradient_checkpointing=False)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    (ref_loss * 0.5).backward()
    m = _model(tiny_llama_dir, use_gradient_checkpointing=False)
    step = GraphedMicroStep(m, [p for p in m.parameters() if p.requires_grad])
    assert not step.active and "CUDA" in step.disabled_reason
    loss = step({"input_ids": ids, "labels": ids}, loss_scale=0.5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    g_ref, g = _grads(ref), _grads(m)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=0)
    assert step.replays == 0 and step.captures == 0


def test_disabled_on_request(tiny_llama_dir):
    m = _model(tiny_llama_dir)
    assert GraphedMicroStep(m, list(m.parameters()), enabled=False).disabled_reason == "turned off"


def test_dropout_detection(tiny_llama_dir):
    assert not uses_dropout(_model(tiny_llama_dir))
    m = _model(tiny_llama_dir, lora_dropout=0.1)
    assert uses_dropout(m)


def test_why_not_graphable_reasons(tiny_llama_dir):
    m = _model(tiny_llama_dir)
    params = [p for p in m.parameters() if p.requires_grad]
    assert "CUDA" in why_not_graphable(m, params)
    assert why_not_graphable(m, []) is not None


def test_recheck_switches_off_and_never_back_on(tiny_llama_dir):
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    m = _model(tiny_llama_dir, use_gradient_checkpointing="offload")
    step = GraphedMicroStep(m, list(m.parameters()))
    # CPU parameters: the offload's host buffers are left as they were (static ones are for graph capture only)
    assert not get_offloaded_checkpointing(m).config.static_host_buffers
    step.disabled_reason = None  # pretend it was capturable; the model on the CPU is not
    step.recheck()
    assert "CUDA" in step.disabled_reason
    step.disable("shapes change")
    step.recheck()
    assert step.disabled_reason == "shapes change"


def test_shape_key(tiny_llama_dir):
    m = _model(tiny_llama_dir)
    step = GraphedMicroStep(m, list(m.parameters()))
    step.disabled_reason = None  # pretend, to test the keying alone
    a = torch.zeros(2, 8, dtype=torch.long)
    assert step._key({"input_ids": a}, 1.0) is None  # CPU tensors never replay
    a = a.to("meta")
    k1 = step._key({"input_ids": a, "use_cache": False}, 1.0)
    assert k1 is None  # meta is not cuda either
    step.disabled_reason = "x"
    assert step._key({"input_ids": a}, 1.0) is None


def test_calls_pinned_in_place_stay_eager(tiny_llama_dir, monkeypatch):
    """Offloaded layer inputs at or over host_buffers.EXACT_PIN_BYTES go to memory pinned in place, which a capture
    can't copy into: such calls are not keyed (eager), smaller ones are; without offloading, nothing changes."""
    from turbotune.model import host_buffers
    from turbotune.training.cuda_graphs import pinned_in_place
    m = _model(tiny_llama_dir, use_gradient_checkpointing="offload")
    width = m.get_input_embeddings().weight.shape[-1] * 4  # fp32 bytes per token of a layer input
    monkeypatch.setattr(host_buffers, "EXACT_PIN_BYTES", 2 * 16 * width)
    small, large = torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)
    assert not pinned_in_place(m, {"input_ids": small})
    assert pinned_in_place(m, {"input_ids": large})
    assert pinned_in_place(m, {"inputs_embeds": torch.zeros(1, 32, 8)})
    assert not pinned_in_place(m, {"labels": large})
    step = GraphedMicroStep(m, list(m.parameters()))
    step.disabled_reason = None  # pretend, to test the keying alone
    assert step._key({"input_ids": large.to("meta")}, 1.0) is None
    assert not pinned_in_place(_model(tiny_llama_dir, use_gradient_checkpointing=True), {"input_ids": large})


def test_claim_grads_moves_values_into_the_graph_buffers(tiny_llama_dir):
    m = _model(tiny_llama_dir)
    params = [p for p in m.parameters() if p.requires_grad]
    step = GraphedMicroStep(m, params)
    step._claim_grads()
    bufs = [p.grad for p in params]
    assert all(b is not None and not b.any() for b in bufs)
    params[0].grad = torch.full_like(params[0], 3.0)   # someone replaced it
    params[1].grad = None                              # someone set it to None after writing into the buffer
    bufs[1].fill_(7.0)
    step._claim_grads()
    assert params[0].grad is bufs[0] and torch.all(bufs[0] == 3.0)
    assert params[1].grad is bufs[1] and not bufs[1].any()
    bufs[0].fill_(1.0)
    step.zero_grad()
    assert not bufs[0].any()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_keeps_rng_state_only_with_dropout(tiny_llama_dir, dropout):
    """Recompute without dropout needs no saved RNG state (and reading it can't be captured in a graph)."""
    m = _model(tiny_llama_dir, lora_dropout=dropout, use_gradient_checkpointing=True)
    layer = m.base_model.model.model.layers[0]
    fn = getattr(layer, "_gradient_checkpointing_func", None) or layer._activation_checkpointing_func
    fn = getattr(fn, "__wrapped__", fn)  # recompute.marking_recompute's wrapper
    kw = getattr(fn, "keywords", {})
    assert kw.get("preserve_rng_state", True) is (dropout > 0)


def test_capture_of_plain_rows_keeps_sdpa_causal(tiny_llama_dir, monkeypatch):
    """While a stream is captured transformers can't check position_ids on the host and keeps a full mask,
    which costs SDPA its causal kernel. one_sequence_per_row restores the eager answer (no mask) for batches
    with one sequence per row, and leaves batches that carry position_ids or a mask alone."""
    import transformers.masking_utils as mu

    from turbotune.training.cuda_graphs import one_sequence_per_row
    from turbotune._compat import call_create_causal_mask

    m = _model(tiny_llama_dir)
    cfg = m.config
    embeds = torch.zeros(2, 6, cfg.hidden_size)
    positions = torch.arange(6).unsqueeze(0)
    assert call_create_causal_mask(mu.create_causal_mask, cfg, embeds, positions) is None  # eager: no mask

    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)  # what stream capture looks like to it
    captured = call_create_causal_mask(mu.create_causal_mask, cfg, embeds, positions)
    assert isinstance(captured, torch.Tensor)  # the slow path this guards against
    with one_sequence_per_row({"input_ids": torch.zeros(2, 6, dtype=torch.long)}):
        assert call_create_causal_mask(mu.create_causal_mask, cfg, embeds, positions) is None
    with one_sequence_per_row({"input_ids": torch.zeros(2, 6, dtype=torch.long), "position_ids": positions}):
        assert isinstance(call_create_causal_mask(mu.create_causal_mask, cfg, embeds, positions), torch.Tensor)
    assert mu.find_packed_sequence_indices.__name__ == "find_packed_sequence_indices"  # restored
    assert mu.is_tracing() is True


def test_capture_without_the_causal_skip_of_transformers_5_17(tiny_llama_dir, monkeypatch):
    """transformers 5.17 also refused to skip the causal mask whenever is_tracing() held (stream capture
    included), padding mask or not. Emulated here by a skip check that consults is_tracing() first."""
    import transformers.masking_utils as mu

    from turbotune.training.cuda_graphs import one_sequence_per_row
    from turbotune._compat import call_create_causal_mask

    skip = mu._ignore_causal_mask_sdpa

    def skip_as_in_5_17(padding_mask, *args, **kwargs):
        if mu.is_tracing(padding_mask):
            return False
        return skip(padding_mask, *args, **kwargs)

    m = _model(tiny_llama_dir)
    embeds, positions = torch.zeros(2, 6, m.config.hidden_size), torch.arange(6).unsqueeze(0)
    monkeypatch.setattr(mu, "_ignore_causal_mask_sdpa", skip_as_in_5_17)
    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert isinstance(call_create_causal_mask(mu.create_causal_mask, m.config, embeds, positions), torch.Tensor)
    with one_sequence_per_row({"input_ids": torch.zeros(2, 6, dtype=torch.long)}):
        assert call_create_causal_mask(mu.create_causal_mask, m.config, embeds, positions) is None
