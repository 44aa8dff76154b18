"""Llama family: Llama 2/3.x, SmolLM2, TinyLlama, DeepSeek-R1-Distill-Llama."""
from . import llama_like
from .registry import FamilySpec, register_family

LLAMA = register_family(FamilySpec(
    name="llama", model_types=("llama",),
    mlp_output_only_to_residual=True,  # hidden = residual + mlp(norm(hidden)), then returned
    make_attention_forward=llama_like.make_attention_forward,
    make_mlp_forward=llama_like.make_mlp_forward,
    make_norm_forward=llama_like.make_norm_forward,
    make_lm_forward=llama_like.make_lm_forward,
))
