"""GGUF export: base + adapter written for llama.cpp, read back by transformers' own GGUF loader, gives the logits of
the fp32 merge (F16 tight, Q8_0 looser) and the same tokenizer."""
import pytest
import torch

from conftest import make_tiny_model, nonzero_lora_b
from turbotune.errors import TurbotuneError
from turbotune.export.export import export

pytest.importorskip("gguf")

# max |diff| relative to the largest |logit| of the fp32 merge. Measured on the tiny random models (whose logits are
# small, so this is a harsh measure): F16 8.2e-4 (llama), 2.3e-3 (qwen2); Q8_0 4.3e-2 (llama). Each file is also
# checked against the fp32 merge with its matrices rounded as the file stores them (F16, or through gguf's own Q8_0
# quantise/dequantise; norms and biases stay F32): that must agree to fp32 arithmetic (measured 0 for llama).
TOL = {"f16": 1e-2, "q8_0": 1e-1}
EXACT = 1e-5
TEXT = "Hello world! The 123 quick brown foxes <|im_end|> jumped, didn't they?\n  ok"


def _adapter(base_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = nonzero_lora_b(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets)), std=0.2)
    peft.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return out


def _merged_fp32(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _rounded(model, quant):
    """The model with every matrix rounded as the GGUF file stores it (F16, or Q8_0 where rows are a multiple of 32)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and quant == "f16":
                p.copy_(p.half().float())
            elif p.ndim == 2 and p.shape[-1] % 32 == 0:
                q = dequantize(quantize(p.detach().numpy().astype("float32"), T.Q8_0), T.Q8_0)
                p.copy_(torch.from_numpy(q.reshape(p.shape)))
    return model


def _round_trip(base_dir, adapter, tmp_path, quant, tokenizer, text=TEXT):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(adapter, tmp_path / f"gguf-{quant}", how="gguf", quant=quant)
    name = f"model-{quant}.gguf"
    assert (out / name).is_file() and (out / "turbotune_merge.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        want, got = _merged_fp32(base_dir, adapter)(ids).logits, loaded(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{quant}: max |diff| / max |logit| = {rel:.2e}")
    assert rel < TOL[quant], rel
    with torch.no_grad():
        want = _rounded(_merged_fp32(base_dir, adapter), quant)(ids).logits
    exact = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{quant} against the merge rounded as stored: {exact:.2e}")
    assert exact < EXACT, exact

    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    assert gtok(text).input_ids == tokenizer(text).input_ids
    assert gtok.eos_token_id == tokenizer.eos_token_id and gtok.bos_token_id == tokenizer.bos_token_id
    assert gtok.chat_template == tokenizer.chat_template
    return rel


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, smol_tokenizer):
    base = make_tiny_model(tmp_path_factory.mktemp("gguf-llama"), smol_tokenizer, "llama")
    return base, _adapter(base, tmp_path_factory.mktemp("gguf-llama-adapter"))


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_round_trip(llama_adapter, tmp_path, smol_tokenizer, quant):
    base, adapter = llama_adapter
    _round_trip(base, adapter, tmp_path, quant, smol_tokenizer)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_round_trip(tmp_path, smol_tokenizer, family):
    """Qwen2: q/k/v biases, untied head, no RoPE permutation. Mistral: llama.cpp's `llama` architecture (read back
    by transformers as Llama). The Qwen2 tokenizer check avoids "\\n  ": transformers' GGUF loader gives a qwen2
    file Qwen2's own split regex whatever tokenizer.ggml.pre says (llama.cpp honours it), and this tiny Qwen2
    carries SmolLM2's GPT-2-split tokenizer."""
    base = make_tiny_model(tmp_path / "base", smol_tokenizer, family, tie_word_embeddings=family == "mistral")
    adapter = _adapter(base, tmp_path / "adapter")
    text = "Hello world! The quick <|im_end|> fox, ok?" if family == "qwen2" else TEXT
    _round_trip(base, adapter, tmp_path, "f16", smol_tokenizer, text=text)


def test_unsupported(llama_adapter, tmp_path, smol_tokenizer):
    _, adapter = llama_adapter
    with pytest.raises(TurbotuneError, match="llama.cpp's quantiser"):
        export(adapter, tmp_path / "k", how="gguf", quant="q4_k_m")
    with pytest.raises(TurbotuneError, match="f16, q8_0"):
        export(adapter, tmp_path / "x", how="gguf", quant="int3")
    with pytest.raises(TurbotuneError, match="how='gguf'"):
        export(adapter, tmp_path / "m", how="merged", quant="q8_0")
    gemma = make_tiny_model(tmp_path / "gemma", smol_tokenizer, "gemma2")
    with pytest.raises(TurbotuneError, match="llama, mistral, qwen2"):
        export(adapter, tmp_path / "g", how="gguf", base=str(gemma))
    assert not (tmp_path / "k").exists() and not (tmp_path / "g").exists()


def test_cli_flags():
    from turbotune.cli.main import build_parser

    args = build_parser().parse_args(["export", "--adapter", "a", "--out", "o", "--how", "gguf", "--quant", "q8_0"])
    assert (args.how, args.quant) == ("gguf", "q8_0")
