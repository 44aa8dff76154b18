"""GGUF export: base + adapter written for llama.cpp, read back by transformers' own GGUF loader (which dequantises
every type through gguf-py), gives the logits of the fp32 merge, each type as close as its bits allow, and the same
tokenizer, for every family written (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text); a model the file
cannot carry is refused before the merge; a k-quant request writes the f16 file and says how llama.cpp makes the
k-quant from it."""
import io
import sys
import types

import pytest
import torch

from conftest import make_tiny_model, nonzero_lora_b
from turbotune.errors import TurbotuneError
from turbotune.export.export import export
from turbotune.export.gguf_tensors import file_size

pytest.importorskip("gguf")

QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# The logits of the file read back against the fp32 merge's, on TEXT's 21 tokens x 49,152 vocabulary:
# ||diff|| / ||fp32 logits|| (RMS, stable) is asserted; max |diff| / max |logit| is printed (a harsh measure on these
# tiny random models, whose logits are small: max 0.76). Measured on the tiny llama, RMS (max):
#   f16 4.4e-4 (8.2e-4)  bf16 3.3e-3 (6.0e-3)  q8_0 1.7e-2 (4.3e-2)  q5_1 9.0e-2 (0.28)  q5_0 0.11 (0.24)
#   q4_1 0.13 (0.26)     q4_0 0.34 (0.87);   tiny qwen2 f16 9.4e-4 (2.3e-3)
# (errors this large at 4-5 bits are this random model's: layer 0's o_proj alone in q4_0 gives 0.21 RMS, in q4_1
# 0.08). Tolerances: about 2-3x the measurement.
# Each file is also checked against the fp32 merge with its matrices rounded as the file stores them (through
# gguf-py's own quantise/dequantise; norms and biases stay F32): that must agree to fp32 arithmetic (measured 0).
TOL = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 5e-2, "q5_1": 0.25, "q5_0": 0.3, "q4_1": 0.35, "q4_0": 0.8}
EXACT = 1e-5
TEXT = "Hello world! The 123 quick brown foxes <|im_end|> jumped, didn't they?\n  ok"


def _adapter(base_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if model.config.model_type == "phi3":  # Phi-3's fused projections
        targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
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
    """The model with every matrix rounded as a `quant` GGUF stores it: in `quant`, or in F16 where its rows are not
    a multiple of the Q types' 32-value blocks (F16 and BF16 fit any row)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                fits = quant in ("f16", "bf16") or p.shape[-1] % 32 == 0
                t = GGMLQuantizationType[(quant if fits else "f16").upper()]
                q = dequantize(quantize(p.detach().numpy().astype("float32"), t), t)
                p.copy_(torch.from_numpy(q.reshape(p.shape)))
    return model


def _diffs(got, want):
    return (((got - want).norm() / want.norm()).item(),
            ((got - want).abs().max() / want.abs().max()).item(), (got - want).abs().max().item())


def _round_trip(base_dir, adapter, tmp_path, quant, tokenizer, text=TEXT, check_tokenizer=True, tol=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    said = io.StringIO()
    out = export(adapter, tmp_path / f"gguf-{quant}", how="gguf", quant=quant, stream=said)
    name = f"model-{quant}.gguf"
    assert (out / name).is_file() and (out / "turbotune_merge.json").is_file()
    assert f": {file_size((out / name).stat().st_size)};" in said.getvalue()  # the summary gives the file's size
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        want, got = _merged_fp32(base_dir, adapter)(ids).logits, loaded(ids).logits
    rms, rel, diff = _diffs(got, want)
    print(f"{quant}: {(out / name).stat().st_size:,} bytes; logits against the fp32 merge: RMS {rms:.2e}, "
          f"max |diff| {diff:.2e} = {rel:.2e} of max |logit|")
    assert rms < (tol or TOL[quant]), rms
    with torch.no_grad():
        exact = _diffs(got, _rounded(_merged_fp32(base_dir, adapter), quant)(ids).logits)[1]
    print(f"{quant} against the merge rounded as stored: {exact:.2e}")
    assert exact < EXACT, exact

    if check_tokenizer:
        gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
        assert gtok(text).input_ids == tokenizer(text).input_ids
        assert gtok.eos_token_id == tokenizer.eos_token_id and gtok.bos_token_id == tokenizer.bos_token_id
        assert gtok.chat_template == tokenizer.chat_template
    return {"rms": rms, "size": (out / name).stat().st_size, "logits": got, "ids": ids, "out": out, "said": said}


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, smol_tokenizer):
    base = make_tiny_model(tmp_path_factory.mktemp("gguf-llama"), smol_tokenizer, "llama")
    return base, _adapter(base, tmp_path_factory.mktemp("gguf-llama-adapter"))


@pytest.fixture(scope="module")
def llama_result(llama_adapter, tmp_path_factory, smol_tokenizer):
    """quant → its round trip on the tiny llama, each done once (the ordering test reuses them)."""
    base, adapter = llama_adapter
    done = {}

    def result(quant):
        if quant not in done:  # the tokenizer is the same metadata whatever the tensors: checked on two types
            done[quant] = _round_trip(base, adapter, tmp_path_factory.mktemp(f"gguf-{quant}"), quant, smol_tokenizer,
                                      check_tokenizer=quant in ("f16", "q4_0"))
        return done[quant]
    return result


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_round_trip(llama_result, quant):
    llama_result(quant)


def test_types_really_differ(llama_adapter, llama_result):
    """Fewer bits, larger error and smaller file: the types are really written as asked. And the exact check can
    fail: the q4_0 file is far from the merge rounded as q4_1."""
    from gguf import GGUFReader

    r = {q: llama_result(q) for q in QUANTS}
    groups = [["f16"], ["bf16"], ["q8_0"], ["q5_1", "q5_0"], ["q4_1", "q4_0"]]
    for fewer, more in zip(groups, groups[1:]):
        assert max(r[q]["rms"] for q in fewer) < min(r[q]["rms"] for q in more), (fewer, more)
    assert r["q5_1"]["rms"] < r["q5_0"]["rms"] and r["q4_1"]["rms"] < r["q4_0"]["rms"]
    assert r["f16"]["size"] == r["bf16"]["size"]
    sizes = [r[q]["size"] for q in QUANTS[1:]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    for q, file_type in (("bf16", 32), ("q5_1", 9)):  # (the other types' files are read by other tests)
        reader = GGUFReader(str(r[q]["out"] / f"model-{q}.gguf"))  # 2 s each: the vocabulary is parsed in Python
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert {k for n, k in kinds.items() if not n.endswith("norm.weight")} == {q.upper()}, (q, kinds)
        assert {k for n, k in kinds.items() if n.endswith("norm.weight")} == {"F32"}
        assert reader.fields["general.file_type"].contents() == file_type  # LlamaFileType.MOSTLY_<q>
    base, adapter = llama_adapter
    with torch.no_grad():
        as_q4_1 = _rounded(_merged_fp32(base, adapter), "q4_1")(r["q4_0"]["ids"]).logits
    assert _diffs(r["q4_0"]["logits"], as_q4_1)[1] > 100 * EXACT


def test_rows_that_do_not_fit_fall_back_to_f16(tmp_path, smol_tokenizer):
    """hidden 48: every matrix reading the hidden state (embedding, q/k/v/o, gate/up) has rows of 48, no multiple of
    32, and falls back to F16; down_proj (rows of 96) is Q4_0. The summary names the fallbacks."""
    from gguf import GGUFReader

    base = make_tiny_model(tmp_path / "base", smol_tokenizer, "llama", hidden_size=48, intermediate_size=96)
    adapter = _adapter(base, tmp_path / "adapter")
    r = _round_trip(base, adapter, tmp_path, "q4_0", smol_tokenizer, check_tokenizer=False)
    reader = GGUFReader(str(r["out"] / "model-q4_0.gguf"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {n for n, k in kinds.items() if k == "Q4_0"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert sum(k == "F16" for k in kinds.values()) == 13 and kinds["token_embd.weight"] == "F16"
    assert reader.fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0, as llama.cpp marks a mixed file
    summary = r["said"].getvalue().splitlines()[-1]
    assert "2 matrices in q4_0; 13 in f16, their rows not a multiple of q4_0's 32-value blocks: " \
           "token_embd.weight (rows of 48)" in summary and "and 9 more" in summary, summary


def test_k_quant_writes_f16_and_says_how(llama_adapter, tmp_path, monkeypatch):
    """No llama-cpp-python (as here): the f16 file is written, then one line says how to make the k-quant."""
    from gguf import GGUFReader

    _, adapter = llama_adapter
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails even where the package is installed
    with pytest.raises(TurbotuneError) as error:
        export(adapter, tmp_path / "k", how="gguf", quant="Q4_K_M", stream=io.StringIO())
    f16, want = tmp_path / "k" / "model-f16.gguf", tmp_path / "k" / "model-q4_k_m.gguf"
    message = str(error.value)
    assert "\n" not in message and f"`llama-quantize {f16} {want} Q4_K_M`" in message, message
    assert "pip install llama-cpp-python" in message
    reader = GGUFReader(str(f16))
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16


def test_k_quant_through_llama_cpp_python(llama_adapter, tmp_path, monkeypatch):
    """With llama-cpp-python importable, its llama_model_quantize makes the k-quant beside the f16 file (a stand-in
    module here: the real one is not installed, so this checks turbotune's side of the call only)."""
    import json

    calls = []

    def quantize(src, dest, params):
        calls.append((src, dest, params.ftype))
        open(dest, "wb").write(b"GGUF from llama.cpp")
        return 0

    fake = types.SimpleNamespace(LLAMA_FTYPE_MOSTLY_Q5_K_M=17, llama_model_quantize=quantize,
                                 llama_model_quantize_default_params=lambda: types.SimpleNamespace(ftype=0))
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    _, adapter = llama_adapter
    said = io.StringIO()
    out = export(adapter, tmp_path / "k", how="gguf", quant="q5_k", stream=said)  # llama-quantize's alias
    assert calls == [(str(out / "model-f16.gguf").encode(), str(out / ".model-q5_k_m.gguf.partial").encode(), 17)]
    assert (out / "model-q5_k_m.gguf").read_bytes() == b"GGUF from llama.cpp"
    assert not (out / ".model-q5_k_m.gguf.partial").exists() and (out / "model-f16.gguf").is_file()
    assert json.loads((out / "turbotune_merge.json").read_text())["gguf_llama_cpp_file"] == "model-q5_k_m.gguf"
    assert "GGUF (q5_k_m) made by llama.cpp's quantiser" in said.getvalue()


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


# The other families: one tiny model each, on SmolLM2's vocabulary cut to its first 2,048 tokens (its byte-level BPE
# with the merges that stay inside it: transformers' GGUF reader parses the vocabulary in Python, seconds a read at
# 49,152 tokens), its norms random (Gemma's stored 1 + w and Qwen3's per-head q/k norms must really reach the model);
# Phi-3 and Gemma 3 with untied heads (the output tensor). Measured, RMS (max |diff| / max |logit|):
#   qwen3  f16 1.4e-3 (2.3e-3)  q8_0 2.5e-2 (3.4e-2)     phi3         f16 6.2e-4 (8.6e-4)  q8_0 1.4e-2 (1.5e-2)
#   gemma2 f16 6.6e-4 (1.5e-3)  q8_0 1.9e-2 (3.0e-2)     gemma3_text  f16 1.4e-3 (2.7e-3)  q8_0 2.6e-2 (6.7e-2)
# within the llama tolerances (TOL), and each file equals the merge rounded as stored (EXACT; measured 0).
NEW_FAMILIES = {"qwen3": {}, "phi3": {"tie_word_embeddings": False}, "gemma2": {},
                "gemma3_text": {"tie_word_embeddings": False}}
# llama.cpp's arch, and a tensor of it that a llama file has not
WRITTEN_AS = {"qwen3": ("qwen3", "blk.0.attn_q_norm.weight"), "phi3": ("phi3", "blk.0.attn_qkv.weight"),
              "gemma2": ("gemma2", "blk.0.post_ffw_norm.weight"), "gemma3_text": ("gemma3", "blk.1.attn_k_norm.weight")}


@pytest.fixture(scope="module")
def small_tokenizer(smol_tokenizer, tmp_path_factory):
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = json.loads(smol_tokenizer.backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < 2048}
    spec["model"].update(vocab=vocab, merges=[m for m in spec["model"]["merges"]
                                              if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab])
    specials = {k: getattr(smol_tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials)
    small.chat_template = smol_tokenizer.chat_template
    folder = tmp_path_factory.mktemp("small-tokenizer")
    small.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _random_norms(folder):
    """Every RMSNorm weight of the saved model drawn at random (they start at 1, or 0 for Gemma's 1 + w)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module", params=sorted(NEW_FAMILIES))
def family_adapter(request, tmp_path_factory, small_tokenizer):
    family = request.param
    base = make_tiny_model(tmp_path_factory.mktemp(f"gguf-{family}"), small_tokenizer, family, **NEW_FAMILIES[family])
    norm = _random_norms(base).model.norm.weight.detach().numpy()
    return family, base, _adapter(base, tmp_path_factory.mktemp(f"gguf-{family}-adapter")), norm


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_new_family_round_trip(family_adapter, quant, tmp_path, small_tokenizer):
    """Read back by transformers, each family's file gives the fp32 merge's logits; it is written as llama.cpp's own
    arch, with that arch's tensors, and Gemma's norms hold 1 + w."""
    import numpy as np
    from gguf import GGUFReader

    family, base, adapter, norm = family_adapter
    r = _round_trip(base, adapter, tmp_path, quant, small_tokenizer, check_tokenizer=quant == "f16")
    reader = GGUFReader(str(r["out"] / f"model-{quant}.gguf"))
    arch, own = WRITTEN_AS[family]
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == arch and own in tensors
    assert ("output.weight" in tensors) == (not NEW_FAMILIES[family].get("tie_word_embeddings", True))
    stored = np.asarray(tensors["output_norm.weight"].data)
    np.testing.assert_array_equal(stored, norm + np.float32(1.0 if family.startswith("gemma") else 0.0))


def test_gemma3_global_layers(tmp_path, small_tokenizer):
    """Gemma 3 at 6 layers, its default pattern of 5 sliding-window layers (local RoPE base 1e4, which llama.cpp
    and transformers' reader both assume) and 1 global one, whose base (1e6) the file carries: read back, the F16
    file equals the merge rounded as stored (written with the local base for all layers, it is 0.11 off). Three
    times the layers of the other tiny models, its F16 error is about twice theirs (2.4e-3): 3x the tolerance."""
    from transformers import AutoConfig

    base = make_tiny_model(tmp_path / "base", small_tokenizer, "gemma3_text", num_hidden_layers=6)
    assert AutoConfig.from_pretrained(str(base)).layer_types[4:] == ["sliding_attention", "full_attention"]
    _random_norms(base)
    adapter = _adapter(base, tmp_path / "adapter")
    _round_trip(base, adapter, tmp_path, "f16", small_tokenizer, check_tokenizer=False, tol=3 * TOL["f16"])


def _rope(full: str, **more) -> dict:
    return {"rope_parameters": {"full_attention": {"rope_type": full, "rope_theta": 1e6, **more},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


REFUSED = {
    "gemma-1": ("gemma", {"head_dim": 16}, "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text model types"),
    "gemma2-query-scalar": ("gemma2", {"query_pre_attn_scalar": 128},
                            "query_pre_attn_scalar=128, which transformers' GGUF reader does not take from the file"),
    "gemma2-untied": ("gemma2", {"tie_word_embeddings": False}, "llama.cpp's gemma2 has no output tensor"),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 20.0}, "final_logit_softcapping=20.0"),
    "gemma2-head-dim": ("gemma2", {"head_dim": 128}, "llama.cpp scales this gemma2's queries by 1/sqrt(head_dim 128)"),
    "gemma3-layer-pattern": ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
    "gemma3-rope-scaling": ("gemma3_text", _rope("linear", factor=8.0), "RoPE scaling yet (this model uses 'linear')"),
    "qwen3-head-dim": ("qwen3", {"head_dim": 32}, "head_dim=32"),
    "phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5}, "rope_parameters.partial_rotary_factor=0.5"),
}


@pytest.mark.parametrize("family, overrides, says", list(REFUSED.values()), ids=list(REFUSED))
def test_refused_before_the_merge(llama_adapter, tmp_path, small_tokenizer, family, overrides, says):
    """A family llama.cpp or transformers' GGUF reader does not have (Gemma 1: transformers reads no gemma file),
    and settings the file cannot carry, are refused with one line, before any merging or writing."""
    from transformers import GemmaConfig

    _, adapter = llama_adapter
    base = tmp_path / family
    if family == "gemma":  # make_tiny_model's families are all written: a config is all the check reads
        GemmaConfig(vocab_size=len(small_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    **overrides).save_pretrained(str(base))
    else:
        make_tiny_model(base, small_tokenizer, family, **overrides)
    with pytest.raises(TurbotuneError) as error:
        export(adapter, tmp_path / "out", how="gguf", base=str(base), quant="q4_k_m")
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists()


def test_sentencepiece_style_tokenizer_refused_before_the_merge(llama_adapter, tmp_path, small_tokenizer):
    """Gemma's and Phi-3's vocabularies (BPE over Metaspace pieces, not bytes) are not written yet: one line, before
    the merge, from the tokenizer the merge would copy (the adapter's)."""
    import json
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _, adapter = llama_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    spec = json.loads(small_tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                               "split": False}
    spec["post_processor"] = None
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec))).save_pretrained(
        str(tmp_path / "adapter"))
    with pytest.raises(TurbotuneError, match="SentencePiece-style vocabularies, as Gemma's and Phi-3's") as error:
        export(tmp_path / "adapter", tmp_path / "out", how="gguf", quant="f16")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_unsupported(llama_adapter, tmp_path):
    _, adapter = llama_adapter
    with pytest.raises(TurbotuneError, match="f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"):
        export(adapter, tmp_path / "x", how="gguf", quant="int3")
    with pytest.raises(TurbotuneError, match="how='gguf'"):
        export(adapter, tmp_path / "m", how="merged", quant="q8_0")
    assert not (tmp_path / "x").exists()


def test_cli_flags():
    from turbotune.cli.main import build_parser

    args = build_parser().parse_args(["export", "--adapter", "a", "--out", "o", "--how", "gguf", "--quant", "q4_0"])
    assert (args.how, args.quant) == ("gguf", "q4_0")


def test_demo_model_gguf_continues_like_the_merged_model(tmp_path, smol_dir):
    """The embedded demo (SmolLM2-135M-Instruct) with an adapter: its F16 GGUF, read back by transformers, gives the
    same greedy 20 tokens on a chat prompt as the merged fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _adapter(smol_dir, tmp_path / "adapter")
    folder = export(adapter, tmp_path / "gguf", how="gguf", quant="f16")
    merged = _merged_fp32(smol_dir, adapter)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model-f16.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a tagline for a bakery."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = merged.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        got = gguf_model.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert got[0, ids.shape[1]:].tolist() == want[0, ids.shape[1]:].tolist()
