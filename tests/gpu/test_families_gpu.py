"""Every family with a bench preset, bf16 on CUDA: the patched model (compiled Triton kernels) against stock
transformers + PEFT, LoRA and QLoRA, and its CUDA-graph replay against its own eager steps.

The models are the presets' architectures shrunk (the family's norms, soft-caps, windows, fused projections and
head sizes kept), with a sequence longer than the sliding windows. Run: pytest tests/gpu/test_families_gpu.py -q
"""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import nonzero_lora_b  # noqa: E402

from turbotune.model.families import FAMILIES  # noqa: E402
from turbotune.planner.shapes import PRESETS, preset_dict  # noqa: E402

SEQ = 160
# one preset per registered family: the largest-context one is as good as any, the shrink keeps the family's traits
CASES = sorted({p["model_type"]: name for name, p in PRESETS.items() if name != "tiny"
                and p["model_type"] in FAMILIES}.values())


@pytest.fixture(autouse=True)
def _flash_window_on(monkeypatch):
    """Windowed layers through FlashAttention's window, the default (an environment that switched it off aside)."""
    monkeypatch.delenv("TURBOTUNE_FLASH_WINDOW", raising=False)


def _shrunk(name: str) -> dict:
    cfg = preset_dict(name)
    cfg.update(hidden_size=256, intermediate_size=512, vocab_size=2048, num_attention_heads=4,
               num_key_value_heads=2 if cfg["num_key_value_heads"] < cfg["num_attention_heads"] else 4,
               num_hidden_layers=6 if cfg["model_type"] == "gemma3_text" else 2,  # one global layer per five local
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if "head_dim" in cfg:
        cfg["head_dim"] = 64
    if cfg.get("sliding_window"):
        cfg["sliding_window"] = 48  # shorter than SEQ: the windowed layers drop keys
    if "query_pre_attn_scalar" in cfg:
        cfg["query_pre_attn_scalar"] = 64
    return cfg


@pytest.fixture(scope="module", params=CASES)
def family_dir(request, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from turbotune._compat import dtype_kwargs
    from turbotune.bench.presets import _placeholder_tokenizer

    cfg = _shrunk(request.param)
    model_type = cfg.pop("model_type")
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg),
                                                 **dtype_kwargs(torch.bfloat16))
    with torch.no_grad():  # logits large enough for a final soft-cap to bite
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(str(folder))
    _placeholder_tokenizer({"model_type": model_type, **cfg}).save_pretrained(str(folder))
    return request.param, folder


def _model(folder, patch, qlora=False, dtype=torch.bfloat16):
    from turbotune import FastModel
    m, _ = FastModel.from_pretrained(str(folder), dtype=dtype, load_in_4bit=qlora, patch=patch, verbose=False)
    m = FastModel.get_peft_model(m, r=8, lora_alpha=16, random_state=5, verbose=False,
                                 use_gradient_checkpointing=True)
    nonzero_lora_b(m)
    m.train()
    return m


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :20] = -100
    return ids.cuda(), labels.cuda()


def _nrel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _loss_and_grads(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("qlora", [False, True])
def test_family_bf16_matches_stock(family_dir, qlora):
    """bf16 rounds differently along the two paths, so each is measured against stock in fp32 (for QLoRA: the
    same 4-bit weights, fp32 compute): the patched model's error may not exceed stock bf16's by more than half
    again (plus a small floor), for the loss and for every LoRA gradient."""
    name, folder = family_dir
    ref_dtype = torch.float32
    ref, stock, fast = (_model(folder, False, qlora, ref_dtype), _model(folder, False, qlora),
                        _model(folder, True, qlora))
    layer = fast.get_base_model().model.layers[0]
    assert "forward" in layer.self_attn.__dict__ and "forward" in layer.mlp.__dict__, "family path not installed"
    ids, labels = _batch(stock.config.vocab_size)
    out_r, grads_r = _loss_and_grads(ref, ids, labels)
    out_s, grads_s = _loss_and_grads(stock, ids, labels)
    out_f, grads_f = _loss_and_grads(fast, ids, labels)
    assert out_f.logits is None
    loss_err = lambda out: abs(out.loss.item() - out_r.loss.item()) / abs(out_r.loss.item())  # noqa: E731
    assert loss_err(out_f) <= 1.5 * loss_err(out_s) + 2e-3, (name, out_f.loss, out_s.loss, out_r.loss)
    assert grads_r.keys() == grads_s.keys() == grads_f.keys() and grads_r
    for n in grads_r:
        err_f, err_s = _nrel(grads_f[n], grads_r[n]), _nrel(grads_s[n], grads_r[n])
        assert err_f <= 1.5 * err_s + 5e-3, (name, n, err_f, err_s)


def test_family_graph_replay_equals_eager(family_dir):
    from turbotune.training.cuda_graphs import GraphedMicroStep

    name, folder = family_dir

    def run(graphs):
        m = _model(folder, True)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        step = GraphedMicroStep(m, params, enabled=graphs, warmup=1)
        losses = []
        for i in range(6):
            ids, labels = _batch(m.config.vocab_size, seed=i)
            losses.append(step({"input_ids": ids, "labels": labels}, 0.5).float().item())
            if i % 2 == 1:
                opt.step()
                step.zero_grad() if step.active else opt.zero_grad(set_to_none=True)
        return losses, step

    ref, _ = run(False)
    got, step = run(True)
    assert step.active, step.disabled_reason
    assert step.replays >= 3, (name, step.replays)
    for a, b in zip(got, ref):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (name, got, ref)
