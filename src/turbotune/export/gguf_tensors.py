"""The tensors of a GGUF export: which GGML type each one is stored in, and writing them with gguf-py's own
quantisers (`gguf.quants.quantize`, the Python ports of ggml's reference quantisers).

turbotune writes the types gguf-py 0.19 quantises in Python that suit an ordinary model: F16, BF16, Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0. (gguf-py also quantises TQ1_0/TQ2_0, ternary types for models trained ternary, and MXFP4, which
llama.cpp's file types use for MoE experts only; those, the k-quants and the i-quants are llama.cpp's quantiser's
work, export/gguf.py.) Every matrix gets the asked type, as `llama-quantize --pure` does (its default mix keeps
output.weight in Q6_K, a k-quant gguf-py cannot write). A matrix whose rows are not a multiple of the type's block
(32 values for the Q types) cannot be stored in it and falls back to F16, as llama.cpp's converter does; 1-D
tensors (norms, biases) stay F32.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

WRITTEN = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what write_gguf stores itself
FALLBACK = "f16"  # for a matrix whose rows don't fit the asked type's blocks


def ggml_type(name: str):
    import gguf
    return gguf.GGMLQuantizationType[name.upper()]


def block_size(name: str) -> int:
    """Values per quantisation block: 1 for F16/BF16/F32, 32 for Q8_0 and the Q4/Q5 types."""
    import gguf
    return gguf.GGML_QUANT_SIZES[ggml_type(name)][0]


def tensor_type(quant: str, shape) -> str:
    """The type a tensor of `shape` is stored in when the file's type is `quant`."""
    if len(shape) < 2:
        return "f32"
    return quant if shape[-1] % block_size(quant) == 0 else FALLBACK


def stored(w: np.ndarray, kind: str) -> np.ndarray:
    """`w` (fp32) as the file stores it: fp32, fp16, or gguf-py's packed bytes for BF16 and the Q types."""
    from gguf.quants import quantize
    return quantize(np.ascontiguousarray(w, dtype=np.float32), ggml_type(kind))


def add_tensors(writer, tensors: Iterable[tuple[str, np.ndarray]], quant: str) -> dict[str, list[tuple[str, int]]]:
    """Add each (GGUF name, fp32 array) to `writer` in the type tensor_type gives it. Returns, per stored type,
    the (name, row length) of the tensors written in it, for the summary."""
    types: dict[str, list[tuple[str, int]]] = {}
    for name, w in tensors:
        kind = tensor_type(quant, w.shape)
        writer.add_tensor(name, stored(w, kind), raw_dtype=ggml_type(kind))
        types.setdefault(kind, []).append((name, int(w.shape[-1])))
    return types


def describe(types: dict[str, list[tuple[str, int]]], quant: str, shown: int = 4) -> str:
    """One clause for the export's summary line: how many tensors went in each type, and why any fell back."""
    parts = [f"{len(types[quant])} matrices in {quant}"] if quant in types else []
    if quant != FALLBACK and FALLBACK in types:
        names = [f"{n} (rows of {k})" for n, k in types[FALLBACK]]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{len(names)} in {FALLBACK}, their rows not a multiple of {quant}'s {block_size(quant)}-value "
                     f"blocks: {', '.join(names[:shown])}{more}")
    if "f32" in types:
        parts.append(f"{len(types['f32'])} norms/biases in f32")
    return "; ".join(parts)


def file_size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
