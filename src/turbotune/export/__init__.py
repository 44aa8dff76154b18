"""Shipping a trained adapter: merged folders, GGUF, the merge itself."""
