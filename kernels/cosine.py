"""Fused |cos| matching of tuned vectors against explicit base bases, without storing the s×k cosine matrix.

For ``X [L, d, s]`` (base singular vectors, column i for the i-th largest singular value) and ``Y [L, d, k]``
(unit tuned vectors), the kernel computes ``|X^T Y|`` one ``BLOCK_S × BLOCK_K`` tile at a time and folds each tile
into a running per-column max and argmax, so only ``[L, k]`` ever reaches memory. The ε counts are a cheap
``[L, k]`` reduction done in the launcher. The result matches :func:`lorafft.linalg.max_abs_cos` applied to
``BaseBasis.project`` / the explicit product.

Launchers (the only names other modules import): :func:`max_abs_cos_fused`, :func:`similarity_tiles`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lorafft.kernels.blocks import block_size

_DTYPES = (torch.float32, torch.float16)


@triton.jit
def _max_abs_cos_kernel(
    X_ptr,
    Y_ptr,
    max_ptr,
    arg_ptr,
    D,
    S,
    K,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One program per (layer, block of tuned vectors); it walks all s base vectors in BLOCK_S chunks.
    layer = tl.program_id(0).to(tl.int64)
    k_block = tl.program_id(1).to(tl.int64)

    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    X_ptr += layer * D * S
    Y_ptr += layer * D * K

    best = tl.full((BLOCK_K,), -1.0, dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_K,), dtype=tl.int64)

    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S).to(tl.int64)
        mask_s = offs_s < S
        acc = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
        for d_start in range(0, D, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            # X^T tile [BLOCK_S, BLOCK_D]: X is [d, s] row-major, so element (s, d) sits at d * S + s.
            xt = tl.load(
                X_ptr + offs_d[None, :] * S + offs_s[:, None],
                mask=mask_s[:, None] & mask_d[None, :],
                other=0.0,
            )
            y = tl.load(
                Y_ptr + offs_d[:, None] * K + offs_k[None, :],
                mask=mask_d[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc = tl.dot(xt, y, acc, input_precision=INPUT_PRECISION)
        # Padded base rows must never win: |cos| >= 0 > -1.
        cos = tl.where(mask_s[:, None], tl.abs(acc), -1.0)
        tile_max = tl.max(cos, axis=0)
        # Smallest index among the tile's maxima (tl.argmax does not promise which tie it returns).
        tile_idx = tl.min(tl.where(cos == tile_max[None, :], offs_s[:, None], S), axis=0)
        # Strict '>' keeps the earlier (smaller) index on ties across tiles, which arrive in increasing s.
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    tl.store(max_ptr + layer * K + offs_k, best, mask=mask_k)
    tl.store(arg_ptr + layer * K + offs_k, best_idx, mask=mask_k)


@triton.jit
def _similarity_tiles_kernel(
    X_ptr,
    Y_ptr,
    out_ptr,
    D,
    S,
    K,
    N,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One program per (layer, row block, column block) of the n×n output |X[:, :n]^T Y[:, :n]|.
    layer = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1).to(tl.int64)
    col_block = tl.program_id(2).to(tl.int64)

    offs_i = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = offs_i < N
    mask_j = offs_j < N
    X_ptr += layer * D * S
    Y_ptr += layer * D * K

    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        xt = tl.load(X_ptr + offs_d[None, :] * S + offs_i[:, None], mask=mask_i[:, None] & mask_d[None, :], other=0.0)
        y = tl.load(Y_ptr + offs_d[:, None] * K + offs_j[None, :], mask=mask_d[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(xt, y, acc, input_precision=INPUT_PRECISION)

    out_ptr += layer * N * N
    tl.store(out_ptr + offs_i[:, None] * N + offs_j[None, :], tl.abs(acc), mask=mask_i[:, None] & mask_j[None, :])


def _check_pair(X: torch.Tensor, Y: torch.Tensor) -> None:
    if X.dim() != 3 or Y.dim() != 3:
        raise ValueError(f"X and Y must be [L, d, s] and [L, d, k], got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0] or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must agree on L and d")
    if X.dtype not in _DTYPES or Y.dtype not in _DTYPES:
        raise TypeError(f"X and Y must be fp32 or fp16 (got {X.dtype}, {Y.dtype}); bf16 is untested here")
    if X.dtype != Y.dtype:
        raise TypeError(f"X and Y must share a dtype (got {X.dtype}, {Y.dtype})")
    if X.device != Y.device:
        raise ValueError(f"X and Y must be on one device (got {X.device}, {Y.device})")
    if not (X.is_contiguous() and Y.is_contiguous()):
        raise ValueError("X and Y must be contiguous")


def _check_out(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _precision(dtype: torch.dtype) -> str:
    # fp32: "ieee", not the tf32 default: tf32 keeps 10 mantissa bits, a relative rounding of 2^-11 per input,
    # far above the 1e-4 tolerance the report needs. fp16 inputs go through the fp16 MMA exactly; the accumulator is fp32.
    return "ieee"


def max_abs_cos_fused(
    X: torch.Tensor,
    Y: torch.Tensor,
    eps,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max |cos| of every tuned vector against ALL base vectors, without storing ``X^T Y``.

    Parameters
    ----------
    X : ``[L, d, s]`` contiguous fp32/fp16, the explicit base basis (column i = i-th base singular vector).
    Y : ``[L, d, k]`` contiguous, same dtype and device, the unit tuned vectors.
    eps : iterable of E thresholds ε.
    out : optional preallocated ``(max_cos [L, k] fp32, argmax [L, k] int64, counts [L, E] int64)``, each
        contiguous on X's device; every element is overwritten.

    Returns
    -------
    ``(max_cos, argmax, counts)``: ``max_cos[l, j] = max_i |<x_i, y_j>|`` (fp32 accumulation, ieee products),
    ``argmax[l, j]`` the smallest i attaining it, ``counts[l, e] = #{j : max_cos[l, j] < eps_e}`` (intruders),
    as in :func:`lorafft.linalg.max_abs_cos`. With ``s == 0`` max_cos is -1 and argmax 0.
    """
    _check_pair(X, Y)
    L, D, S = X.shape
    K = Y.shape[2]
    thresholds = torch.as_tensor(list(eps), dtype=torch.float32, device=X.device)
    if thresholds.dim() != 1:
        raise ValueError("eps must be a flat sequence of thresholds")
    E = thresholds.shape[0]
    if out is None:
        max_cos = torch.empty(L, K, dtype=torch.float32, device=X.device)
        argmax = torch.empty(L, K, dtype=torch.int64, device=X.device)
        counts = torch.empty(L, E, dtype=torch.int64, device=X.device)
    else:
        max_cos, argmax, counts = out
        _check_out("max_cos", max_cos, (L, K), torch.float32, X.device)
        _check_out("argmax", argmax, (L, K), torch.int64, X.device)
        _check_out("counts", counts, (L, E), torch.int64, X.device)

    if L > 0 and K > 0:
        BLOCK_K = block_size(K, 64)
        grid = (L, triton.cdiv(K, BLOCK_K))
        _max_abs_cos_kernel[grid](
            X, Y, max_cos, argmax, D, S, K,
            BLOCK_D=block_size(D, 64), BLOCK_S=block_size(S, 64), BLOCK_K=BLOCK_K,
            INPUT_PRECISION=_precision(X.dtype),
        )  # fmt: skip
    counts.copy_((max_cos.unsqueeze(-1) < thresholds).sum(dim=-2))
    return max_cos, argmax, counts


def similarity_tiles(
    X: torch.Tensor, Y: torch.Tensor, n: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``|X[:, :, :n]^T Y[:, :, :n]|`` as ``[L, n, n]`` fp32 (rows: top-n base vectors, columns: top-n tuned
    vectors), for heatmaps. Same input rules as :func:`max_abs_cos_fused`; ``n`` must not exceed s or k."""
    _check_pair(X, Y)
    L, D, S = X.shape
    K = Y.shape[2]
    if not 0 <= n <= min(S, K):
        raise ValueError(f"n={n} must lie in [0, min(s={S}, k={K})]")
    if out is None:
        out = torch.empty(L, n, n, dtype=torch.float32, device=X.device)
    else:
        _check_out("out", out, (L, n, n), torch.float32, X.device)
    if L > 0 and n > 0:
        BLOCK_N = block_size(n, 64)
        grid = (L, triton.cdiv(n, BLOCK_N), triton.cdiv(n, BLOCK_N))
        _similarity_tiles_kernel[grid](
            X, Y, out, D, S, K, n,
            BLOCK_D=block_size(D, 64), BLOCK_N=BLOCK_N, INPUT_PRECISION=_precision(X.dtype),
        )  # fmt: skip
    return out
