"""In-place RoPE kernel (Triton, interpreted on CPU) against the reference and HF's apply_rotary_pos_emb."""
import pytest
import torch

from turbotune.model.kernels.rope import RoPEFunction, apply_rope_, rope_reference

# (batch, seq, q heads, kv heads, head_dim): GQA, MHA, seq 1, batch 1 and 3, head_dim 80 / 96 (not 2^k)
SHAPES = [(3, 5, 4, 2, 80), (1, 1, 2, 1, 8), (2, 4, 3, 3, 96), (1, 3, 6, 2, 64)]
MAX_POS = 32


def _tols(dtype):
    # bf16: the kernel rounds once in fp32, HF rounds three times in bf16 (and Triton's CPU interpreter
    # truncates when storing bf16): up to ~2 ulp.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _tables(head_dim, dtype=torch.float32):
    """HF-style tables [MAX_POS, D]: frequencies repeated in both halves."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(MAX_POS).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(B, S, Hq, Hk, D, dtype, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, S, Hq, D).to(dtype), torch.randn(B, S, Hk, D).to(dtype)


def _hf(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qe.transpose(1, 2), ke.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_both_position_modes(shape, dtype):
    B, S, Hq, Hk, D = shape
    q, k = _qk(B, S, Hq, Hk, D, dtype)
    ct, st = _tables(D, dtype)
    torch.manual_seed(1)
    pos = torch.randint(0, MAX_POS, (B, S))
    cos, sin = ct[pos], st[pos]  # gathered per token, as HF's rotary embedding returns them
    q_hf, k_hf = _hf(q, k, cos, sin)
    q_ref, k_ref = rope_reference(q, k, cos, sin)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)
    assert [torch.equal(a, b) for a, b in zip(rope_reference(q, k, ct, st, pos), (q_hf, k_hf))] == [True, True]

    qa, ka = q.clone(), k.clone()
    ptrs = qa.data_ptr(), ka.data_ptr()
    out = apply_rope_(qa, ka, cos, sin, backend="triton")
    assert (out[0].data_ptr(), out[1].data_ptr()) == ptrs  # in place
    torch.testing.assert_close(qa, q_hf, **_tols(dtype))
    torch.testing.assert_close(ka, k_hf, **_tols(dtype))

    qb, kb = q.clone(), k.clone()
    apply_rope_(qb, kb, ct, st, position_ids=pos, backend="triton")
    assert torch.equal(qb, qa) and torch.equal(kb, ka)  # both modes: same values, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradients_through_following_op(shape, dtype):
    """q, k as views of one fused projection (the usual case), then a following op; grads vs HF."""
    B, S, Hq, Hk, D = shape
    torch.manual_seed(0)
    x = torch.randn(B, S, 16, requires_grad=True)
    w = torch.randn((Hq + 2 * Hk) * D, 16) * 0.3
    ct, st = _tables(D, dtype)
    pos = torch.arange(S).expand(B, S)
    gq, gk = torch.randn(B, S, Hq, D).to(dtype), torch.randn(B, S, Hk, D).to(dtype)

    def project():
        qkv = (x @ w.T).to(dtype)
        return qkv[..., :Hq * D].view(B, S, Hq, D), qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D)

    q, k = project()
    qe, ke = _hf(q, k, ct[pos], st[pos])
    ref = torch.autograd.grad((qe * gq).sum() + (ke * gk).sum(), x)[0]
    for position_ids in (None, pos):
        q, k = project()
        cos, sin = (ct[pos], st[pos]) if position_ids is None else (ct, st)
        qo, ko = apply_rope_(q, k, cos, sin, position_ids, backend="triton")
        assert qo.grad_fn is not None and qo.data_ptr() == q.data_ptr()
        got = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), x)[0]
        torch.testing.assert_close(got, ref, **(_tols(dtype) if dtype == torch.float32
                                               else dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())))


def test_non_view_inputs_are_marked_dirty():
    B, S, Hq, Hk, D = 2, 3, 4, 2, 16
    torch.manual_seed(0)
    q0 = torch.randn(B, S, Hq, D, requires_grad=True)
    k0 = torch.randn(B, S, Hk, D, requires_grad=True)
    q, k = q0 * 1.0, k0 * 1.0  # non-leaf, not views
    ct, st = _tables(D)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])  # per-row positions (e.g. a later chunk)
    v_before = q._version
    qo, ko = apply_rope_(q, k, ct, st, pos, backend="triton")
    assert qo is q and ko is k and q._version > v_before and isinstance(q.grad_fn, RoPEFunction._backward_cls)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    qr, kr = rope_reference(q0, k0, ct, st, pos)
    dq, dk = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum(), [q0, k0])
    torch.testing.assert_close(q0.grad, dq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k0.grad, dk, rtol=1e-5, atol=1e-5)


def test_inverse_rotation_roundtrip():
    """The backward map (sin negated for HF tables) undoes the forward."""
    q, k = _qk(2, 4, 3, 1, 80, torch.float32)
    ct, st = _tables(80)
    pos = torch.randint(0, MAX_POS, (2, 4))
    qa, ka = q.clone(), k.clone()
    apply_rope_(qa, ka, ct, st, pos, backend="triton")
    apply_rope_(qa, ka, ct, -st, pos, backend="triton")
    torch.testing.assert_close(qa, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka, k, rtol=1e-5, atol=1e-5)


def test_arbitrary_strides_and_broadcasts():
    """q/k transposed from [B, H, S, D] storage, cos/sin with batch 1, position_ids with batch 1."""
    B, S, Hq, Hk, D = 3, 4, 2, 1, 96
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, D).transpose(1, 2)
    k = torch.randn(B, Hk, S, D).transpose(1, 2)
    ct, st = _tables(D)
    pos = torch.arange(3, 3 + S)[None]
    q_hf, k_hf = _hf(q, k, ct[pos], st[pos])
    qa, ka = q.clone(memory_format=torch.preserve_format), k.clone(memory_format=torch.preserve_format)
    assert qa.stride() == q.stride()
    apply_rope_(qa, ka, ct[pos], st[pos], backend="triton")  # cos [1, S, D]
    torch.testing.assert_close(qa, q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka, k_hf, rtol=1e-5, atol=1e-5)
    qb, kb = q.clone(memory_format=torch.preserve_format), k.clone(memory_format=torch.preserve_format)
    apply_rope_(qb, kb, ct, st, pos, backend="triton")  # position_ids [1, S]
    assert torch.equal(qb, qa) and torch.equal(kb, ka)


def test_stale_saved_base_fails_loudly():
    """In place on views bumps the version counter: an op that saved the base errors in backward."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3 * 16, requires_grad=True)
    qkv = x * 2.0
    other = qkv.sin()  # saves qkv
    q, k = qkv[..., :32].view(1, 2, 2, 16), qkv[..., 32:].view(1, 2, 1, 16)
    ct, st = _tables(16)
    qo, ko = apply_rope_(q, k, ct, st, torch.tensor([[0, 1]]), backend="triton")
    with pytest.raises(RuntimeError, match="inplace"):
        (qo.sum() + ko.sum() + other.sum()).backward()


def test_torch_backend_and_errors():
    q, k = _qk(2, 3, 2, 1, 8, torch.float32)
    ct, st = _tables(8)
    pos = torch.tensor([[0, 1, 2], [4, 5, 6]])
    qa, ka = q.clone(), k.clone()
    out = apply_rope_(qa, ka, ct, st, pos, backend="torch")
    assert out[0].data_ptr() == qa.data_ptr()
    ref = rope_reference(q, k, ct, st, pos)
    assert torch.equal(qa, ref[0]) and torch.equal(ka, ref[1])
    qb, kb = q.clone(), k.clone()
    apply_rope_(qb, kb, ct, st, pos)  # auto on CPU -> reference
    assert torch.equal(qb, qa)
    with pytest.raises(RuntimeError):  # in place on a leaf that requires grad
        apply_rope_(q.clone().requires_grad_(), k.clone(), ct[pos], st[pos], backend="triton")
    with pytest.raises(ValueError):  # odd head_dim
        apply_rope_(torch.randn(1, 2, 1, 7), torch.randn(1, 2, 1, 7), torch.randn(1, 2, 7), torch.randn(1, 2, 7),
                    backend="triton")
    with pytest.raises(ValueError):  # table mode needs 2-D tables
        apply_rope_(q.clone(), k.clone(), ct[pos], st[pos], pos, backend="triton")
