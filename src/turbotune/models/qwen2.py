"""Qwen2 family: Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen. Llama-shaped, with biases on q/k/v and an
optional sliding window (passed to the attention function as the stock forward does)."""
from . import llama_like
from .registry import FamilySpec, register_family

QWEN2 = register_family(FamilySpec(
    name="qwen2", model_types=("qwen2",),
    mlp_output_only_to_residual=True,  # hidden = residual + mlp(norm(hidden)), then returned
    make_attention_forward=llama_like.make_attention_forward,
    make_mlp_forward=llama_like.make_mlp_forward,
    make_norm_forward=llama_like.make_norm_forward,
    make_lm_forward=llama_like.make_lm_forward,
))
