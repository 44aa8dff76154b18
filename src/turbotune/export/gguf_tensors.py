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


def stored_info(shape, kind: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) of what stored() returns for an fp32 array of `shape`, without computing it:
    what GGUFWriter.add_tensor would record for it."""
    from gguf.quants import quant_shape_to_byte_shape

    shape = tuple(int(d) for d in shape)
    if kind in ("f32", "f16"):
        dtype = np.dtype(np.float32 if kind == "f32" else np.float16)
        return shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    byte_shape = tuple(int(d) for d in quant_shape_to_byte_shape(shape, ggml_type(kind)))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64))


def write_streamed(writer, infos: Iterable[tuple[str, tuple[int, ...]]], tensor_of, quant: str
                   ) -> dict[str, list[tuple[str, int]]]:
    """Write the file's header, keys and tensors, one tensor in memory at a time: every (name, shape) of `infos`
    is declared first (GGUFWriter.add_tensor_info, what add_tensor records), then each tensor_of(name) (fp32) is
    converted and written in the same order. The bytes are add_tensors' followed by write_tensors_to_file's.
    Returns what add_tensors returns."""
    types: dict[str, list[tuple[str, int]]] = {}
    names = []
    for name, shape in infos:
        kind = tensor_type(quant, shape)
        byte_shape, dtype, nbytes = stored_info(shape, kind)
        writer.add_tensor_info(name, byte_shape, dtype, nbytes, raw_dtype=ggml_type(kind))
        types.setdefault(kind, []).append((name, int(shape[-1])))
        names.append((name, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, kind in names:
        writer.write_tensor_data(stored(tensor_of(name), kind))
    return types


def add_tensors(writer, tensors: Iterable[tuple[str, np.ndarray]], quant: str) -> dict[str, list[tuple[str, int]]]:
    """Add each (GGUF name, fp32 array) to `writer` in the type tensor_type gives it, all held until
    write_tensors_to_file (the in-memory writer: write_streamed's reference in the tests). Returns, per stored
    type, the (name, row length) of the tensors written in it, for the summary."""
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
