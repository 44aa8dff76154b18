"""Exactly pinned host buffers on a GPU: registered with CUDA (torch's `is_pinned` only knows its own allocator's
blocks, so it is not asked), their own size (not torch's power-of-two block), copies both ways
equal, and offloaded checkpointing with large layer inputs in eager steps gives the recompute-only gradients.

Run on a GPU: pytest tests/gpu/test_host_buffers_gpu.py -q
"""
import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_exact_pinned_buffer_round_trip():
    from turbotune.model.host_buffers import EXACT_PIN_BYTES, HostBufferPool
    x = torch.randn(EXACT_PIN_BYTES // 2 + 12_345, device="cuda", dtype=torch.bfloat16)  # just over the threshold
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    pool = HostBufferPool(pin_memory=True)
    key, host = pool.acquire(0, x)
    assert host.numel() == x.numel() and host.data_ptr() in pool._registered
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before  # not torch's allocator
    host.copy_(x, non_blocking=True)
    back = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, x)
    pool.release(key, host)
    assert pool.acquire(0, x, may_drop=True)[1] is host
    pool.clear()
    assert not pool._registered


def test_offload_with_exactly_pinned_inputs_matches_recompute(monkeypatch):
    """Eager offloaded steps whose layer inputs take the exact-pinning path: same gradients as recompute."""
    from conftest import nonzero_lora_b
    from turbotune import FastModel
    from turbotune.model import host_buffers
    from turbotune.bench.presets import build_preset_model
    from turbotune.model.checkpointing import get_offloaded_checkpointing

    monkeypatch.setattr(host_buffers, "EXACT_PIN_BYTES", 1 << 12)
    monkeypatch.setattr("turbotune.model.offload_transfers.EXACT_PIN_BYTES", 1 << 12)
    import tempfile
    folder = build_preset_model("tiny", 0, tempfile.mkdtemp(), "cuda", log=lambda *a: None)

    def run(mode):
        m, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, verbose=False)
        m = FastModel.get_peft_model(m, r=4, use_gradient_checkpointing=mode, verbose=False, random_state=0)
        nonzero_lora_b(m)
        oc = get_offloaded_checkpointing(m)
        if oc is not None:
            oc.config.min_offload_bytes = 0
        m.train()
        ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # the second and third steps reuse the pinned buffers
                m(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        # calls whose inputs are pinned in place stay eager instead of failing a capture (cuda_graphs.pinned_in_place)
        assert not [w for w in caught if "capture failed" in str(w.message)]
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, oc

    ref, _ = run(True)
    got, oc = run("offload")
    assert oc.stats["offloaded_inputs"] > 0 and oc._host_pool._registered
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
