"""Gemma 2 and Gemma 3 (text) families. Llama-shaped layers with Gemma's differences, all handled by the shared
forwards: RMSNorm computes x * (1 + w) in fp32 (casting "gemma", offset 1), the MLP is GeGLU with tanh GELU,
the decoder layer normalises the attention and MLP outputs again (so the MLP's output is not only added to the
residual stream), Gemma 2 soft-caps its attention scores (eager attention, passed `softcap`) and its logits
(the fused loss's softcap), Gemma 3 normalises q and k per head. The embedding scale by sqrt(hidden) stays in
the stock model forward."""
from turbotune.model.families.llama_like import register_llama_shaped

_GEMMA = dict(rms_casting="gemma", rms_offset=1.0, act="gelu_tanh", mlp_output_only_to_residual=False)

GEMMA2 = register_llama_shaped("gemma2", ("gemma2",), **_GEMMA)
GEMMA3 = register_llama_shaped("gemma3", ("gemma3_text",), **_GEMMA)
