"""Searches over the memory planner: the longest sequence and the largest batch that fit a budget."""
from __future__ import annotations

from turbotune.planner.parallel import predict_per_gpu
from turbotune.planner.predict import BATCH_SEARCH_CAP, SEQ_SEARCH_CAP, model_shape


def _largest(fits, lo_ok: int, cap: int) -> tuple[int, bool]:
    """Largest n in [1, cap] with fits(n) (fits monotone: true then false); (0, False) if fits(1) is false.

    Returns (n, capped): capped is True when n == cap (the true limit may be higher).
    """
    if not fits(1):
        return 0, False
    lo, hi = 1, max(2, lo_ok)
    while hi <= cap and fits(hi):  # exponential search for the first failing size
        lo, hi = hi, hi * 2
    if hi > cap:
        if fits(cap):
            return cap, True
        hi = cap
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def _tiling_threshold(shape, batch: int, kw: dict) -> int | None:
    """The first sequence length at which the fused MLP is tiled over tokens (turbotune method only)."""
    if kw.get("method", "turbotune") != "turbotune" or not getattr(shape, "intermediate", None):
        return None
    from turbotune.model.kernels.mlp_tiling import mlp_tile_budget, tiling_starts_at
    from turbotune.planner.predict import DTYPE_BYTES, _dtype_name, checkpointing_mode
    budget = mlp_tile_budget(checkpointing_mode(kw.get("checkpointing", "recompute")))
    tokens = tiling_starts_at(shape.intermediate, DTYPE_BYTES[_dtype_name(kw.get("dtype", "bf16"))], budget)
    return -(-tokens // batch)


def max_seq_len(config, budget_bytes: int, batch: int, cap: int | None = None, **kw) -> tuple[int, bool]:
    """(largest sequence length whose predicted total fits budget_bytes at this batch, capped?).

    cap defaults to the model's max_position_embeddings (or 2^20). kw: predict_per_gpu's keyword arguments
    (predict_peak's, and gpus / parallel: the per-GPU prediction).
    The prediction grows with the length except at one point: where the MLP starts being tiled over tokens it
    drops (the [tokens, intermediate] tensors shrink to one chunk). So the two sides are searched apart.
    """
    shape = model_shape(config)
    cap = int(cap or shape.max_positions or SEQ_SEARCH_CAP)

    def fits(s):
        return predict_per_gpu(shape, s, batch, **kw).total_bytes <= budget_bytes

    best = _largest(fits, 1, cap)
    t = _tiling_threshold(shape, batch, kw)
    if t is not None and best[0] < t <= cap and fits(t):
        n, capped = _largest(lambda s: fits(t + s - 1), 1, cap - t + 1)
        best = (t + n - 1, capped)
    return best


def max_batch_size(config, budget_bytes: int, seq_len: int, cap: int = BATCH_SEARCH_CAP, **kw) -> tuple[int, bool]:
    """(largest micro-batch whose predicted total fits budget_bytes at this sequence length, capped?)."""
    shape = model_shape(config)
    return _largest(lambda n: predict_per_gpu(shape, seq_len, n, **kw).total_bytes <= budget_bytes, 1, int(cap))
