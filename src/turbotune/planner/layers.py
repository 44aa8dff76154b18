"""The per-layer terms of `turbotune plan`: what one decoder layer saves for backward, and its working set.

Split out of planner/predict.py, which imports both back (`from turbotune.planner.predict import
layer_working_bytes` works); every formula is derived in planner/predict.py's module docstring, section 3.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from turbotune.planner.shapes import ModelShape

ADAPTER_BYTES = 4                      # PEFT keeps LoRA A / B in fp32 (autocast_adapter_dtype)


def mlp_tile_chunk(n_tokens: int | None, intermediate: int, b: int, checkpointing: str | None = None) -> int | None:
    """Tokens per chunk of turbotune's token-tiled MLP at this size and checkpointing mode, or None when it is not
    tiled."""
    if n_tokens is None:
        return None
    # the rule the patched MLP forward itself uses (imported here: it needs torch)
    from turbotune.model.kernels.mlp_tiling import mlp_tile_budget, mlp_token_chunk
    return mlp_token_chunk(n_tokens, intermediate, b, mlp_tile_budget(checkpointing))


def bf16x3_min_features() -> int:
    """Width from which turbotune's fp32 adapter products read 16-bit activations without an fp32 copy."""
    from turbotune.model.kernels.lora_parts import BF16X3_MIN_FEATURES  # needs torch: imported when asked
    return BF16X3_MIN_FEATURES


def layer_saved_bytes_per_token(shape: ModelShape, method: str = "turbotune", r: int = 16, b: int = 2,
                                a: int = ADAPTER_BYTES, n_tokens: int | None = None,
                                checkpointing: str | None = None) -> dict[str, int]:
    """What one decoder layer saves for backward, bytes per token, by term (planner docstring, section 3).

    The key "layer_input" is the layer's input x when the layer itself saves it (turbotune's input RMSNorm;
    hf only in fp32); under checkpointing it is the checkpoint input and is counted there instead.
    n_tokens (turbotune): when the MLP is tiled over that many tokens it saves only its input, so "mlp_e_g" and
    "mlp_xa" are 0; None: not tiled. checkpointing: the mode, which sets the tiling budget (mlp_tile_budget).
    """
    H, I, Dq, Dkv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    sdpa = {"sdpa_qkv": (Dq + 2 * Dkv) * b, "sdpa_lse": 4 * nh}
    if method == "turbotune":
        untiled = mlp_tile_chunk(n_tokens, I, b, checkpointing) is None
        return {"layer_input": H * b, "norm_rstd": 2 * 4, "qkv_x": H * b, "qkv_xa": 3 * r * a, **sdpa,
                "attn_out": Dq * b, "o_xa": r * a, "mid_residual": H * b, "mlp_x": H * b,
                "mlp_e_g": 2 * I * b if untiled else 0, "mlp_xa": 3 * r * a if untiled else 0}
    if method == "hf":
        cast = a != b
        fp32_model = b == 4
        return {"layer_input": H * 4 if fp32_model else 0,
                # RMSNorm's fp32 copy of x (pow and mul save it) + rsqrt's output; in fp32 the "copy" is x itself
                "norm_x_fp32": (0 if fp32_model else H * 4) + H * 4, "norm_rstd": 2 * 4,
                "qkv_x": 3 * H * a if cast else H * b, "qkv_xa": 3 * r * a, **sdpa,
                "attn_out": Dq * b, "o_x": Dq * a if cast else 0, "o_xa": r * a,
                "mlp_x": 2 * H * a if cast else H * b, "mlp_gate_act_up": 3 * I * b,
                "down_x": I * a if cast else I * b, "mlp_xa": 3 * r * a}
    # imported here, not at the top: planner imports this module
    from turbotune.planner.shapes import METHODS, PlanError
    raise PlanError(f"method must be one of {METHODS}, got {method!r}")


def layer_working_bytes(shape: ModelShape, n_tokens: int, method: str, b: int, a: int, qlora: bool,
                        checkpointing: str | None = None) -> dict:
    """The largest temporaries of one layer's (recomputed) forward + backward, bytes (planner docstring, section 3).

    "mlp_chunk" is the token chunk of turbotune's tiled MLP (None: untiled); the MLP term then covers one chunk.
    """
    N, H, I, Dq, Dkv, nh = n_tokens, shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    cast = a != b
    chunk = None
    if method == "turbotune":
        # the fp32 copy of an [N, I] tensor exists only where the adapters' fp32 products don't go the bf16x3
        # way (kernels/lora_parts.py: 16-bit activations at least BF16X3_MIN_FEATURES wide, on a GPU)
        cast_i = cast and I < bf16x3_min_features()
        chunk = mlp_tile_chunk(N, I, b, checkpointing)
        if chunk is None:
            mlp = N * I * (b + (a if cast_i else 0))
        else:  # one chunk's recomputed e, g (saved by nothing else now), its backward's peak, and its dx rows
            mlp = chunk * (I * (3 * b + (a if cast_i else 0)) + H * b)
        grads = 2 * N * H * b
    else:
        mlp = N * I * (b + 2 * a) if cast else 2 * N * I * b
        grads = 2 * N * H * b + 4 * N * H
    attn = N * (4 * Dq + (Dq + 2 * Dkv) * b + (2 * Dq * b if Dkv < Dq else 0) + 4 * nh)
    dequant = max(i * o for i, o in shape.linear_shapes().values()) * b if qlora else 0
    return {"mlp": mlp, "attention": attn, "gradients": grads, "dequant": dequant, "mlp_chunk": chunk,
            "total": max(mlp, attn) + grads + dequant}
