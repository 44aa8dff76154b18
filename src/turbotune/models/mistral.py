"""Mistral family: Llama-shaped with sliding-window attention (handled by the attention function and mask)."""
from . import llama_like
from .registry import FamilySpec, register_family

MISTRAL = register_family(FamilySpec(
    name="mistral", model_types=("mistral",),
    mlp_output_only_to_residual=True,  # hidden = residual + mlp(norm(hidden)), then returned
    make_attention_forward=llama_like.make_attention_forward,
    make_mlp_forward=llama_like.make_mlp_forward,
    make_norm_forward=llama_like.make_norm_forward,
    make_lm_forward=llama_like.make_lm_forward,
))
