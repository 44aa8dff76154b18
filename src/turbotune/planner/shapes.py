"""What the planner (and the bench's presets) know of a model: its shape, from a config, and the preset configs.

A leaf module: it imports nothing else of turbotune's but errors.py, so the planner, its per-layer arithmetic
and the bench's model builder all read from here without importing one another.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from turbotune.errors import TurbotuneError

METHODS = ("turbotune", "hf")  # the training recipes the planner models

class PlanError(TurbotuneError):
    """A planner input we can't use (unknown model, unsupported architecture, bad size); one clear line."""


# --------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs from a dense decoder-only config."""
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_positions: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven per-layer projections."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def bias_params(self) -> int:
        per = 0
        if self.qkv_bias:
            per += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            per += self.hidden
        if self.mlp_bias:
            per += 2 * self.intermediate + self.hidden
        return self.layers * per

    def total_params(self) -> int:
        return self.linear_params() + self.embedding_params() + self.norm_params() + self.bias_params()


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        cfg = dict(config)
    elif hasattr(config, "to_dict"):
        cfg = config.to_dict()
    else:
        raise PlanError(f"expected a config dict or a transformers config, got {type(config).__name__}")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):  # multimodal wrapper
        inner = dict(cfg["text_config"])
        inner.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings"))
        cfg = inner
    return cfg


def model_shape(config) -> ModelShape:
    """ModelShape of a config dict, a transformers PretrainedConfig, or a ModelShape (returned as is)."""
    if isinstance(config, ModelShape):
        return config
    cfg = _config_dict(config)
    mtype = str(cfg.get("model_type") or "?")
    for moe_key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(moe_key):
            raise PlanError(f"model type {mtype!r} is a mixture-of-experts model ({moe_key}={cfg[moe_key]}); "
                            "the planner handles dense decoder-only models only")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not cfg.get(k)]
    if missing:
        raise PlanError(f"model type {mtype!r}: the config lacks {', '.join(missing)}; the planner needs a dense "
                        "decoder-only (Llama-shaped) config")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    attention_bias = bool(cfg.get("attention_bias", False))
    qwen2_like = mtype in ("qwen2",)  # Qwen2 puts biases on q, k, v in the architecture itself
    tied = cfg.get("tie_word_embeddings")
    max_pos = cfg.get("max_position_embeddings")
    return ModelShape(model_type=mtype, layers=int(cfg["num_hidden_layers"]), hidden=hidden,
                      intermediate=int(cfg["intermediate_size"]), heads=heads,
                      kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                      vocab=int(cfg["vocab_size"]), tied=bool(tied) if tied is not None else False,
                      qkv_bias=qwen2_like or attention_bias, o_bias=attention_bias and not qwen2_like,
                      mlp_bias=bool(cfg.get("mlp_bias", False)),
                      max_positions=int(max_pos) if max_pos else None)


# ----------------------------------------------------------------------------------------------------------
# Presets (public config facts; only what the architecture needs)
# ----------------------------------------------------------------------------------------------------------
def _decoder(model_type: str, architecture: str, *, hidden: int, intermediate: int, layers: int, heads: int,
             kv_heads: int, head_dim: int | None = None, vocab: int, max_positions: int, rope_theta: float, eps: float,
             tied: bool, init: float = 0.02, bos: int, eos: int, **family) -> dict:
    """A preset's config: the keys every dense decoder config has (head_dim where the config states it), under
    the short names above, then the family's own keys as transformers spells them."""
    shape = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if head_dim is not None:
        shape["head_dim"] = head_dim
    return {"model_type": model_type, "architectures": [architecture], **shape, "vocab_size": vocab,
            "max_position_embeddings": max_positions, "rope_theta": rope_theta, "rms_norm_eps": eps,
            "tie_word_embeddings": tied, "initializer_range": init, "bos_token_id": bos, "eos_token_id": eos,
            **family}


PRESETS: dict[str, dict] = {
    # CPU / CI: a 2-layer Llama small enough to train in seconds.
    "tiny": _decoder("llama", "LlamaForCausalLM", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                     head_dim=16, vocab=512, max_positions=4096, rope_theta=10000.0, eps=1e-5, tied=False, bos=1,
                     eos=2, hidden_act="silu", attention_bias=False, mlp_bias=False),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": _decoder("llama", "LlamaForCausalLM", hidden=576, intermediate=1536, layers=30, heads=9,
                             kv_heads=3, head_dim=64, vocab=49152, max_positions=8192, rope_theta=100000.0,
                             eps=1e-5, tied=True, init=0.041666666666666664, bos=1, eos=2, hidden_act="silu",
                             attention_bias=False, mlp_bias=False),
    # Qwen/Qwen2-1.5B-Instruct (q/k/v carry biases in the Qwen2 architecture itself)
    "qwen2-1.5b": _decoder("qwen2", "Qwen2ForCausalLM", hidden=1536, intermediate=8960, layers=28, heads=12,
                           kv_heads=2, vocab=151936, max_positions=32768, rope_theta=1000000.0, eps=1e-6, tied=True,
                           bos=151643, eos=151645, hidden_act="silu", sliding_window=32768,
                           use_sliding_window=False, max_window_layers=21),
    # meta-llama/Llama-3.1-8B
    "llama3-8b": _decoder("llama", "LlamaForCausalLM", hidden=4096, intermediate=14336, layers=32, heads=32,
                          kv_heads=8, head_dim=128, vocab=128256, max_positions=131072, rope_theta=500000.0,
                          eps=1e-5, tied=False, bos=128000, eos=128001, hidden_act="silu",
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                          attention_bias=False, mlp_bias=False),
    # Qwen/Qwen3-8B (per-head q/k norms, no q/k/v bias)
    "qwen3-8b": _decoder("qwen3", "Qwen3ForCausalLM", hidden=4096, intermediate=12288, layers=36, heads=32,
                         kv_heads=8, head_dim=128, vocab=151936, max_positions=40960, rope_theta=1000000.0, eps=1e-6,
                         tied=False, bos=151643, eos=151645, hidden_act="silu", attention_bias=False,
                         use_sliding_window=False),
    # google/gemma-2-9b (soft-capped attention and logits, every other layer a 4,096-token window)
    "gemma2-9b": _decoder("gemma2", "Gemma2ForCausalLM", hidden=3584, intermediate=14336, layers=42, heads=16,
                          kv_heads=8, head_dim=256, vocab=256000, max_positions=8192, rope_theta=10000.0, eps=1e-6,
                          tied=True, bos=2, eos=1, hidden_activation="gelu_pytorch_tanh", pad_token_id=0,
                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
                          sliding_window=4096, attention_bias=False),
    # microsoft/Phi-3-mini-4k-instruct (fused qkv_proj and gate_up_proj)
    "phi3-mini": _decoder("phi3", "Phi3ForCausalLM", hidden=3072, intermediate=8192, layers=32, heads=32,
                          kv_heads=32, vocab=32064, max_positions=4096, rope_theta=10000.0, eps=1e-5, tied=False,
                          bos=1, eos=32000, original_max_position_embeddings=4096, hidden_act="silu",
                          pad_token_id=32000, sliding_window=2047),
    # google/gemma-3-4b-it, its text model (5 local layers of a 1,024-token window per global one)
    "gemma3-4b": _decoder("gemma3_text", "Gemma3ForCausalLM", hidden=2560, intermediate=10240, layers=34, heads=8,
                          kv_heads=4, head_dim=256, vocab=262208, max_positions=131072, rope_theta=1000000.0,
                          eps=1e-6, tied=True, bos=2, eos=1, rope_local_base_freq=10000.0,
                          rope_scaling={"rope_type": "linear", "factor": 8.0},
                          hidden_activation="gelu_pytorch_tanh", pad_token_id=0, query_pre_attn_scalar=256,
                          sliding_window=1024, sliding_window_pattern=6, attention_bias=False),
}


def preset_dict(name: str) -> dict:
    """A deep copy of a preset's config (KeyError for an unknown name)."""
    return json.loads(json.dumps(PRESETS[name]))
