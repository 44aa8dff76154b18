"""Per family: the patched model computes what transformers + PEFT compute (fp32, CPU), and undo restores it."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import assert_same_loss_and_lora_grads, make_tiny_model, nonzero_lora_b  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune.model.families import is_patched, patch_model, unpatch_model  # noqa: E402

# case -> (model_type, config overrides). Every registered model type needs a case (test_every_family_has_a_case).
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "qwen3": ("qwen3", {"head_dim": 16, "tie_word_embeddings": False}),  # per-head q_norm / k_norm before RoPE
    # soft-capped attention (eager) and logits, (1 + w) RMSNorm, GeGLU, post-norms; a sliding-window layer
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),  # + q/k norms
    # fused qkv_proj and gate_up_proj (LoRA on the fused linears), config-wide sliding window shorter than the batch
    "phi3": ("phi3", {"sliding_window": 8, "tie_word_embeddings": False}),
    "phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5, "tie_word_embeddings": False}),  # Phi-4-mini
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory, smol_tokenizer):
    model_type, overrides = FAMILIES[request.param]
    return model_type, make_tiny_model(tmp_path_factory.mktemp(request.param), smol_tokenizer, model_type,
                                       **overrides)


def test_every_family_has_a_case():
    """Adding a family to the registry without a parity case here fails."""
    from turbotune.model.families import FAMILIES as REGISTERED
    assert set(REGISTERED) <= {model_type for model_type, _ in FAMILIES.values()}


def _model(folder, patch, checkpointing=False):
    model, _ = FastModel.from_pretrained(str(folder), verbose=False, patch=patch)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, random_state=5, verbose=False,
                                     use_gradient_checkpointing=checkpointing)
    return nonzero_lora_b(model)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    labels[1, -4:] = -100
    return ids, mask, labels


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_matches_stock(family_dir, checkpointing):
    fam, folder = family_dir
    stock, fast = _model(folder, False, checkpointing), _model(folder, True, checkpointing)
    assert is_patched(fast.get_base_model()) and not is_patched(stock.get_base_model())
    layer = fast.get_base_model().model.layers[0]
    assert "forward" in layer.self_attn.__dict__ and "forward" in layer.mlp.__dict__  # the family path, not stock
    ids, mask, labels = _batch(stock.config.vocab_size)

    stock.train(), fast.train()
    with torch.no_grad():  # logits (no labels: the patched layers run, then the stock head)
        assert _rel(fast(input_ids=ids, attention_mask=mask).logits,
                    stock(input_ids=ids, attention_mask=mask).logits) < 1e-5
    out_s = stock(input_ids=ids, attention_mask=mask, labels=labels)
    out_f = fast(input_ids=ids, attention_mask=mask, labels=labels)
    assert out_f.logits is None  # no [tokens, vocab] logits in training
    assert abs(out_f.loss.item() - out_s.loss.item()) <= 1e-5 * abs(out_s.loss.item())
    out_s.loss.backward()
    out_f.loss.backward()
    grads_s = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    targets = 4 if fam == "phi3" else 7  # Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj
    assert grads_s.keys() == grads_f.keys() and len(grads_s) == 2 * targets * 2
    for n in grads_s:
        assert _rel(grads_f[n], grads_s[n]) < 1e-5, n


def test_undo_restores_stock_forwards(family_dir):
    fam, folder = family_dir
    model = _model(folder, True)
    base = model.get_base_model()
    attn = base.model.layers[0].self_attn
    assert "forward" in attn.__dict__
    n = unpatch_model(base)
    assert n > 0 and not is_patched(base)
    assert "forward" not in attn.__dict__ and "forward" not in base.__dict__
    assert type(attn).forward is attn.forward.__func__
    # and patching again works, with a toggle off
    report = patch_model(model, rms_norm=False)
    assert "rms_norm" not in report.patched and report.patched["attention"] == base.config.num_hidden_layers


def test_patches_do_not_leak_between_models(family_dir):
    fam, folder = family_dir
    patched = _model(folder, True)
    other = _model(folder, False)
    assert not is_patched(other.get_base_model())
    assert "forward" not in other.get_base_model().model.layers[0].mlp.__dict__
    assert is_patched(patched.get_base_model())


def test_unknown_family_uses_generic_path(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    smol_tokenizer.save_pretrained(str(tmp_path))

    def build(patch):
        m, _ = FastModel.from_pretrained(str(tmp_path), verbose=False, patch=patch)
        return FastModel.get_peft_model(m, r=4, target_modules=["query_key_value", "dense"], random_state=3,
                                        verbose=False, use_gradient_checkpointing=False)

    stock, fast = build(False), build(True)
    report = patch_model(fast)
    assert report.family is None and "generic" in report.summary() and report.patched["lora_linear"] > 0
    ids, mask, labels = _batch(cfg.vocab_size)
    fast.train(), stock.train()
    ls, lf = stock(input_ids=ids, labels=labels).loss, fast(input_ids=ids, labels=labels).loss
    assert abs(ls.item() - lf.item()) < 1e-5 * ls.item()


def test_cached_parts_follow_disable_adapter_and_merge(family_dir):
    """The per-module cache of LoRA parts must notice PEFT's disable_adapter() and merge/unmerge."""
    fam, folder = family_dir
    stock, fast = _model(folder, False), _model(folder, True)
    ids, mask, _ = _batch(stock.config.vocab_size)
    stock.eval(), fast.eval()
    with torch.no_grad():
        with_lora = fast(input_ids=ids, attention_mask=mask).logits
        with fast.disable_adapter(), stock.disable_adapter():
            off_f = fast(input_ids=ids, attention_mask=mask).logits
            off_s = stock(input_ids=ids, attention_mask=mask).logits
        assert _rel(off_f, off_s) < 1e-5 and _rel(off_f, with_lora) > 1e-4
        assert _rel(fast(input_ids=ids, attention_mask=mask).logits, with_lora) < 1e-6
        fast.merge_adapter()
        assert _rel(fast(input_ids=ids, attention_mask=mask).logits, with_lora) < 1e-4
        fast.unmerge_adapter()
        assert _rel(fast(input_ids=ids, attention_mask=mask).logits, with_lora) < 1e-5


def test_generation_matches_stock(family_dir, monkeypatch):
    """Generation as GRPO runs it (training mode, no grad, KV cache): the same greedy tokens and logits as stock; each
    step after the prompt takes the stock forward throughout (the MLP's fused path runs for the prompt only)."""
    from turbotune.model.families import llama_like
    fam, folder = family_dir
    stock, fast = _model(folder, False), _model(folder, True)
    ids = _batch(stock.config.vocab_size)[0][:, :6]
    fused_calls = []
    for name in ("lora_mlp", "lora_linear"):
        real = getattr(llama_like, name)
        monkeypatch.setattr(llama_like, name,
                            lambda x, *a, _real=real, **k: fused_calls.append(x.shape) or _real(x, *a, **k))
    outs = []
    for m in (stock, fast):
        m.train()
        with torch.no_grad():
            outs.append(m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        assert _rel(b, a) < 1e-5
    assert fused_calls and all(shape[-2] == 6 for shape in fused_calls)  # the prompt's pass only


def test_gemma2_loads_with_eager_attention_and_matches_stock(tmp_path, smol_tokenizer):
    """transformers has no SDPA path for Gemma 2 (soft-capped attention): the loader falls back to eager and
    says so, instead of failing; the generic path's loss equals the stock model's."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    smol_tokenizer.save_pretrained(str(tmp_path))

    def build(patch):
        m, _ = FastModel.from_pretrained(str(tmp_path), verbose=False, patch=patch)
        assert m.config._attn_implementation == "eager"
        return FastModel.get_peft_model(m, r=4, random_state=3, verbose=False, use_gradient_checkpointing=False)

    stock, fast = build(False), build(True)
    ids, mask, labels = _batch(cfg.vocab_size)
    fast.train(), stock.train()
    ls, lf = stock(input_ids=ids, labels=labels).loss, fast(input_ids=ids, labels=labels).loss
    assert abs(ls.item() - lf.item()) < 1e-5 * ls.item()


def test_phi3_fused_projections_get_lora(tmp_path, smol_tokenizer, capsys):
    """Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj): the default targets put LoRA on all four kinds of
    projection, saying so, and the patched loss equals the stock model's."""
    from transformers import AutoModelForCausalLM, Phi3Config

    cfg = Phi3Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=smol_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    smol_tokenizer.save_pretrained(str(tmp_path))

    def build(patch, verbose=False):
        m, _ = FastModel.from_pretrained(str(tmp_path), verbose=False, patch=patch)
        return nonzero_lora_b(FastModel.get_peft_model(m, r=4, random_state=3, verbose=verbose,
                                                       use_gradient_checkpointing=False))

    stock, fast = build(False), build(True, verbose=True)
    assert "fused as qkv_proj" in capsys.readouterr().out
    adapted = {n.split(".")[-1] for n, m in fast.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    ids, mask, labels = _batch(cfg.vocab_size)
    fast.train(), stock.train()
    ls, lf = stock(input_ids=ids, labels=labels).loss, fast(input_ids=ids, labels=labels).loss
    assert abs(ls.item() - lf.item()) < 1e-5 * ls.item()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_windows_without_a_mask_match_stock(family_dir, checkpointing, monkeypatch):
    """Whole sequences longer than a sliding window: transformers builds no mask for the patched model and its
    attention applies the window itself (kernels/windowed_attention.py); values and LoRA gradients equal stock's,
    which builds the [B, 1, L, L] mask. Gemma 2 (eager attention, soft-capped scores) keeps transformers' mask."""
    from turbotune.model.families import llama_like

    fam, folder = family_dir
    calls = []
    real = llama_like.windowed_attention
    monkeypatch.setattr(llama_like, "windowed_attention", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    stock, fast = _model(folder, False, checkpointing), _model(folder, True, checkpointing)
    ids = _batch(stock.config.vocab_size)[0]  # no padding, no prompt masking: the mask-free case
    assert_same_loss_and_lora_grads(stock, fast, input_ids=ids, labels=ids)
    windowed = fam in ("mistral", "gemma3_text", "phi3") and (stock.config.sliding_window or 1 << 30) < ids.shape[1]
    assert bool(calls) == windowed, (fam, calls)
