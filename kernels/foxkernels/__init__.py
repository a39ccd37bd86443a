"""Triton kernels for forgetting attention (imported by foxdist.ops on CUDA)."""
