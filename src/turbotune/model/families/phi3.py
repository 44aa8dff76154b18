"""Phi-3 family: Phi-3 / Phi-3.5 (mini, medium) and Phi-4 (the `phi3` architecture). Llama-shaped, with q, k and v
in one projection (`qkv_proj`) and gate and up in another (`gate_up_proj`): LoRA sits on those fused linears, as
PEFT puts it there, and runs through the fused LoRA linear; the split into q/k/v and gate/up follows. Every
layer takes config.sliding_window. A partial rotary (Phi-4-mini) rotates only the leading dimensions."""
from turbotune.model.families.llama_like import register_llama_shaped

# mlp_output_only_to_residual: hidden = residual + dropout(mlp(norm(hidden))), then returned
PHI3 = register_llama_shaped("phi3", ("phi3",), mlp_output_only_to_residual=True, sliding_window_from_config=True)
