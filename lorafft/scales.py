"""A float8 weight's dequantisation scale as data: its values and the tile side of its block layout.

The checkpoint formats (:mod:`lorafft.io.fp8`) say which tensor is a scale and how large its blocks are; the
numerics (:mod:`lorafft.linalg`, the sketch kernel) read only this object. The matrix is ``W · scale``, multiplied
as DeepSeek-V3's ``weight_dequant`` and compressed-tensors compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("tensor", "channel", "block")


@dataclass(frozen=True)
class Scale:
    """The dequantisation scales of a stack of ``L`` matrices ``W [L, m, n]``.

    values: ``[L]`` one per matrix, ``[L, m]`` one per output channel (row of W), or
        ``[L, ceil(m/block), ceil(n/block)]`` one per ``block × block`` tile, row-major (the last row and column of
        tiles may be partial).
    block: the tile side of the block layout (128 in every format read today); unused by the other two."""

    values: torch.Tensor
    block: int

    @property
    def layout(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"block"``, from the values' rank."""
        return LAYOUTS[self.values.dim() - 1]

    def fits(self, shape: tuple[int, int, int]) -> bool:
        """Whether these values are a scale of this layout for a stack of ``shape`` ``(L, m, n)``."""
        L, m, n = shape
        expected = {"tensor": (L,), "channel": (L, m), "block": (L, -(-m // self.block), -(-n // self.block))}
        return 1 <= self.values.dim() <= 3 and tuple(self.values.shape) == expected[self.layout]

    def select(self, rows: list[int]) -> Scale:
        """The scales of the matrices ``rows`` of the stack."""
        return Scale(self.values[rows], self.block)

    def to(self, device, dtype: torch.dtype = torch.float32) -> Scale:
        return Scale(self.values.to(device, dtype), self.block)

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """``W · scale`` for ``W [L, m, n]``: a new fp32 ``[L, m, n]``, every element ``float32(w) * float32(s)``
        rounded once. ValueError if the values do not fit W's shape."""
        if W.dim() != 3 or not self.fits(tuple(W.shape)):
            raise ValueError(f"a {self.layout} scale {list(self.values.shape)} (block {self.block}) does not fit "
                             f"weights {list(W.shape)}")
        out = W.to(torch.float32, copy=True)
        values = self.values.to(out.device, torch.float32)
        if self.layout == "tensor":
            return out.mul_(values[:, None, None])
        if self.layout == "channel":
            return out.mul_(values[:, :, None])
        columns = values.repeat_interleave(self.block, dim=2)[:, :, : out.shape[2]]  # [L, tile rows, n], not [L, m, n]
        for row, start in enumerate(range(0, out.shape[1], self.block)):
            out[:, start : start + self.block].mul_(columns[:, row, None])
        return out
