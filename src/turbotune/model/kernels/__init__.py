"""Fused training kernels. One op per module: Triton kernel(s), an autograd.Function and a plain-PyTorch reference."""
