"""Mistral family: Llama-shaped with one sliding window for every layer (config.sliding_window)."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + mlp(norm(hidden)), then returned
MISTRAL = register_llama_shaped("mistral", ("mistral",), mlp_output_only_to_residual=True,
                                 sliding_window_from_config=True)
