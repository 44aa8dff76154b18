"""What differs between the model families in a GGUF export: llama.cpp's architecture for each Hugging Face
model_type, its hyperparameter keys, how its tensors are named and transformed, and which models are refused.

    model_type    llama.cpp arch  tensors
    llama         llama           q/k rows permuted from rotate-half RoPE to llama.cpp's interleaved pairs
    mistral       llama           the same (transformers reads the file back as Llama or Mistral)
    qwen2         qwen2           as stored (NeoX RoPE in llama.cpp, as in transformers)
    qwen3         qwen3           as stored, with the per-head attn_q_norm / attn_k_norm
    phi3          phi3            as stored: the fused qkv_proj is attn_qkv, gate_up_proj is ffn_up ([gate; up])
    gemma2        gemma2          every RMSNorm weight + 1 (Gemma computes x * (1 + w), llama.cpp x * w); no
                                  output tensor (the head is the embedding)
    gemma3_text   gemma3          the same, q_norm / k_norm included; the head may be untied

Everything else about these families that llama.cpp needs goes in as keys (head and key lengths, rope base, sliding
window, Gemma 2's soft-capping, Phi-3's original context length); the embedding scale sqrt(hidden) of the Gemmas is
implicit in llama.cpp's gemma graphs, as in transformers'.

Some settings have no key that transformers' GGUF reader takes (it rebuilds the model with its config class's
defaults), and llama.cpp fixes most of them in code too: the activation, Qwen3's head_dim and biases, Phi-3's
partial rotary factor, Gemma's query scale 1/sqrt(head_dim), its sliding/global layer pattern and local RoPE base,
Gemma 2's soft-caps. A model whose values are not the ones the readers assume is refused before the merge, the setting
named (check_model), rather than written as a file that runs a different model; so is RoPE scaling (Gemma 3 from 4B,
Phi-3.5's longrope), which neither this writer nor transformers' reader carries yet. Sliding windows: the Gemmas'
is written and applied by llama.cpp and transformers alike; Phi-3's is written (as llama.cpp's converter does) but
llama.cpp applies none at present, nor any for Mistral or Qwen3: those files are the model within its window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from turbotune.errors import TurbotuneError

# settings transformers' GGUF reader takes from the file for every family (the rope base is read too: rope_theta)
_CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
_GEMMA_FIXED = ("query_pre_attn_scalar", "hidden_activation", "layer_types", "attention_bias")


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # llama.cpp's `llama` arch rotates interleaved pairs
    norm_shift: float = 0.0  # added to every `*norm.weight` (Gemma's 1 + w)
    has_output: bool = True  # False: llama.cpp's arch has no output tensor, the head must be tied
    carried: tuple[str, ...] = ()  # further settings transformers' reader takes from the file (beyond _CARRIED)
    fixed: tuple[str, ...] = ()  # settings transformers' reader does not take from the file: must be its default
    add_keys: Callable | None = None  # the family's own metadata: add_keys(writer, config)


def _phi3_keys(writer, config) -> None:
    writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))  # 0: none (llama.cpp ignores it)


def _gemma2_keys(writer, config) -> None:
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3_keys(writer, config) -> None:
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        writer.add_sliding_window(int(config.sliding_window))


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True, carried=("head_dim",),
                    fixed=("hidden_act", "attention_bias", "mlp_bias")),
    "mistral": Family("LLAMA", permute_qk=True, carried=("head_dim",), fixed=("hidden_act",)),
    "qwen2": Family("QWEN2", fixed=("hidden_act",)),
    "qwen3": Family("QWEN3", fixed=("hidden_act", "head_dim", "attention_bias")),
    "phi3": Family("PHI3", fixed=("hidden_act", "rope_parameters.partial_rotary_factor"), add_keys=_phi3_keys),
    "gemma2": Family("GEMMA2", norm_shift=1.0, has_output=False, carried=("head_dim", "sliding_window"),
                     fixed=_GEMMA_FIXED + ("attn_logit_softcapping", "final_logit_softcapping"),
                     add_keys=_gemma2_keys),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0, carried=("head_dim", "sliding_window"),
                          fixed=_GEMMA_FIXED + ("attn_logit_softcapping", "final_logit_softcapping",
                                                "use_bidirectional_attention",
                                                "rope_parameters.sliding_attention.rope_theta"),
                          add_keys=_gemma3_keys),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise TurbotuneError(f"GGUF export supports the {', '.join(FAMILIES)} model types; this model is "
                             f"{model_type!r} (use --how merged and llama.cpp's convert_hf_to_gguf.py)")
    return FAMILIES[model_type]


def _rope_parts(config) -> list[dict]:
    """The RoPE parameter dicts: one, or one per layer type (Gemma 3: sliding_attention, full_attention)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [v for v in params.values() if isinstance(v, dict)]
    return nested or [params]


def rope_theta(config) -> float:
    """The RoPE base of the full-attention layers (llama.cpp's rope.freq_base)."""
    params = getattr(config, "rope_parameters", None) or {}
    part = params.get("full_attention", params) if isinstance(params, dict) else {}
    return float(part.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def heads(config) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    return n_head, n_kv, getattr(config, "head_dim", None) or config.hidden_size // n_head


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _as_read_back(config, family: Family):
    """The config transformers' GGUF reader builds from the file: the carried settings, its defaults for the rest."""
    names = _CARRIED + family.carried
    kept = {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}
    return type(config)(rope_theta=rope_theta(config), **kept)


def check_model(config) -> Family:
    """The model's Family, or a one-line TurbotuneError naming what its GGUF could not carry."""
    family = family_of(config.model_type)
    kinds = {p.get("rope_type", p.get("type", "default")) for p in _rope_parts(config)} - {None, "default"}
    if kinds:
        raise TurbotuneError(f"GGUF export does not write RoPE scaling yet (this model uses {sorted(kinds)[0]!r})")
    if not family.has_output and not getattr(config, "tie_word_embeddings", True):
        raise TurbotuneError(f"GGUF export: llama.cpp's {family.arch.lower()} has no output tensor, and this "
                             "model's lm_head is not tied to its embedding")
    if family.fixed:
        rebuilt = _as_read_back(config, family)
        for name in family.fixed:
            ours, theirs = _setting(config, name), _setting(rebuilt, name)
            if ours != theirs:
                raise TurbotuneError(f"GGUF export: this {config.model_type} has {name}={ours!r}, which "
                                     f"transformers' GGUF reader does not take from the file (it assumes {theirs!r})")
    scalar, head_dim = getattr(config, "query_pre_attn_scalar", None), heads(config)[2]
    if scalar is not None and scalar != head_dim:  # the Gemmas (llama.cpp's 27B exception is refused above)
        raise TurbotuneError(f"GGUF export: llama.cpp scales this {config.model_type}'s queries by 1/sqrt(head_dim "
                             f"{head_dim}), the model by 1/sqrt(query_pre_attn_scalar {scalar})")
    return family


def add_hyperparameters(writer, config, family: Family) -> None:
    n_head, n_kv, head_dim = heads(config)
    rotary = float((_rope_parts(config) or [{}])[0].get("partial_rotary_factor") or 1.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(int(head_dim * rotary))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if family.add_keys:
        family.add_keys(writer, config)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation for its `llama` arch: each head's rotate-half rows → interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(hf_names, config, family: Family):
    """(HF name, llama.cpp name) for every tensor of the merged checkpoint that the file holds, in order."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name in hf_names:
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TurbotuneError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        yield hf_name, new


def gguf_tensor(hf_name: str, w, config, family: Family) -> np.ndarray:
    """The merged tensor `hf_name` as the file holds it, fp32: q/k rows permuted, norms shifted, per family."""
    n_head, n_kv, _ = heads(config)
    w = np.asarray(w, dtype=np.float32)
    if family.permute_qk and hf_name.endswith("q_proj.weight"):
        return permute(w, n_head)
    if family.permute_qk and hf_name.endswith("k_proj.weight"):
        return permute(w, n_kv)
    if family.norm_shift and hf_name.endswith("norm.weight"):
        return w + np.float32(family.norm_shift)
    return w


def gguf_tensors(state: dict, config, family: Family):
    """(llama.cpp name, fp32 array) for every tensor of the merged state dict that the file holds."""
    for hf_name, new in gguf_names(list(state), config, family):
        yield new, gguf_tensor(hf_name, state[hf_name], config, family)
