"""HostBufferPool: one buffer per (layer, shape, dtype) reused once released; a busy key gets another."""
import torch

from turbotune.model.host_buffers import HostBufferPool


def test_reuse_after_release_and_a_second_buffer_while_busy():
    pool = HostBufferPool(pin_memory=False)
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    k1, b1 = pool.acquire(0, x)
    k2, b2 = pool.acquire(0, x)          # layer 0 busy: a second forward before the backward
    assert b1.data_ptr() != b2.data_ptr() and pool.allocated == 2
    assert b1.shape == x.shape and b1.dtype == x.dtype and b1.device.type == "cpu"
    pool.release(k1, b1)
    k3, b3 = pool.acquire(0, x)
    assert b3 is b1 and pool.allocated == 2  # reused, nothing new
    _, other = pool.acquire(1, x)           # another layer: its own buffer
    _, wider = pool.acquire(0, torch.zeros(2, 4, dtype=torch.bfloat16))  # another shape: its own buffer
    assert pool.allocated == 4 and other is not b1 and wider.shape == (2, 4)
    assert pool.bytes == 2 * (2 * 3 * 2) + 2 * 3 * 2 + 2 * 4 * 2
    pool.clear()
    assert pool.allocated == 0


def test_offloaded_checkpointing_with_static_buffers_matches_plain(tiny_llama_dir):
    """On the CPU the input is already on the host (no copy), so this checks the bookkeeping around the pool
    leaves results unchanged; the copies themselves are tested in tests/gpu/test_cuda_graphs_gpu.py."""
    from conftest import nonzero_lora_b
    from turbotune import FastModel
    from turbotune.model.checkpointing import get_offloaded_checkpointing

    def run(static):
        m, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
        m = FastModel.get_peft_model(m, r=4, use_gradient_checkpointing="offload", verbose=False, random_state=0)
        nonzero_lora_b(m)
        oc = get_offloaded_checkpointing(m)
        oc.config.static_host_buffers, oc.config.min_offload_bytes = static, 0
        m.train()
        ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, oc.stats

    ref, _ = run(False)
    got, stats = run(True)
    assert stats["offloaded_inputs"] > 0
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=0, msg=name)


class _FakeCudart:
    def __init__(self):
        self.registered = {}

    def cudaHostRegister(self, ptr, nbytes, flags):
        assert ptr % 4096 == 0 and ptr not in self.registered
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        del self.registered[ptr]
        return 0


def test_large_buffers_are_pinned_exactly_and_unpinned_when_dropped(monkeypatch):
    """torch's pinned allocator rounds blocks up to a power of two (4 GiB for a 2.9 GB layer input); large buffers
    are pinned in place at their exact size instead, reused, and unpinned when dropped (CUDA stood in for here;
    tests/gpu/test_host_buffers_gpu.py pins for real)."""
    from turbotune.model import host_buffers
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(host_buffers, "EXACT_PIN_BYTES", 1 << 16)
    pool = host_buffers.HostBufferPool(pin_memory=True, limit_bytes=3 * 96 * 1024 * 2)
    big = torch.zeros(96, 1024, dtype=torch.bfloat16)            # 192 KiB: pinned exactly
    k1, b1 = pool.acquire(0, big)
    assert b1.shape == big.shape and b1.dtype == big.dtype and b1.data_ptr() % 4096 == 0
    assert fake.registered == {b1.data_ptr(): 96 * 1024 * 2}
    pool.release(k1, b1)
    assert pool.acquire(0, big, may_drop=True)[1] is b1 and len(fake.registered) == 1  # reused, not pinned again
    pool.release(k1, b1)
    _, b2 = pool.acquire(1, big, may_drop=True)
    _, b3 = pool.acquire(2, big, may_drop=True)
    assert len(fake.registered) == 3 and pool.bytes == 3 * 96 * 1024 * 2
    _, wider = pool.acquire(3, torch.zeros(100, 1024, dtype=torch.bfloat16), may_drop=True)  # past the limit:
    assert b1.data_ptr() not in fake.registered and len(fake.registered) == 3              # the free one went
    pool.clear()
    assert fake.registered == {} and pool.bytes == 0
