"""Qwen2 family: Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen. Llama-shaped, with biases on q/k/v and an
optional sliding window (passed to the attention function as the stock forward does)."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + mlp(norm(hidden)), then returned
QWEN2 = register_llama_shaped("qwen2", ("qwen2",), mlp_output_only_to_residual=True)
