"""The model layer: loading, LoRA, quantisation, the per-model state, activation checkpointing, the
model families' fused forwards and the kernels. Imports nothing from training/, planner/, bench/,
health/ or cli/ (tests/test_layout.py)."""
