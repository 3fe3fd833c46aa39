"""FP8 weights: which scale tensor fits a float8 weight, and the weight times its scale in fp32.

Two conventions are read. compressed-tensors stores ``<m>.weight_scale`` per tensor (``[]`` or ``[1]``), per
output channel (``[out, 1]`` or ``[out]``) or per 128×128 block; DeepSeek-V3 stores ``<m>.weight_scale_inv`` per
128×128 block, ``[ceil(out/128), ceil(in/128)]``, and multiplies by it like the others (its ``weight_dequant``
computes ``x * s``).
"""

from __future__ import annotations

from typing import Literal

import torch

from lorafft.scales import Scale

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_BLOCK = 128  # DeepSeek-V3's (and compressed-tensors' block strategy's) quantization block: 128×128
SCALE_SUFFIXES = ("_scale", "_scale_inv")  # <m>.weight_scale (compressed-tensors), <m>.weight_scale_inv (DeepSeek)

Fp8Scheme = Literal["tensor", "channel", "block"]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, *, block: int = FP8_BLOCK) -> torch.Tensor:
    """A quantized ``weight [out, in]`` times its ``scale``, in fp32 (a new tensor; the inputs are not changed).

    Every element is ``float32(weight) * float32(scale)`` rounded once, as DeepSeek-V3's ``weight_dequant``
    (``y = x * s``) and compressed-tensors compute it.

    Args:
        weight: ``[out, in]``, any dtype (float8 in practice).
        scale: ``[]`` or ``[1]`` (``scheme="tensor"``), ``[out, 1]`` or ``[out]`` (``"channel"``), or one per
            ``block × block`` tile, row-major, ``[ceil(out/block), ceil(in/block)]`` (``"block"``; the last row and
            column of tiles may be partial).
        scheme: how ``scale`` applies.
        block: the tile size of the block scheme.

    Returns:
        ``[out, in]`` fp32. ValueError if ``scale``'s shape does not fit ``scheme`` and ``weight``.
    """
    if weight.ndim != 2:
        raise ValueError(f"dequantize needs a 2-D weight, got shape {list(weight.shape)}")
    expected = scale_shapes(tuple(weight.shape), scheme, block)
    if tuple(scale.shape) not in expected:
        raise ValueError(f"a {scheme} scale of weight {list(weight.shape)} has shape "
                         f"{' or '.join(str(list(e)) for e in expected)}, got {list(scale.shape)}")
    stacked = {"tensor": (1,), "channel": (1, -1), "block": (1, *scale.shape)}[scheme]
    return Scale(scale.reshape(stacked), block).apply(weight[None])[0]


def layout_scheme(scale: torch.Tensor) -> Fp8Scheme:
    """The scheme of one matrix's scale as :meth:`lorafft.io.Checkpoint.get_stored` lays it out for the kernels:
    ``[]`` per tensor, ``[out]`` per output channel, ``[ceil(out/128), ceil(in/128)]`` per block."""
    return ("tensor", "channel", "block")[scale.dim()]


def scale_shapes(shape: tuple[int, int], scheme: str, block: int = FP8_BLOCK) -> list[tuple[int, ...]]:
    """The scale shapes ``scheme`` allows for a weight of ``shape`` ``(out, in)``."""
    rows, cols = shape
    if scheme == "tensor":
        return [(), (1,)]
    if scheme == "channel":
        return [(rows, 1), (rows,)]
    if scheme == "block":
        return [(-(-rows // block), -(-cols // block))]
    raise ValueError(f"unknown scale scheme {scheme!r} (expected 'tensor', 'channel' or 'block')")


def fp8_scheme(shape: tuple[int, ...], scale_shape: tuple[int, ...], suffix: str) -> Fp8Scheme | None:
    """The scheme a scale named ``<weight><suffix>`` of ``scale_shape`` applies to a weight of ``shape``, or None.

    ``_scale`` (compressed-tensors): per tensor, per channel or per 128×128 block (its ``block`` strategy);
    ``_scale_inv`` (DeepSeek-V3): per 128×128 block only. The per-channel and block shapes coincide only for a
    weight of one row or a single block, where they mean the same product.
    """
    if len(shape) != 2:
        return None
    schemes = ("block",) if suffix == "_scale_inv" else ("tensor", "channel", "block")
    return next((scheme for scheme in schemes if scale_shape in scale_shapes(shape, scheme)), None)


def scale_mismatch(scale: str, scale_dtype: torch.dtype, scale_shape: tuple[int, ...], weight: str,
                   shape: tuple[int, ...], suffix: str, scheme: Fp8Scheme | None) -> str:
    """The message for a scale tensor that does not fit its float8 weight (wrong shape, or not floating-point)."""
    allowed = ("[ceil(out/128), ceil(in/128)] (per 128x128 block)" if suffix == "_scale_inv" else
               "[] or [1] (per tensor), [out, 1] or [out] (per channel), "
               "[ceil(out/128), ceil(in/128)] (per 128x128 block)")
    what = f"shape {list(scale_shape)}" if scheme is None else f"dtype {scale_dtype}"
    return (f"scale tensor '{scale}' ({what}) does not fit its float8 weight '{weight}' {list(shape)}: expected "
            f"a floating-point scale of shape {allowed}")
