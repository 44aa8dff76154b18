"""Choosing between a Triton kernel and its plain-PyTorch reference.

Every op takes `backend="auto" | "triton" | "torch"`. "auto" runs Triton on CUDA tensors (when Triton is
installed) and the reference everywhere else. Tests force "triton" on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch

from turbotune._compat import triton_usable

BACKENDS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """Triton's CPU interpreter is on (set before triton is imported; used by the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor, backend: str = "auto") -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_usable():
            raise RuntimeError("backend='triton' asked for, but triton is not installed (pip install triton)")
        if not t.is_cuda and not interpret_mode():
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return t.is_cuda and triton_usable()
