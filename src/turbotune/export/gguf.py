"""GGUF export: the merged model (base + adapter, merged in fp32 by export.merge_adapter) written as one .gguf file
for llama.cpp, with the `gguf` package's GGUFWriter.

Families: the Llama-shaped ones (`llama`, `mistral`, `qwen2` model_types). Tensor types follow llama.cpp's
convert_hf_to_gguf.py: `f16` writes every matrix in F16, `q8_0` every matrix whose rows are a multiple of 32 in
Q8_0 (the rest in F16); 1-D tensors (norms, biases) stay F32 either way. As llama.cpp does for the `llama`
architecture (Llama and Mistral), the rows of q_proj and k_proj are permuted from Hugging Face's rotate-half RoPE
layout to llama.cpp's interleaved one; Qwen2 uses NeoX RoPE in llama.cpp and is written unpermuted.
The tokenizer goes in as metadata: byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2) with its merges, the
special token ids and the chat template. k-quants (Q4_K_M and friends) need llama.cpp's own quantiser
(`llama-quantize` on the f16 file); they are not available here yet.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np

from turbotune.errors import TurbotuneError

FAMILIES = ("llama", "mistral", "qwen2")
QUANTS = ("f16", "q8_0")
_K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q3_k_m", "q3_k_s",
             "q3_k_l", "iq4_xs", "iq4_nl", "q4_0", "q4_1", "q5_0", "q5_1")


def check_quant(quant) -> str:
    q = str(quant or "f16").lower()
    if q in QUANTS:
        return q
    if q in _K_QUANTS or q.startswith(("q", "iq")):
        raise TurbotuneError(f"GGUF quant {quant!r} is not supported: supported are {', '.join(QUANTS)}; "
                             f"k-quants and the other llama.cpp types need llama.cpp's quantiser (llama-quantize on "
                             f"the f16 file), which turbotune does not run yet")
    raise TurbotuneError(f"unknown GGUF quant {quant!r}: supported are {', '.join(QUANTS)}")


def check_family(model_type: str) -> None:
    if model_type not in FAMILIES:
        raise TurbotuneError(f"GGUF export supports the {', '.join(FAMILIES)} model types; this model is "
                             f"{model_type!r} (use --how merged and llama.cpp's convert_hf_to_gguf.py)")


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_gguf(adapter: Path, out: Path, quant="f16", base=None, stream=None, merge_into="auto") -> Path:
    """Merge (fp32, as merge_adapter does) into a temporary folder, then write `out/model-<quant>.gguf` atomically,
    with the merge report beside it."""
    import sys

    from turbotune.training.checkpoints import write_atomically
    from turbotune.export.export import MERGE_REPORT, merge_adapter
    from turbotune.model.loader import load_config, resolve_model_path

    quant = check_quant(quant)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_name = base or cfg.get("base_model_name_or_path")
    path, local_only = resolve_model_path(base_name)
    check_family(load_config(path, local_only).model_type)  # before the (slow) merge
    say = stream or sys.stdout
    out.parent.mkdir(parents=True, exist_ok=True)  # the fp32 merge goes beside `out`, on its disk, not in /tmp
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        said = io.StringIO()
        merged = merge_adapter(adapter, Path(tmp) / "merged", base=base, dtype="fp32", stream=said,
                               merge_into=merge_into)
        for line in said.getvalue().splitlines():  # its dtype line is about the temporary fp32 folder: say ours
            print(line if "merged weights written" not in line else
                  f"[turbotune] merged in fp32; the GGUF stores matrices in {quant}, norms and biases in f32",
                  file=say, flush=True)

        def write(dest: Path):
            write_gguf(merged, dest / gguf_file_name(quant), quant, name=f"{Path(str(base_name)).name}-{adapter.name}")
            report = json.loads((merged / MERGE_REPORT).read_text())  # its logits: the fp32 merge, before GGUF
            report.update(gguf_file=gguf_file_name(quant), gguf_quant=quant)
            (dest / MERGE_REPORT).write_text(json.dumps(report, indent=2))

        written = write_atomically(out, write)
    print(f"[turbotune] GGUF ({quant}) written to {written / gguf_file_name(quant)}", file=say, flush=True)
    return written


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half RoPE rows → interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_state(folder: Path) -> dict:
    from safetensors.numpy import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def write_gguf(merged: Path, dest: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write the merged HF folder `merged` (safetensors, config, tokenizer) as a GGUF file at `dest`."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    quant = check_quant(quant)
    config = AutoConfig.from_pretrained(str(merged))
    check_family(config.model_type)
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type not in (None, "default"):
        raise TurbotuneError(f"GGUF export does not write RoPE scaling yet (this model uses {rope_type!r})")
    arch = gguf.MODEL_ARCH.QWEN2 if config.model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope_params = getattr(config, "rope_parameters", None) or {}
    rope_theta = (rope_params.get("rope_theta") if isinstance(rope_params, dict) else None) \
        or getattr(config, "rope_theta", None) or 10000.0

    writer = gguf.GGUFWriter(str(dest), arch_name)
    # Mistral is llama.cpp's `llama` architecture (transformers reads such a file back as Llama: the same model,
    # less Mistral's sliding window, which llama.cpp does not apply either).
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or merged.name)).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add_tokenizer(writer, AutoTokenizer.from_pretrained(str(merged)), config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, w in _load_state(merged).items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TurbotuneError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        w = np.asarray(w, dtype=np.float32)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            w = _permute(w, n_head, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            w = _permute(w, n_head, n_kv)
        if w.ndim < 2:
            writer.add_tensor(new, np.ascontiguousarray(w, dtype=np.float32))
        elif quant == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(new, np.ascontiguousarray(w, dtype=np.float16))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE pre-tokenizer, from its tokenizer.json description."""
    text = json.dumps(pre or {})
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if r"\\p{N}{1,3}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "llama-bpe"
    if r"\\p{N}|" in text or r"\\p{N}| ?" in text:
        return "qwen2"
    return "default"


def _add_tokenizer(writer, tok, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {}) \
        + json.dumps(spec.get("decoder") or {})
    if not byte_level:
        raise TurbotuneError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2) "
                             f"only; this one is {model.get('type')!r} without ByteLevel (sentencepiece-style "
                             "vocabularies are not supported yet)")
    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(reverse))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tok, f"{key}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    probe = tok("a").input_ids  # what the tokenizer adds around text, asked of it rather than of its config
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    writer.add_add_eos_token(bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
