"""GGUF export: the merged model (base + adapter, merged in fp32 by export.merge_adapter) written as one .gguf file
for llama.cpp, with the `gguf` package's GGUFWriter, one tensor converted and written at a time (write_gguf).

Families (gguf_families.py, with what each needs): `llama`, `mistral` (llama.cpp's `llama` arch, q/k rows permuted
from rotate-half RoPE to interleaved pairs), `qwen2`, `qwen3` (per-head q/k norms), `phi3` (fused qkv and gate/up),
`gemma2` and `gemma3_text` (RMSNorm weights stored as 1 + w, soft-capping and sliding window as keys); a model whose
settings the file cannot carry is refused before the merge. Tensor types (gguf_tensors.py): every matrix in the
asked type, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (gguf-py's own quantisers), falling back to f16 where its
rows are not a multiple of the type's 32-value blocks; 1-D tensors (norms, biases) stay F32. The tokenizer goes in
as metadata: byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2/3, Phi-4) with its merges, the special token ids
and the chat template (SentencePiece-style vocabularies, as Gemma's and Phi-3's, are refused).
The k-quants (q4_k_m and friends), i-quants and the other llama.cpp file types need llama.cpp's own quantiser:
the f16 file is written, then quantised by llama-cpp-python's `llama_model_quantize` when that package is
installed, else the export stops with the `llama-quantize` command line that makes it.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from turbotune.errors import TurbotuneError
from turbotune.export.gguf_families import add_hyperparameters, check_model, gguf_names, gguf_tensor
from turbotune.export.gguf_tensors import WRITTEN, describe, file_size, write_streamed
from turbotune.export.stream_merge import SafetensorsFolder

QUANTS = WRITTEN  # what turbotune writes itself
_ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # as llama-quantize reads them


def llama_cpp_quants() -> dict[str, str]:
    """The file types only llama.cpp's quantiser makes: name (q4_k_m) → gguf.LlamaFileType member (MOSTLY_Q4_K_M)."""
    import gguf

    return {m.name.removeprefix("MOSTLY_").lower(): m.name for m in gguf.LlamaFileType
            if m.name.startswith("MOSTLY_") and m.name.removeprefix("MOSTLY_").lower() not in QUANTS}


def check_quant(quant) -> str:
    """The quant's canonical name: one of QUANTS, or of llama_cpp_quants() (made from the f16 file)."""
    q = str(quant or "f16").lower()
    q = _ALIASES.get(q, q)
    if q in QUANTS:
        return q
    if q in llama_cpp_quants():
        return q
    raise TurbotuneError(f"unknown GGUF quant {quant!r}: turbotune writes {', '.join(QUANTS)}; llama.cpp's "
                         f"quantiser makes the k-quants (q4_k_m, q5_k_m, q6_k...) from the f16 file")


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_gguf(adapter: Path, out: Path, quant="f16", base=None, stream=None, merge_into="auto") -> Path:
    """Merge (fp32, as merge_adapter does) into a temporary folder, then write `out/model-<quant>.gguf` atomically,
    with the merge report beside it. A quant only llama.cpp makes: `out/model-f16.gguf`, then llama_cpp_quantize."""
    import sys

    from turbotune.training.checkpoints import write_atomically
    from turbotune.export.export import MERGE_REPORT, merge_adapter
    from turbotune.model.loader import load_config, load_tokenizer, resolve_model_path

    asked = check_quant(quant)
    quant = asked if asked in QUANTS else "f16"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_name = base or cfg.get("base_model_name_or_path")
    path, local_only = resolve_model_path(base_name)
    check_model(load_config(path, local_only))  # before the (slow) merge, as is the tokenizer merge_adapter copies
    own_tokenizer = (adapter / "tokenizer_config.json").is_file()
    _bpe_spec(load_tokenizer(str(adapter) if own_tokenizer else path, True if own_tokenizer else local_only))
    say = stream or sys.stdout
    out.parent.mkdir(parents=True, exist_ok=True)  # the fp32 merge goes beside `out`, on its disk, not in /tmp
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        said = io.StringIO()
        merged = merge_adapter(adapter, Path(tmp) / "merged", base=base, dtype="fp32", stream=said,
                               merge_into=merge_into)
        stores = quant if asked == quant else f"f16 (llama.cpp's quantiser makes {asked} from it)"
        for line in said.getvalue().splitlines():  # its dtype line is about the temporary fp32 folder: say ours
            print(line if "merged weights written" not in line else
                  f"[turbotune] merged in fp32; the GGUF stores matrices in {stores}, norms and biases in f32",
                  file=say, flush=True)
        types = {}

        def write(dest: Path):
            types.update(write_gguf(merged, dest / gguf_file_name(quant), quant,
                                    name=f"{Path(str(base_name)).name}-{adapter.name}"))
            report = json.loads((merged / MERGE_REPORT).read_text())  # its logits: the fp32 merge, before GGUF
            report.update(gguf_file=gguf_file_name(quant), gguf_quant=quant,
                          gguf_tensor_types={k: len(v) for k, v in types.items()})
            (dest / MERGE_REPORT).write_text(json.dumps(report, indent=2))

        written = write_atomically(out, write)
    file = written / gguf_file_name(quant)
    print(f"[turbotune] GGUF ({quant}) written to {file}: {file_size(file.stat().st_size)}; "
          f"{describe(types, quant)}", file=say, flush=True)
    if asked != quant:
        made = llama_cpp_quantize(file, asked)
        report = json.loads((written / MERGE_REPORT).read_text())
        report.update(gguf_llama_cpp_file=made.name, gguf_llama_cpp_quant=asked)
        (written / MERGE_REPORT).write_text(json.dumps(report, indent=2))
        print(f"[turbotune] GGUF ({asked}) made by llama.cpp's quantiser: {made}: "
              f"{file_size(made.stat().st_size)}", file=say, flush=True)
    return written


def llama_cpp_quantize(f16: Path, quant: str) -> Path:
    """`f16` quantised to `quant` beside it by llama-cpp-python's llama_model_quantize (llama.cpp's own quantiser,
    with its default tensor mix). Without that package: a one-line TurbotuneError with the llama-quantize command."""
    import shlex

    ftype = llama_cpp_quants()[quant]
    dest = f16.with_name(gguf_file_name(quant))
    try:
        import llama_cpp
        value = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    except (ImportError, OSError, AttributeError):  # not installed, its library won't load, or it predates the type
        command = f"llama-quantize {shlex.quote(str(f16))} {shlex.quote(str(dest))} {ftype.removeprefix('MOSTLY_')}"
        raise TurbotuneError(f"wrote {f16}; {quant} is made by llama.cpp's quantiser, not turbotune (it writes "
                             f"{', '.join(QUANTS)}): run `{command}`, or `pip install llama-cpp-python` and export "
                             "again") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = value
    partial = dest.with_name(f".{dest.name}.partial")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise TurbotuneError(f"llama.cpp's quantiser failed to make {quant} from {f16} (the f16 file is written)")
    partial.replace(dest)
    return dest


def gguf_writer(merged: Path, dest: Path, quant: str, name: str | None = None):
    """(GGUFWriter at `dest` with every key of the file added, the model's config, its Family): the tensors next."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    if quant not in QUANTS:
        raise TurbotuneError(f"write_gguf writes {', '.join(QUANTS)}, not {quant!r}")
    config = AutoConfig.from_pretrained(str(merged))
    family = check_model(config)
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or merged.name)).name or "model")
    add_hyperparameters(writer, config, family)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, AutoTokenizer.from_pretrained(str(merged)), config.vocab_size)
    return writer, config, family


def write_gguf(merged: Path, dest: Path, quant: str = "f16", name: str | None = None) -> dict:
    """Write the merged HF folder `merged` (safetensors, config, tokenizer) as a GGUF file at `dest`, its matrices
    in `quant` (one of QUANTS). Streamed: every tensor's shape and type goes in the header first, then each tensor
    is read (safe_open), converted and written in turn, so one tensor at a time is in memory (the file's bytes are
    those of GGUFWriter.add_tensor for all, then write_tensors_to_file). Returns, per stored type, the (name, row
    length) of its tensors."""
    writer, config, family = gguf_writer(merged, dest, quant, name)
    state = SafetensorsFolder(sorted(Path(merged).glob("*.safetensors")))  # as safetensors' load_file orders them
    names = dict((new, hf) for hf, new in gguf_names(list(state), config, family))
    types = write_streamed(writer, ((new, state.shapes[hf]) for new, hf in names.items()),
                           lambda new: gguf_tensor(names[new], state[names[new]], config, family), quant)
    writer.close()
    return types


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


def _bpe_spec(tok) -> dict:
    """The tokenizer's tokenizers-library description, when it is a byte-level BPE (what the GGUF writes)."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {}) \
        + json.dumps(spec.get("decoder") or {})
    if not byte_level:
        raise TurbotuneError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2/3, "
                             f"Phi-4) only; this one is {model.get('type')!r} without ByteLevel (SentencePiece-style "
                             "vocabularies, as Gemma's and Phi-3's, are not supported yet)")
    return spec


def _add_tokenizer(writer, tok, vocab_size: int) -> None:
    import gguf

    spec = _bpe_spec(tok)
    model = spec.get("model", {})
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
