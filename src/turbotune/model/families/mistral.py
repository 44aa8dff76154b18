"""Mistral family: Llama-shaped with sliding-window attention (handled by the attention function and mask)."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + mlp(norm(hidden)), then returned
MISTRAL = register_llama_shaped("mistral", ("mistral",), mlp_output_only_to_residual=True)
