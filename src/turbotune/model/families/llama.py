"""Llama family: Llama 2/3.x, SmolLM2, TinyLlama, DeepSeek-R1-Distill-Llama."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + mlp(norm(hidden)), then returned
LLAMA = register_llama_shaped("llama", ("llama",), mlp_output_only_to_residual=True)
