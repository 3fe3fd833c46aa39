"""Arrays from other libraries as torch tensors: anything with ``__dlpack__`` (CuPy on the GPU, NumPy, JAX, ...)
is wrapped by ``torch.from_dlpack``, zero copy, on the array's own device."""

from __future__ import annotations

import torch


def as_tensor(value) -> torch.Tensor:
    """``value`` itself if it is a torch tensor, else a tensor sharing its memory through DLPack.

    TypeError for objects that are neither (the callers turn it into their own error)."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    raise TypeError(f"expected a torch tensor or an array with __dlpack__ (CuPy, NumPy, JAX), "
                    f"got {type(value).__name__}")
