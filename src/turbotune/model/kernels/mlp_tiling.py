"""The fused LoRA MLP tiled over tokens, for sequences so long that its [N, I] intermediates dominate memory.

`lora_mlp` (LoRAMLPFunction) keeps e = gate(x) and g = up(x), two [N, I] tensors, from forward to backward,
and its backward peaks at about N I (3 b + a cast) bytes (e, g, dh / h and h cast to the adapters' dtype; b
bytes per activation element, a per adapter element, cast = (a != b)). I is 3-5 x H, so at long N this is the
largest thing a decoder layer holds: at Qwen2-1.5B (I = 8960, bf16) 2 N I b alone is 35 KiB per token, 4.4 GiB
at N = 128k, per layer without checkpointing.

Rows of the MLP are independent (y_n depends on x_n only), so for a partition of the N tokens into chunks c
of C rows (the last may be shorter),

    y[c]   = mlp(x[c])                                   (the same LoRAMLPFunction, one chunk at a time)
    dx[c]  = d/dx[c] <y[c], dY[c]>                       (rows of dx: only chunk c's rows of y read x[c])
    dA     = sum_c d/dA <y[c], dY[c]>,   dB likewise     (for each of the six LoRA A / B of gate, up, down)

TokenTiledMLPFunction runs the forward chunk by chunk without autograd (writing into one [N, H] output) and
saves only x and the LoRA A / B. Its backward recomputes chunk c with autograd on (x[c] detached, so the
chunk's graph ends there), takes torch.autograd.grad of <y[c], dY[c]> with respect to x[c] and the A / B that
need a gradient (LoRAMLPFunction's own manual backward does the work), writes dx[c] into one [N, H] buffer and
sums the A / B gradients over the chunks (in fp32 buffers, then cast to the parameters' dtype).

Memory: kept across forward-backward is x (N H b, which the untiled function keeps too) instead of e and g (2 N I
b) and the three [N, r] products; the working set of forward and backward is one chunk's, C I (3 b + a cast)
+ C H b, instead of N I (3 b + a cast). `mlp_token_chunk` picks C so that one [C, I] tensor stays under a
budget (512 MiB by default), and says None (no tiling) when a whole [N, I] one already does: below that size
the plain function is faster and its peak is already small next to attention's and the loss's.

Cost: the MLP forward runs twice (once in forward, once recomputed in backward; three times under gradient
checkpointing), i.e. about +1/3 of the MLP's forward + backward time, and a 4-bit weight is dequantised per
chunk. Where the rank-r products run in bf16 (adapter_precision="input", or under autocast) each chunk's
adapter gradient is rounded to bf16 before the fp32 sum over chunks (untiled: one rounding of the whole sum), a
difference of bf16 round-off; in fp32 the two agree to fp32 round-off.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from turbotune.model.kernels.fused_lora import LoRAMLPFunction, _ab, _flat, _prep, lora_mlp
from turbotune.model.kernels.lora_parts import LoRAPart, no_autocast

__all__ = ["MLP_TILE_BUDGET_BYTES", "OFFLOAD_MLP_TILE_BUDGET_BYTES", "TILE_MULTIPLE", "TokenTiledMLPFunction",
           "mlp_tile_budget", "mlp_token_chunk", "tiled_lora_mlp", "tiling_starts_at"]

MLP_TILE_BUDGET_BYTES = 512 * 1024 ** 2   # one [chunk, I] activation tensor at most
OFFLOAD_MLP_TILE_BUDGET_BYTES = 16 * 1024 ** 2   # the same under offloaded checkpointing (mlp_tile_budget)
TILE_MULTIPLE = 256                       # chunk sizes are multiples of this (GEMM-friendly row counts)


def mlp_tile_budget(checkpointing: str | None) -> int:
    """The budget of one [chunk, I] tensor for a model checkpointed this way ("none" | "recompute" | "offload").

    Offloaded checkpointing is the mode that trades time for memory, so it tiles at ordinary lengths too
    (TURBOTUNE_OFFLOAD_MLP_TILE=0 turns that off): at 4,096 tokens of Qwen2-1.5B the recomputed layer's e and g
    (2 N I b, 140 MiB) are most of what one layer adds at the backward's peak. 16 MiB puts a chunk's working set
    (C (3 I b + H b)) under the attention backward's (bench/NOTES.md, fifteenth session). A recompute whose output
    is unused skips the tiled forward (TokenTiledMLPFunction) and every chunk's recompute inside the backward
    skips the down projection, so the MLP's matmuls are those of the untiled path. Measured on an H100 under
    SFTTrainer (eighteenth session): qwen2-1.5b LoRA 0.141 GiB off the peak (0.935x -> 0.898x Unsloth's) for 15%
    of the speed; llama3-8b LoRA, with the in-place capture, 0.30 GiB for 9%.
    """
    if checkpointing == "offload" and os.environ.get("TURBOTUNE_OFFLOAD_MLP_TILE", "1") != "0":
        return OFFLOAD_MLP_TILE_BUDGET_BYTES
    return MLP_TILE_BUDGET_BYTES


def _chunk_rows(row_bytes: int, budget_bytes: int) -> int:
    return max(TILE_MULTIPLE, budget_bytes // row_bytes // TILE_MULTIPLE * TILE_MULTIPLE)


def tiling_starts_at(intermediate_size: int, dtype_bytes: int, budget_bytes: int = MLP_TILE_BUDGET_BYTES) -> int:
    """The fewest tokens for which `mlp_token_chunk` tiles: one [n, I] tensor is over the budget and a chunk
    covers fewer than n tokens. Below it the MLP runs whole (the planner searches either side of it)."""
    row = int(intermediate_size) * int(dtype_bytes)
    return max(budget_bytes // row + 1, _chunk_rows(row, budget_bytes) + 1)


def mlp_token_chunk(n_tokens: int, intermediate_size: int, dtype_bytes: int,
                    budget_bytes: int = MLP_TILE_BUDGET_BYTES) -> int | None:
    """Rows per chunk for the token-tiled MLP, or None when no tiling is needed.

    None when one [n_tokens, intermediate_size] tensor of dtype_bytes elements fits in budget_bytes (or when
    the chunk would cover every token anyway); else C = the largest multiple of TILE_MULTIPLE with
    C * intermediate_size * dtype_bytes <= budget_bytes, and at least TILE_MULTIPLE.
    """
    if int(n_tokens) < tiling_starts_at(intermediate_size, dtype_bytes, budget_bytes):
        return None
    return _chunk_rows(int(intermediate_size) * int(dtype_bytes), budget_bytes)


def _chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class TokenTiledMLPFunction(torch.autograd.Function):
    """y = down(act(gate x) * up x) with LoRA on all three, chunk_tokens rows at a time (module docstring).

    Saved: x and the six A / B. Backward: per chunk, recompute through LoRAMLPFunction with autograd on and
    take its gradients; dx in one [N, H] buffer, A / B gradients summed over chunks in fp32.
    """

    @staticmethod
    def forward(ctx, x, Ag, Bg, Au, Bu, Ad, Bd, parts, lds, act, backend, chunk_tokens, output_unused=False):
        x2 = _flat(x)
        n = x2.shape[0]
        if output_unused:  # a recompute whose y nobody reads: the backward recomputes each chunk anyway
            y = x2.new_zeros(n, parts[2].out_features)
        else:
            y = x2.new_empty(n, parts[2].out_features)
            with torch.no_grad():
                for s, e in _chunks(n, chunk_tokens):
                    y[s:e] = LoRAMLPFunction.apply(x2[s:e], Ag, Bg, Au, Bu, Ad, Bd, parts, lds, act, backend)
        ctx.save_for_backward(x, Ag, Bg, Au, Bu, Ad, Bd)
        ctx.parts, ctx.lds, ctx.act, ctx.backend, ctx.chunk = parts, lds, act, backend, chunk_tokens
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, *ab = ctx.saved_tensors
        nig = ctx.needs_input_grad
        # Leaves of each chunk's graph: detached, so autograd.grad stops there and never touches .grad.
        ab = [t.detach().requires_grad_(nig[1 + i]) if t is not None else None for i, t in enumerate(ab)]
        parts = tuple(dataclasses.replace(p, A=ab[2 * j], B=ab[2 * j + 1]) for j, p in enumerate(ctx.parts))
        wrt = [i for i, t in enumerate(ab) if t is not None and t.requires_grad]
        acc = {i: torch.zeros_like(ab[i], dtype=torch.float32) for i in wrt}
        x2, dy2 = _flat(x), _flat(dy)
        dx = torch.empty_like(x2) if nig[0] else None
        with torch.enable_grad(), no_autocast(dy.device.type):
            for s, e in _chunks(x2.shape[0], ctx.chunk):
                xc = x2[s:e].detach().requires_grad_(nig[0])
                # output_unused: only the chunk's backward is wanted, so its down projection is not computed
                yc = LoRAMLPFunction.apply(xc, *ab, parts, ctx.lds, ctx.act, ctx.backend, True)
                inputs = ([xc] if nig[0] else []) + [ab[i] for i in wrt]
                grads = torch.autograd.grad(yc, inputs, dy2[s:e])
                if nig[0]:
                    dx[s:e] = grads[0]
                    grads = grads[1:]
                for i, g in zip(wrt, grads):
                    acc[i] += g
                del yc, grads
        out = [acc[i].to(ab[i].dtype) if i in acc else None for i in range(6)]
        if dx is not None:
            dx = dx.view(x.shape)
        return (dx, *out, None, None, None, None, None, None)


def tiled_lora_mlp(x: torch.Tensor, gate_part: LoRAPart, up_part: LoRAPart, down_part: LoRAPart,
                   act: str = "silu", adapter_precision: str = "peft", chunk_tokens: int = 8192,
                   backend: str = "auto", output_unused: bool = False) -> torch.Tensor:
    """What `lora_mlp` computes, chunk_tokens tokens at a time (TokenTiledMLPFunction); [.., H] -> [.., H].

    The autocast cast of x and the adapters' compute dtypes are fixed here once, so the backward's recompute
    runs in exactly the forward's dtypes whatever autocast state backward() is called under.
    output_unused: a checkpointed layer's recompute whose output only feeds the residual sum (recompute.py);
    zeros stand in for y, as in lora_mlp.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if x.numel() // x.shape[-1] <= chunk_tokens:  # one chunk: nothing to tile
        return lora_mlp(x, gate_part, up_part, down_part, act=act, backend=backend,
                        adapter_precision=adapter_precision, output_unused=output_unused)
    parts = (gate_part, up_part, down_part)
    x, lds = _prep(x, parts, adapter_precision)
    with no_autocast(x.device.type):
        return TokenTiledMLPFunction.apply(x, *_ab(gate_part), *_ab(up_part), *_ab(down_part), parts, tuple(lds),
                                           act, backend, int(chunk_tokens), bool(output_unused))
