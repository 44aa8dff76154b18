"""Qwen3 family (dense): Qwen3. Llama-shaped, with an RMSNorm over each head of q and of k before RoPE
(`q_norm`, `k_norm`: patched as the family's RMSNorm, applied in the shared attention forward), no q/k/v bias,
and a sliding window on the layers its config names."""
from . import llama_like
from .registry import FamilySpec, register_family

QWEN3 = register_family(FamilySpec(
    name="qwen3", model_types=("qwen3",),
    mlp_output_only_to_residual=True,  # hidden = residual + mlp(norm(hidden)), then returned
    make_attention_forward=llama_like.make_attention_forward,
    make_mlp_forward=llama_like.make_mlp_forward,
    make_norm_forward=llama_like.make_norm_forward,
    make_lm_forward=llama_like.make_lm_forward,
))
