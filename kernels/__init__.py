"""Triton kernels for the GPU path, installed as ``lorafft.kernels`` (never as a top-level ``kernels``: another
distribution owns that name). The CPU path in :mod:`lorafft.linalg` does not need them."""
