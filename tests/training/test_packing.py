"""Padding-free packing: row filling, collation, attention mode, and exact equality with padded batches."""
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_model, nonzero_lora_b  # noqa: E402

from turbotune.training import packing  # noqa: E402
from turbotune._compat import dtype_kwargs  # noqa: E402
from turbotune.data.dataset import DataCollator  # noqa: E402
from turbotune.model.families import is_patched  # noqa: E402
from turbotune.training.packing import (  # noqa: E402
    TRAIN_LOOKAHEAD,
    PackedRow,
    PackingCollator,
    PackingError,
    document_mask,
    pack_samples,
    packing_attention_mode,
    packing_efficiency,
    packing_stats,
    padded_efficiency,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sample(n, prompt=0, seed=0, vocab=1000, where=None):
    g = random.Random(seed)
    ids = [g.randrange(vocab) for _ in range(n)]
    labels = [-100] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels, "where": where or f"s{seed}"}


# ---------------------------------------------------------------- packing arithmetic (no model)

def test_pack_order_and_efficiency_on_a_length_mix():
    g = random.Random(7)
    samples = [{"input_ids": [1] * g.randint(20, 1500), "labels": None} for _ in range(400)]
    L = 2048
    rows = pack_samples(samples, L)
    # Whole samples, in order: reading the rows left to right gives the input back.
    assert [i for r in rows for i in r.indices] == list(range(len(samples)))
    assert all(r.n_tokens <= L for r in rows)
    assert all(s is samples[i] for r in rows for s, i in zip(r.samples, r.indices))
    # Next fit: a row was closed only because the next sample did not fit.
    for a, b in zip(rows, rows[1:]):
        assert a.n_tokens + b.lengths[0] > L
    total = sum(len(s["input_ids"]) for s in samples)
    assert sum(r.n_tokens for r in rows) == total
    eff = packing_efficiency(rows)
    assert eff == pytest.approx(total / (len(rows) * L))
    padded8 = padded_efficiency(samples, batch_size=8)
    lengths = [len(s["input_ids"]) for s in samples]
    assert padded8 == pytest.approx(total / sum(len(lengths[i:i + 8]) * max(lengths[i:i + 8])
                                                for i in range(0, 400, 8)))
    assert padded_efficiency(samples, 8, pad_to=L) == pytest.approx(total / (400 * L))
    assert eff > 0.7 and padded8 < 0.6 and eff > padded8

    # First fit within a window: fuller rows, deterministic, every sample exactly once, each pulled ahead
    # of at most `lookahead` samples.
    k = 8
    rows_k = pack_samples(samples, L, lookahead=k)
    assert rows_k == pack_samples(samples, L, lookahead=k)
    order = [i for r in rows_k for i in r.indices]
    assert sorted(order) == list(range(len(samples)))
    assert all(r.n_tokens <= L for r in rows_k)
    for pos, i in enumerate(order):
        assert sum(1 for j in order[pos + 1:] if j < i) <= k
    assert len(rows_k) < len(rows) and packing_efficiency(rows_k) > eff
    # train's window: what packing.py's docstring claims for this mix (~96% full against ~76% next fit).
    assert packing_efficiency(pack_samples(samples, L, lookahead=TRAIN_LOOKAHEAD)) > 0.93 > 0.8 > eff

    stats = packing_stats(samples, rows, batch_size=8)
    assert stats.rows == len(rows) and stats.packed == eff and stats.padded == padded8
    line = stats.line()
    assert f"{len(rows):,} rows of 2,048" in line and f"{eff:.1%}" in line and f"{padded8:.1%}" in line


def test_pack_rejects_what_does_not_fit():
    with pytest.raises(PackingError, match="s1: 9 tokens is more than max_seq_length=8"):
        pack_samples([_sample(3), _sample(9, seed=1)], 8)
    with pytest.raises(PackingError, match="empty"):
        pack_samples([{"input_ids": [], "labels": []}], 8)
    rows = pack_samples([_sample(8), _sample(1, seed=1), _sample(7, seed=2)], 8)
    assert [r.indices for r in rows] == [(0,), (1, 2)]
    assert pack_samples([], 8) == []


# ---------------------------------------------------------------- collation

def test_collator_positions_labels_and_flash_boundaries():
    a, b, c = _sample(3, seed=1), _sample(2, seed=2), _sample(4, prompt=2, seed=3)
    a["labels"] = list(a["input_ids"])  # a text sample: its first label is a token, not -100
    rows = [PackedRow((a, b), (0, 1), 5), PackedRow((c,), (2,), 5)]
    batch = PackingCollator(0)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}  # no attention_mask
    assert batch["num_tokens"] == 9
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].tolist() == [a["input_ids"] + b["input_ids"], c["input_ids"] + [0]]
    # Boundary rule: each sample's first label is -100, so the last token of a (logits at t=2, scored
    # against labels[3]) predicts nothing, like a's last token in a padded row.
    assert batch["labels"].tolist() == [[-100] + a["labels"][1:] + [-100] + b["labels"][1:],
                                        [-100, -100] + c["labels"][2:] + [-100]]
    shifted = batch["labels"][:, 1:] != -100  # transformers' shift: logits at t score labels[t + 1]
    pos = batch["position_ids"][:, 1:]
    assert (pos[shifted] > 0).all()  # every scored label lies inside the sample whose token predicts it
    # Same number of targets as the padded batch (the trainer's num_items_in_batch).
    padded = DataCollator(0)([a, b, c])
    assert int(shifted.sum()) == int((padded["labels"][:, 1:] != -100).sum()) == 2 + 1 + 2

    flash = PackingCollator(0, mode="flash_varlen")(rows)
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10] and flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["cu_seq_lens_k"].tolist() == [0, 3, 5, 9, 10]
    assert flash["max_length_q"] == flash["max_length_k"] == 4
    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if hasattr(fa, "prepare_fa_kwargs_from_position_ids"):  # transformers' own reading of the same positions
        (cu_q, _), (mq, _) = fa.prepare_fa_kwargs_from_position_ids(flash["position_ids"])
        assert cu_q.tolist() == flash["cu_seq_lens_q"].tolist() and int(mq) == 4

    # Plain lists of samples work as rows; pad_to_multiple_of rounds L up.
    assert PackingCollator(0, pad_to_multiple_of=8)([[a, b], [c]])["input_ids"].shape == (2, 8)


def test_collator_fallback_masks():
    rows = [[_sample(3, seed=1), _sample(2, seed=2)], [_sample(4, seed=3)]]
    seq = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    want = document_mask(seq)
    m = PackingCollator(0, mode="mask_4d")(rows)["attention_mask"]
    assert m.dtype == torch.bool and m.shape == (2, 1, 5, 5) and torch.equal(m, want)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                      [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    add = PackingCollator(0, mode="mask_4d", mask_format="additive", mask_dtype=torch.bfloat16)(rows)
    add = add["attention_mask"]
    assert add.dtype == torch.bfloat16 and torch.equal(add == 0, want)
    assert (add[~want] == torch.finfo(torch.bfloat16).min).all()


# ---------------------------------------------------------------- attention mode

def test_attention_mode_detection(monkeypatch):
    # The installed transformers (5.24 here; 5.17 on the GPU machine) derives the document mask from
    # position_ids itself: checked by building a mask, not by version.
    assert packing.transformers_builds_packed_mask() is True

    def fake(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))

    assert packing_attention_mode(fake("sdpa")) == "position_ids"
    assert packing_attention_mode(fake("eager")) == "position_ids"
    assert packing_attention_mode(fake("flash_attention_2")) == "flash_varlen"
    assert packing_attention_mode(fake("flash_attention_3")) == "flash_varlen"
    with pytest.raises(PackingError, match="paged"):
        packing_attention_mode(fake("paged|flash_attention_2"))
    assert packing_attention_mode(fake("flex_attention")) == "position_ids"
    monkeypatch.setattr(packing, "transformers_builds_packed_mask", lambda: False)
    assert packing_attention_mode(fake("sdpa")) == "mask_4d"
    assert packing_attention_mode(fake("eager")) == "mask_4d"
    assert packing_attention_mode(fake("flash_attention_2")) == "flash_varlen"
    with pytest.raises(PackingError, match="sdpa"):
        packing_attention_mode(fake("flex_attention"))


# ---------------------------------------------------------------- against a real model

FAMILIES = {"llama": {}, "qwen2": {"tie_word_embeddings": False}, "mistral": {"sliding_window": 6}}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smol_tokenizer):
    return {fam: make_tiny_model(tmp_path_factory.mktemp(f"pack-{fam}"), smol_tokenizer, fam, **kw)
            for fam, kw in FAMILIES.items()}


def _stock(folder, attn="sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=attn, **dtype_kwargs(torch.float32))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=SEVEN,
                                            task_type="CAUSAL_LM"))


def _fast(folder, attn="sdpa"):
    from turbotune import FastModel
    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn, patch=True,
                                         verbose=False)
    return FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=SEVEN,
                                    use_gradient_checkpointing=False, verbose=False)


def _samples(vocab):
    # A chat-like mix (masked prompts) and text samples (every label is a token, the first one too) in the
    # middle of a row, where the boundary rule matters, and at the start of one.
    spec = [(7, 3), (13, 0), (5, 0), (11, 4), (9, 2), (3, 0), (12, 6)]
    return [_sample(n, prompt=p, seed=i, vocab=vocab) for i, (n, p) in enumerate(spec)]


def _loss_and_grads(model, inputs, num_items):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False, num_items_in_batch=num_items)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


CASES = [("llama", "stock", "sdpa", None), ("llama", "fast", "sdpa", None),
         ("qwen2", "stock", "sdpa", None), ("qwen2", "fast", "sdpa", None),
         ("mistral", "fast", "sdpa", None),
         ("llama", "stock", "sdpa", "mask_4d"), ("llama", "fast", "eager", None),
         ("llama", "fast", "eager", "mask_4d"),
         ("llama", "fast", "sdpa", "varlen"), ("mistral", "fast", "sdpa", "varlen")]


@pytest.mark.parametrize("family,kind,attn,force", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_packed_equals_padded(family_dirs, family, kind, attn, force, monkeypatch):
    """Summed token loss and every LoRA gradient of a packed batch equal those of the padded batch."""
    if force == "mask_4d":  # what a transformers without packed-sequence support gets
        monkeypatch.setattr(packing, "transformers_builds_packed_mask", lambda: False)
    offsets_seen = []
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "0")  # the other modes: the mask (varlen is the default)
    if force == "varlen":  # turbotune's attention takes the samples' offsets (TURBOTUNE_FLASH_VARLEN=1)
        from turbotune.model.kernels import varlen_attention as va
        monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1")
        real = va.varlen_attention_reference
        monkeypatch.setattr(va, "varlen_attention_reference",
                            lambda *a, **k: offsets_seen.append(a[3].shape) or real(*a, **k))
    model = nonzero_lora_b((_stock if kind == "stock" else _fast)(family_dirs[family], attn))
    assert is_patched(model.get_base_model()) == (kind == "fast")
    model.train()
    samples = _samples(model.config.vocab_size)
    collate = PackingCollator.for_model(model, 0)
    assert collate.mode == (force if force in ("mask_4d",) else "position_ids")
    assert collate.sequence_offsets == (force == "varlen")
    assert collate.mask_format == ("additive" if attn == "eager" else "bool")
    rows = pack_samples(samples, 24)
    assert [r.indices for r in rows] == [(0, 1), (2, 3), (4, 5, 6)]

    padded = DataCollator(0)(samples)
    num_items = int((padded["labels"][:, 1:] != -100).sum())
    loss_pad, grads_pad = _loss_and_grads(model, padded, torch.tensor(num_items))

    packed = collate(rows)
    assert packed.pop("num_tokens") == int(padded["attention_mask"].sum())
    assert int((packed["labels"] != -100).sum()) == num_items
    assert ("attention_mask" in packed) == (force == "mask_4d")
    loss_pack, grads_pack = _loss_and_grads(model, packed, torch.tensor(num_items))
    if force == "varlen":  # fixed-size offsets over the rows end to end, taken by every layer's attention
        assert packed["cu_seq_lens_q"].shape == (va.MAX_SEQUENCES + 1,) and packed["max_length_q"] == 24
        assert offsets_seen and all(shape == (va.MAX_SEQUENCES + 1,) for shape in offsets_seen)

    assert abs(loss_pack.item() - loss_pad.item()) <= 1e-5 * abs(loss_pad.item())
    assert grads_pack.keys() == grads_pad.keys() and len(grads_pad) == 2 * 7 * 2  # 2 layers × 7 × (A, B)
    for n in grads_pad:
        assert grads_pad[n].abs().sum() > 0, n
        assert _rel(grads_pack[n], grads_pad[n]) < 1e-5, n


@pytest.mark.parametrize("kind", ["stock", "fast"])
def test_document_mask_blocks_cross_sample_attention(family_dirs, kind):
    model = nonzero_lora_b((_stock if kind == "stock" else _fast)(family_dirs["llama"]))
    model.eval()
    vocab = model.config.vocab_size
    s1, s2 = _sample(9, seed=11, vocab=vocab), _sample(8, seed=12, vocab=vocab)
    collate = PackingCollator.for_model(model, 0)

    def logits_of_s2(first, second):
        batch = collate([[first, second]])
        batch.pop("num_tokens")
        with torch.no_grad():
            return model(**batch, use_cache=False).logits[0, len(first["input_ids"]):]

    base = logits_of_s2(s1, s2)
    other_s1 = dict(s1, input_ids=[(t + 17) % vocab for t in s1["input_ids"]])
    assert (logits_of_s2(other_s1, s2) - base).abs().max().item() <= 1e-6
    # Sample 2 alone, unpacked, gives the same logits.
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([s2["input_ids"]]), use_cache=False).logits[0]
    assert (alone - base).abs().max().item() <= 1e-5
    # An earlier token of sample 2 does reach its later positions.
    other_s2 = dict(s2, input_ids=list(s2["input_ids"]))
    other_s2["input_ids"][1] = (other_s2["input_ids"][1] + 5) % vocab
    changed = logits_of_s2(s1, other_s2)
    assert torch.equal(changed[0], base[0])
    assert (changed[2:] - base[2:]).abs().amax(dim=-1).min().item() > 1e-4


def test_collator_for_cuda_graphs(tiny_llama_dir, smol_tokenizer, monkeypatch):
    """no_host_sync (CUDA graphs): transformers 5.17 / 5.24 build the packed mask without waiting for the GPU
    while a graph is captured, so "position_ids" stays; where it would wait, sdpa gets our document mask,
    except for models with a sliding window (our mask has none)."""
    from turbotune import FastModel
    m, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
    assert packing.transformers_mask_is_capture_safe()
    assert PackingCollator.for_model(m, smol_tokenizer, no_host_sync=True).mode == "position_ids"
    monkeypatch.setattr(packing, "transformers_mask_is_capture_safe", lambda: False)
    c = PackingCollator.for_model(m, smol_tokenizer, no_host_sync=True, pad_to_multiple_of=64)
    assert c.mode == "mask_4d"
    batch = c(pack_samples([_sample(7), _sample(5)], 64))
    assert batch["input_ids"].shape == (1, 64) and batch["attention_mask"].shape == (1, 1, 64, 64)
    m.config.sliding_window = 4
    assert packing.has_sliding_window(m.config)
    assert PackingCollator.for_model(m, smol_tokenizer, no_host_sync=True).mode == "position_ids"
    assert PackingCollator.for_model(m, smol_tokenizer).mode == "position_ids"


def test_fill_rows_keeps_the_loss(tiny_llama_dir, smol_tokenizer, monkeypatch):
    """The epoch's short last micro-batch, grown to the batch size for a CUDA graph, gives the same loss."""
    from turbotune import FastModel
    from turbotune.training.packing import fill_rows
    m, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
    m.train()
    monkeypatch.setattr(packing, "transformers_mask_is_capture_safe", lambda: False)  # to fill a 4-D mask too
    c = PackingCollator.for_model(m, smol_tokenizer, no_host_sync=True, pad_to_multiple_of=32)
    batch = c(pack_samples([_sample(9, seed=4), _sample(12, seed=5)], 32))
    n_tok = batch.pop("num_tokens")
    big = fill_rows(batch, 3)
    assert big["input_ids"].shape == (3, 32) and big["attention_mask"].shape == (3, 1, 32, 32)
    assert (big["labels"][1:] == -100).all() and torch.equal(big["input_ids"][0], big["input_ids"][2])
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    a = m(**batch, num_items_in_batch=n, use_cache=False).loss
    b = m(**big, num_items_in_batch=n, use_cache=False).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert n_tok == 21 and fill_rows(big, 2) is big


def test_fill_rows_with_sequence_offsets(tiny_llama_dir, smol_tokenizer, monkeypatch):
    """TURBOTUNE_FLASH_VARLEN=1: the added rows become samples of their own in the fixed-size offsets, so the short
    last micro-batch keeps the graphs' shape; the loss is unchanged."""
    from turbotune import FastModel
    from turbotune.model.kernels.varlen_attention import MAX_SEQUENCES
    from turbotune.training.packing import fill_rows
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1")
    m, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
    m.train()
    c = PackingCollator.for_model(m, smol_tokenizer, no_host_sync=True, pad_to_multiple_of=32)
    batch = c(pack_samples([_sample(9, seed=4), _sample(12, seed=5)], 32))
    batch.pop("num_tokens")
    assert batch["cu_seq_lens_q"][:5].tolist() == [0, 9, 21, 32, 32]
    big = fill_rows(batch, 3)
    assert big["input_ids"].shape == (3, 32) and big["cu_seq_lens_q"].shape == (MAX_SEQUENCES + 1,)
    assert big["cu_seq_lens_q"][:7].tolist() == [0, 9, 21, 32, 64, 96, 96] and int(big["cu_seq_lens_q"][-1]) == 96
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    a = m(**batch, num_items_in_batch=n, use_cache=False).loss
    b = m(**big, num_items_in_batch=n, use_cache=False).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
