"""Batched thin sketch products ``W @ X`` / ``W^T @ X`` for a stack of same-shape weights in their checkpoint dtype.

One kernel family, two layers (the Liger-Kernel layout): :func:`_sketch_kernel` (jitted) and :func:`sketch` (the
launcher, the only name other modules import). These are the two products of every block-Krylov iteration of
:func:`lorafft.linalg.truncated_svd` (``W^T K`` and ``W (W^T K)``, K thin with b ≈ 20 columns).

W is read once, tile by tile, in its stored dtype (fp32, fp16, bf16, fp8 e4m3/e5m2) and converted to fp32 in
registers: no upcast copy of W is ever made. Accumulation is fp32.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from lorafft.kernels.blocks import block_size

FP8_BLOCK = 128  # the 128×128 quantization block of DeepSeek-V3 / compressed-tensors' block strategy

_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)

# SCALE_MODE values
_NO_SCALE, _TENSOR, _ROW_CHANNEL, _RED_CHANNEL, _BLOCK = 0, 1, 2, 3, 4


@triton.jit
def _sketch_kernel(
    W, X, OUT, S,
    R, K, NB,
    SPLITS, K_SPLIT,
    stride_wl, stride_wr, stride_wk,
    stride_xl, stride_xk, stride_xb,
    stride_os, stride_ol, stride_or, stride_ob,
    stride_sl, stride_sr, stride_sk,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``OUT[s, l, r, c] = sum_{k in split s} W'[l, r, k] X[l, k, c]`` where W' is W (or W^T: the launcher swaps
    the strides); split s covers ``[s K_SPLIT, (s + 1) K_SPLIT)`` of the reduction, K_SPLIT a multiple of BLOCK_K."""
    pid_l = (tl.program_id(0) // SPLITS).to(tl.int64)
    pid_s = (tl.program_id(0) % SPLITS).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    k_start = pid_s * K_SPLIT
    k_stop = tl.minimum(k_start + K_SPLIT, K)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_r = offs_r < R
    mask_b = offs_b < NB

    w_base = W + pid_l * stride_wl
    x_base = X + pid_l * stride_xl
    s_base = S + pid_l * stride_sl

    acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < k_stop
        w = tl.load(w_base + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_base + offs_k[:, None] * stride_xk + offs_b[None, :] * stride_xb,
                    mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if SCALE_MODE == 3:  # per-channel scale on W's rows, which are the reduction index of W^T X
            s = tl.load(s_base + offs_k * stride_sk, mask=mask_k, other=0.0)
            x = x * s[:, None]
        # "ieee" or "tf32x3", never plain tf32: tf32 keeps 10 mantissa bits (a relative rounding of 2^-11 per
        # input), and the Krylov residuals that certify the SVD need these products to fp32 accuracy (~1e-6).
        part = tl.dot(w, x, input_precision=PRECISION)
        if SCALE_MODE == 4:  # BLOCK_R and BLOCK_K divide SCALE_BLOCK: the tile lies inside one scale block
            s = tl.load(s_base + (pid_r * BLOCK_R // SCALE_BLOCK) * stride_sr + (k0 // SCALE_BLOCK) * stride_sk)
            acc += s * part
        else:
            acc += part

    if SCALE_MODE == 1:
        acc = acc * tl.load(s_base)
    if SCALE_MODE == 2:  # per-channel scale on W's rows, which are the output rows of W X
        s = tl.load(s_base + offs_r * stride_sr, mask=mask_r, other=0.0)
        acc = acc * s[:, None]

    out_base = OUT + pid_s * stride_os + pid_l * stride_ol
    tl.store(out_base + offs_r[:, None] * stride_or + offs_b[None, :] * stride_ob, acc,
             mask=mask_r[:, None] & mask_b[None, :])


def split_count(tiles: tuple[int, int, int], K: int, block_k: int, device: torch.device) -> int:
    """How many parts to cut a reduction of length K into: on CUDA, enough for about four programs per SM
    (``tiles``: programs without a split), each part keeping at least eight BLOCK_K tiles; 1 on the CPU."""
    if device.type != "cuda":
        return 1
    programs = tiles[0] * tiles[1] * tiles[2]
    wanted = triton.cdiv(4 * _multiprocessors(device.index or 0), programs)
    return max(1, min(wanted, K // (8 * block_k)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sketch(
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    transpose: bool = False,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Batched thin product ``W @ X`` (or ``W^T @ X``) with W read once in its stored dtype, fp32 accumulation.

    Args:
        W: ``[L, m, n]`` fp32, fp16, bf16 or fp8 (e4m3fn / e5m2), any strides; never copied or upcast in memory.
        X: ``[L, n, b]`` (``[L, m, b]`` with ``transpose``) fp32, on W's device.
        transpose: compute ``W^T @ X`` instead of ``W @ X``.
        scale: optional fp32 dequantization scale, so that the weight is ``W * scale`` (multiplied, as DeepSeek's
            ``weight_dequant`` and compressed-tensors do): ``[L]`` per tensor, ``[L, m]`` per output channel
            (row of W), or ``[L, ceil(m/128), ceil(n/128)]`` per 128×128 block.
        out: optional fp32 ``[L, m, b]`` (``[L, n, b]``) output buffer; every entry is overwritten.
        split_k: cut the reduction into this many parts, computed by separate programs and summed afterwards (a
            fixed order: deterministic). Default :func:`split_count`: enough programs to keep every SM streaming W
            when ``L · R / BLOCK_R`` alone would not (an 8192-row product has only 128 row blocks of 64).
        precision: ``tl.dot`` input precision, "ieee" (fp32 FMA) or "tf32x3" (three tf32 tensor-core passes,
            fp32-level error; for fp16/bf16/fp8 weights, exact in tf32, the pass on W's low part multiplies zeros).

    Returns:
        ``out``, fp32 ``[L, m, b]`` (``[L, n, b]`` with ``transpose``).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 only there).
    """
    if W.ndim != 3 or X.ndim != 3:
        raise ValueError(f"sketch: W must be [L, m, n] and X [L, k, b], got {tuple(W.shape)} and {tuple(X.shape)}")
    if W.dtype not in _W_DTYPES:
        raise TypeError(f"sketch: W dtype {W.dtype} not supported (one of {_W_DTYPES})")
    if X.dtype != torch.float32:
        raise TypeError(f"sketch: X must be fp32, got {X.dtype}")
    if X.device != W.device:
        raise ValueError(f"sketch: W on {W.device} but X on {X.device}")
    L, m, n = W.shape
    R, K = (n, m) if transpose else (m, n)
    if X.shape[0] != L or X.shape[1] != K:
        raise ValueError(f"sketch: X must be [{L}, {K}, b] for W {tuple(W.shape)} (transpose={transpose}), "
                         f"got {tuple(X.shape)}")
    nb = X.shape[2]
    if out is None:
        out = torch.empty(L, R, nb, dtype=torch.float32, device=W.device)
    elif out.shape != (L, R, nb) or out.dtype != torch.float32 or out.device != W.device:
        raise ValueError(f"sketch: out must be fp32 [{L}, {R}, {nb}] on {W.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if L == 0 or R == 0 or nb == 0:
        return out
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(f"sketch: precision must be 'ieee' or 'tf32x3', got {precision!r}")

    # W'[r, k]: W[r, k] or W[k, r]; the scale's strides follow the same roles.
    stride_wr, stride_wk = (W.stride(2), W.stride(1)) if transpose else (W.stride(1), W.stride(2))
    block_r, block_k, block_b = block_size(R, 64), block_size(K, 64), block_size(nb, 64)
    mode, S, s_strides = _NO_SCALE, out, (0, 0, 0)  # S unused (a valid pointer) without a scale
    if scale is not None:
        if scale.dtype != torch.float32 or scale.device != W.device:
            raise TypeError(f"sketch: scale must be fp32 on {W.device}, got {scale.dtype} on {scale.device}")
        blocks = (L, triton.cdiv(m, FP8_BLOCK), triton.cdiv(n, FP8_BLOCK))
        S = scale
        if scale.shape == (L,):
            mode, s_strides = _TENSOR, (scale.stride(0), 0, 0)
        elif scale.shape == (L, m):
            mode = _RED_CHANNEL if transpose else _ROW_CHANNEL
            s_strides = (scale.stride(0), 0, scale.stride(1)) if transpose else (scale.stride(0), scale.stride(1), 0)
        elif scale.shape == blocks:
            mode = _BLOCK
            s_strides = ((scale.stride(0), scale.stride(2), scale.stride(1)) if transpose
                         else (scale.stride(0), scale.stride(1), scale.stride(2)))
        else:
            raise ValueError(f"sketch: scale must be [{L}] (tensor), [{L}, {m}] (channel) or {list(blocks)} "
                             f"(128x128 block), got {tuple(scale.shape)}")

    if W.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sketch: CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    tiles = (L, triton.cdiv(R, block_r), triton.cdiv(nb, block_b))
    splits = split_count(tiles, K, block_k, W.device) if split_k is None else max(1, int(split_k))
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k  # whole tiles per split
    splits = triton.cdiv(K, k_split)  # no empty split
    target = out if splits == 1 else torch.empty(splits, L, R, nb, dtype=torch.float32, device=W.device)
    split_stride = 0 if splits == 1 else target.stride(0)
    t_strides = (out.stride(0), out.stride(1), out.stride(2)) if splits == 1 else target.stride()[1:]
    _sketch_kernel[(L * splits, tiles[1], tiles[2])](
        W, X, target, S,
        R, K, nb,
        splits, k_split,
        W.stride(0), stride_wr, stride_wk,
        X.stride(0), X.stride(1), X.stride(2),
        split_stride, *t_strides,
        *s_strides,
        SCALE_MODE=mode, SCALE_BLOCK=FP8_BLOCK,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_B=block_b,
        PRECISION=precision,
        num_warps=4,
    )
    if splits > 1:
        torch.sum(target, dim=0, out=out)

    return out
