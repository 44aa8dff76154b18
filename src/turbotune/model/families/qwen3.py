"""Qwen3 family (dense): Qwen3. Llama-shaped, with an RMSNorm over each head of q and of k before RoPE
(`q_norm`, `k_norm`: patched as the family's RMSNorm, applied in the shared attention forward), no q/k/v bias,
and a sliding window on the layers its config names."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + mlp(norm(hidden)), then returned
QWEN3 = register_llama_shaped("qwen3", ("qwen3",), mlp_output_only_to_residual=True)
