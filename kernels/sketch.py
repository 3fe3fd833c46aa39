"""Batched thin sketch products ``W @ X`` / ``W^T @ X`` for a stack of same-shape weights in their checkpoint dtype.

One kernel family, two layers (the Liger-Kernel layout): :func:`_split_kernel` and :func:`_sketch_kernel`
(jitted) and :func:`sketch` (the launcher, the only name other modules import). These are the two products of
every block-Krylov iteration of :func:`lorafft.linalg.truncated_svd` (``W^T K`` and ``W (W^T K)``, K thin with
b ≈ 20 columns).

W is read once, tile by tile, in its stored dtype; no upcast copy of W is ever made. The products run on tensor
cores with fp32 accuracy and fp32 accumulation:

* X (thin, fp32/fp64) is scaled per column by a power of two (exact; undone on the output) so that its largest
  entry lies in [2^13, 2^14), then split once per call (:func:`_split_kernel`) into three 16-bit parts ``X_j``
  (hi, mid, lo; the remainder is below 2^-23 of each entry, or 2^-38 of its column's largest: fp32 accuracy),
  zero-padded to whole tiles. The parts are fp16 for fp16 and fp8 weights (both exact in fp16, and fp8 widens to
  fp16 with one instruction per pair), bf16 for bf16 and fp32 weights.
* W is converted in registers to parts of that dtype: bf16, fp16 and fp8 (e4m3/e5m2) are exact in one part, fp32
  (24 significant bits) in three bf16 parts.
* ``X_j^T W_i`` is a 16-bit ``tl.dot`` into one fp32 accumulator for every ``i + j <= 2`` (three products, six
  for fp32; the terms left out are below 2^-24 relative), computing ``OUT^T`` so that the thin X^T is the MMA's
  row side (its b columns padded to BLOCK_B) and the W tile its wide side.

fp32 weights can also use ``precision="tf32x3"`` (Triton's three tf32 passes, X as one fp32 part); the static
analysis (``benchmarks/static_sm90.py``) chose the split as the default. Sums over the reduction are
deterministic: no atomics, split-K parts added in a fixed order.
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

FP8_BLOCK = 128  # the 128×128 quantization block of DeepSeek-V3 / compressed-tensors' block strategy

_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
# (parts needed to hold each weight dtype exactly, their dtype = X's part dtype)
W_PARTS = {torch.bfloat16: 1, torch.float8_e4m3fn: 1, torch.float8_e5m2: 1, torch.float16: 1, torch.float32: 3}
PART_DTYPE = {torch.bfloat16: torch.bfloat16, torch.float32: torch.bfloat16, torch.float16: torch.float16,
              torch.float8_e4m3fn: torch.float16, torch.float8_e5m2: torch.float16}
COLUMN_TOP = 14  # X's columns are scaled so that their largest entry lies in [2^13, 2^14): fp16 parts stay normal
PRECISIONS = ("split", "tf32x3")
X_PARTS = 3

# Tiles, by W's itemsize. W tiles are BLOCK_R = 128 rows × 128 bytes (BLOCK_K = 64 deep for 16-bit weights, 128 for
# fp8), 4 warps: no spills in the sm_90 static analysis (benchmarks/results/static_sm90.md). The X^T tile's columns
# (BLOCK_B) and the pipeline stages were measured on an H200 (``gpu_check.py --only tiles``,
# benchmarks/results/gpu_check-2026-11-30-sweep.json): the three 16-bit products per W tile make the kernel
# tensor-core bound, so the 32-column X^T tile (b = 20 columns padded to 32, not 64) with 4 stages streams bf16 W
# 1.25–1.4× faster than 64 columns with 3; fp8 tiles (twice the elements per byte) were no faster with 32 columns, and
# 4 stages do not fit their shared memory with 64; fp32 keeps the statically chosen tile (not measured).
BLOCK_R, NUM_WARPS = 128, 4
BLOCK_K = {1: 128, 2: 64, 4: 64}
BLOCK_B = {1: 64, 2: 32, 4: 64}
NUM_STAGES = {1: 3, 2: 4, 4: 3}


# SCALE_MODE values; a per-channel scale on the reduction index (W^T X) is folded into X before the split
_NO_SCALE, _TENSOR, _ROW_CHANNEL, _BLOCK = 0, 1, 2, 4


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for 16-bit tiles. UPCAST (the CPU interpreter only, whose bf16 ``tl.dot`` is wrong) multiplies
    the same values in fp32: every bf16 or fp16 product is exact in fp32, so both give the same terms."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _split_dots(x_tile, stride_xp, w, acc, W_PARTS: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + sum_{i + j <= 2} X_j^T W_i``: x_tile the pointer block of X_0^T's [BLOCK_B, BLOCK_K] tile (X_j sits
    j * stride_xp further), w a [BLOCK_K, BLOCK_R] tile of W'^T in its stored dtype (W's parts take X's part
    dtype)."""
    x0 = tl.load(x_tile)
    x1 = tl.load(x_tile + stride_xp)
    x2 = tl.load(x_tile + 2 * stride_xp)
    if W_PARTS == 1:  # exact in X's part dtype
        w0 = w.to(x0.dtype)
    else:  # fp32: three bf16 parts
        wf = w.to(tl.float32)
        w0 = wf.to(tl.bfloat16)
        rest = wf - w0.to(tl.float32)
        w1 = rest.to(tl.bfloat16)
        w2 = (rest - w1.to(tl.float32)).to(tl.bfloat16)
    acc = _mma(x0, w0, acc, UPCAST)
    acc = _mma(x1, w0, acc, UPCAST)
    acc = _mma(x2, w0, acc, UPCAST)
    if W_PARTS == 3:
        acc = _mma(x0, w1, acc, UPCAST)
        acc = _mma(x1, w1, acc, UPCAST)
        acc = _mma(x0, w2, acc, UPCAST)
    return acc


@triton.jit
def _sketch_kernel(
    W, XP, COLUMN, OUT, S,
    R, K, NB,
    SPLITS, K_SPLIT,
    stride_wl, stride_wr, stride_wk,
    stride_xl, stride_xp, stride_xk,
    stride_os, stride_ol, stride_or,
    stride_sl, stride_sr, stride_sk,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    W_PARTS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``OUT[s, l, r, c] = sum_{k in split s} W'[l, r, k] X[l, k, c]`` where W' is W (or W^T: the launcher swaps
    the strides); split s covers ``[s K_SPLIT, (s + 1) K_SPLIT)`` of the reduction, K_SPLIT a multiple of BLOCK_K.
    Computed transposed, ``OUT^T = X^T W'^T``: the thin X^T is the MMA's M side (BLOCK_B columns of X) and the W
    tile, widened in registers and stored once to shared memory, its N side.
    XP holds X's parts ``[L, parts, K_pad, B_pad]``, zero-padded to whole tiles (row stride stride_xk, unit column
    stride), so only W's loads need masks; COLUMN ``[L, B_pad]`` fp32 undoes X's column scaling on the output.
    PRECISION "split": 16-bit parts; "tf32x3": one fp32 part, fp32 W."""
    pid_l = (tl.program_id(0) // SPLITS).to(tl.int64)
    pid_s = (tl.program_id(0) % SPLITS).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    k_start = pid_s * K_SPLIT
    k_stop = tl.minimum(k_start + K_SPLIT, K)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_r = offs_r < R

    w_base = W + pid_l * stride_wl
    x_base = XP + pid_l * stride_xl
    s_base = S + pid_l * stride_sl

    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)  # OUT^T tile
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=(offs_k < k_stop)[:, None] & mask_r[None, :], other=0.0)
        x_tile = x_base + offs_b[:, None] + offs_k[None, :] * stride_xk
        if SCALE_MODE == 4:  # BLOCK_R and BLOCK_K divide SCALE_BLOCK: the tile lies inside one scale block
            part = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        else:
            part = acc
        if PRECISION == "tf32x3":
            part = tl.dot(tl.load(x_tile), w.to(tl.float32), part, input_precision="tf32x3")
        else:
            part = _split_dots(x_tile, stride_xp, w, part, W_PARTS, UPCAST)
        if SCALE_MODE == 4:
            s = tl.load(s_base + (pid_r * BLOCK_R // SCALE_BLOCK) * stride_sr + (k0 // SCALE_BLOCK) * stride_sk)
            acc += s * part
        else:
            acc = part

    acc = acc * tl.load(COLUMN + pid_l * stride_xk + offs_b)[:, None]  # COLUMN rows are B_pad = stride_xk long
    if SCALE_MODE == 1:
        acc = acc * tl.load(s_base)
    if SCALE_MODE == 2:  # per-channel scale on W's rows, which are the output rows of W X
        s = tl.load(s_base + offs_r * stride_sr, mask=mask_r, other=0.0)
        acc = acc * s[None, :]

    out_base = OUT + pid_s * stride_os + pid_l * stride_ol
    tl.store(out_base + offs_r[None, :] * stride_or + offs_b[:, None], acc,
             mask=(offs_b < NB)[:, None] & mask_r[None, :])


@triton.jit
def _split_kernel(
    X, M, XP, COLUMN,
    K, NB, K_PAD, B_PAD,
    stride_xl, stride_xk, stride_xb, stride_pl, stride_pp,
    PARTS: tl.constexpr,
    COLUMN_TOP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """X's parts, one launch: ``XP[l, j, k, c] = X_j``, the j-th 16-bit part (or, with PARTS = 1, the value in XP's
    dtype) of ``X[l, k, c] 2^t_c``, where ``2^t_c`` brings the column's largest |x| (``M [L, NB]`` fp32) into
    [2^(COLUMN_TOP-1), 2^COLUMN_TOP), ``COLUMN[l, c] = 2^-t_c``; zeros in the padding (k >= K or c >= NB).
    Each remainder is exact in X's dtype (fp32 or fp64), so the parts sum to the scaled x within the last part's
    rounding."""
    pid_l = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < NB
    top = tl.load(M + pid_l * NB + offs_b, mask=mask_b, other=0.0)
    exponent = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # top = f 2^exponent, f in [0.5, 1)
    t = tl.minimum(tl.maximum(COLUMN_TOP - exponent, -126), 126)
    scale = ((t + 127) << 23).to(tl.float32, bitcast=True)  # 2^t, exactly
    if tl.program_id(1) == 0:
        tl.store(COLUMN + pid_l * B_PAD + offs_b, ((127 - t) << 23).to(tl.float32, bitcast=True))
    x = tl.load(X + pid_l * stride_xl + offs_k[:, None] * stride_xk + offs_b[None, :] * stride_xb,
                mask=(offs_k < K)[:, None] & mask_b[None, :], other=0.0)
    x = x * scale.to(x.dtype)[None, :]
    target = XP + pid_l * stride_pl + offs_k[:, None] * B_PAD + offs_b[None, :]
    inside = (offs_k < K_PAD)[:, None]
    # rounded through fp32 (fp64 -> 16-bit is not converted directly everywhere): each part is still within a
    # 16-bit ulp of what is left, so every remainder stays exact in X's dtype
    part = x.to(tl.float32).to(XP.dtype.element_ty)
    tl.store(target, part, mask=inside)
    if PARTS == 3:
        rest = x - part.to(x.dtype)
        part = rest.to(tl.float32).to(XP.dtype.element_ty)
        tl.store(target + stride_pp, part, mask=inside)
        rest = rest - part.to(x.dtype)
        tl.store(target + 2 * stride_pp, rest.to(tl.float32).to(XP.dtype.element_ty), mask=inside)


def split_count(tiles: tuple[int, int, int], K: int, block_k: int, device: torch.device) -> int:
    """How many parts to cut a reduction of length K into: on CUDA, enough for about four programs per SM
    (``tiles``: programs without a split), each part keeping at least eight BLOCK_K tiles; 1 on the CPU."""
    if device.type != "cuda":
        return 1
    programs = tiles[0] * tiles[1] * tiles[2]
    index = torch.cuda.current_device() if device.index is None else device.index
    wanted = triton.cdiv(4 * _multiprocessors(index), programs)
    return max(1, min(wanted, K // (8 * block_k)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles_for(R: int, K: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_K, BLOCK_B)`` for an ``[R, K]`` product with weights of ``dtype``: the tile of W's itemsize,
    smaller (>= 16, ``tl.dot``'s minimum) only for smaller matrices. BLOCK_R and BLOCK_K divide FP8_BLOCK."""
    return _block(R, BLOCK_R), _block(K, BLOCK_K[dtype.itemsize]), BLOCK_B[dtype.itemsize]


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _scale_mode(scale, W: torch.Tensor, transpose: bool):
    """``(mode, strides)`` of a dequantization scale (see :func:`sketch`); the reduction-side channel scale of
    ``W^T X`` is returned as mode None (the launcher folds it into X)."""
    L, m, n = W.shape
    if scale is None:
        return _NO_SCALE, (0, 0, 0)
    if scale.dtype != torch.float32 or scale.device != W.device:
        raise TypeError(f"sketch: scale must be fp32 on {W.device}, got {scale.dtype} on {scale.device}")
    blocks = (L, triton.cdiv(m, FP8_BLOCK), triton.cdiv(n, FP8_BLOCK))
    if scale.shape == (L,):
        return _TENSOR, (scale.stride(0), 0, 0)
    if scale.shape == (L, m):
        return (None, (0, 0, 0)) if transpose else (_ROW_CHANNEL, (scale.stride(0), scale.stride(1), 0))
    if scale.shape == blocks:
        strides = scale.stride()
        return _BLOCK, (strides[0], strides[2], strides[1]) if transpose else strides
    raise ValueError(f"sketch: scale must be [{L}] (tensor), [{L}, {m}] (channel) or {list(blocks)} "
                     f"(128x128 block), got {tuple(scale.shape)}")


def _check(W: torch.Tensor, X: torch.Tensor, transpose: bool, precision: str) -> None:
    if W.ndim != 3 or X.ndim != 3:
        raise ValueError(f"sketch: W must be [L, m, n] and X [L, k, b], got {tuple(W.shape)} and {tuple(X.shape)}")
    if W.dtype not in _W_DTYPES:
        raise TypeError(f"sketch: W dtype {W.dtype} not supported (one of {_W_DTYPES})")
    if X.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sketch: X must be fp32 or fp64, got {X.dtype}")
    if X.device != W.device:
        raise ValueError(f"sketch: W on {W.device} but X on {X.device}")
    L, m, n = W.shape
    K = m if transpose else n
    if X.shape[0] != L or X.shape[1] != K:
        raise ValueError(f"sketch: X must be [{L}, {K}, b] for W {tuple(W.shape)} (transpose={transpose}), "
                         f"got {tuple(X.shape)}")
    if precision not in PRECISIONS or (precision == "tf32x3" and W.dtype != torch.float32):
        raise ValueError(f"sketch: precision must be one of {PRECISIONS} ('tf32x3' for fp32 W only), "
                         f"got {precision!r} for {W.dtype}")
    if W.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sketch: CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")


def _x_parts(X: torch.Tensor, parts: int, shape: tuple[int, int], dtype: torch.dtype, block_b: int):
    """``(XP, column)``: X's parts ``[L, parts, K_pad, B_pad]`` in ``dtype`` after scaling each column by a power
    of two (three 16-bit parts, or one fp32 part for tf32x3), zero-padded to ``shape``, and ``column [L, B_pad]``
    fp32, the inverse scales (exact powers of two) that the sketch kernel applies to its output's columns. Two
    launches: the column maxima, then :func:`_split_kernel`."""
    L, K, nb = X.shape
    top = torch.linalg.vector_norm(X, ord=float("inf"), dim=1).float()  # [L, nb]
    XP = torch.empty(L, parts, *shape, dtype=dtype, device=X.device)
    column = torch.empty(L, shape[1], dtype=torch.float32, device=X.device)
    grid = (L, triton.cdiv(shape[0], 64), triton.cdiv(shape[1], block_b))
    _split_kernel[grid](
        X, top, XP, column,
        K, nb, shape[0], shape[1],
        X.stride(0), X.stride(1), X.stride(2), XP.stride(0), XP.stride(1),
        PARTS=parts, COLUMN_TOP=COLUMN_TOP, BLOCK_K=64, BLOCK_B=block_b,
    )
    return XP, column


def sketch(
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    transpose: bool = False,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    precision: str = "split",
) -> torch.Tensor:
    """Batched thin product ``W @ X`` (or ``W^T @ X``) with W read once in its stored dtype, fp32 accuracy.

    Args:
        W: ``[L, m, n]`` fp32, fp16, bf16 or fp8 (e4m3fn / e5m2), any strides; never copied or upcast in memory.
        X: ``[L, n, b]`` (``[L, m, b]`` with ``transpose``) fp32 or fp64, on W's device.
        transpose: compute ``W^T @ X`` instead of ``W @ X``.
        scale: optional fp32 dequantization scale, so that the weight is ``W * scale`` (multiplied, as DeepSeek's
            ``weight_dequant`` and compressed-tensors do): ``[L]`` per tensor, ``[L, m]`` per output channel
            (row of W), or ``[L, ceil(m/128), ceil(n/128)]`` per 128×128 block.
        out: optional fp32 ``[L, m, b]`` (``[L, n, b]``) output buffer; every entry is overwritten.
        split_k: cut the reduction into this many parts, computed by separate programs and summed afterwards (a
            fixed order: deterministic). Default :func:`split_count`: enough programs to keep every SM streaming W
            when ``L · R / BLOCK_R`` alone would not (an 8192-row product has only 64 row blocks of 128).
        precision: "split" (16-bit parts on tensor cores, see the module docstring) or, for fp32 W, "tf32x3".
            "split" is the default for fp32 too: compared statically (``benchmarks/results/static_sm90.md``) it
            needs 0.48 of the HBM issue budget against tf32x3's 0.53, at 2^-23 against ~2^-21 relative error.

    Returns:
        ``out``, fp32 ``[L, m, b]`` (``[L, n, b]`` with ``transpose``).

    Runs on CUDA tensors (launched on W's device), or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check(W, X, transpose, precision)
    L, m, n = W.shape
    R, K, nb = (n, m, X.shape[2]) if transpose else (m, n, X.shape[2])
    if out is None:
        out = torch.empty(L, R, nb, dtype=torch.float32, device=W.device)
    elif out.shape != (L, R, nb) or out.dtype != torch.float32 or out.device != W.device or out.stride(2) != 1:
        raise ValueError(f"sketch: out must be fp32 [{L}, {R}, {nb}] on {W.device} with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    mode, s_strides = _scale_mode(scale, W, transpose)
    if L == 0 or R == 0 or nb == 0:
        return out
    if mode is None:  # per-channel scale on W's rows = the reduction index of W^T X: scale X's rows instead
        X, mode = X * scale.to(X.dtype)[:, :, None], _NO_SCALE

    # W'[r, k]: W[r, k] or W[k, r]; the scale's strides follow the same roles.
    stride_wr, stride_wk = (W.stride(2), W.stride(1)) if transpose else (W.stride(1), W.stride(2))
    block_r, block_k, block_b = tiles_for(R, K, W.dtype)
    tiles = (L, triton.cdiv(R, block_r), triton.cdiv(nb, block_b))
    splits = split_count(tiles, K, block_k, W.device) if split_k is None else max(1, int(split_k))
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k  # whole tiles per split
    splits = triton.cdiv(K, k_split)  # no empty split
    tf32 = precision == "tf32x3"
    target = out if splits == 1 else torch.empty(splits, L, R, nb, dtype=torch.float32, device=W.device)
    split_stride = 0 if splits == 1 else target.stride(0)
    t_strides = target.stride()[-3:-1]
    with torch.cuda.device(W.device) if W.is_cuda else contextlib.nullcontext():
        XP, column = _x_parts(X, 1 if tf32 else X_PARTS, (triton.cdiv(K, block_k) * block_k, tiles[2] * block_b),
                              torch.float32 if tf32 else PART_DTYPE[W.dtype], block_b)
        _sketch_kernel[(L * splits, tiles[1], tiles[2])](
            W, XP, column, target, out if scale is None else scale,  # S is unused (a valid pointer) without a scale
            R, K, nb,
            splits, k_split,
            W.stride(0), stride_wr, stride_wk,
            XP.stride(0), XP.stride(1), XP.stride(2),
            split_stride, *t_strides,
            *s_strides,
            SCALE_MODE=mode, SCALE_BLOCK=FP8_BLOCK,
            BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_B=block_b,
            W_PARTS=W_PARTS[W.dtype], PRECISION=precision, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=NUM_WARPS, num_stages=NUM_STAGES[W.dtype.itemsize],
        )
        if splits > 1:
            torch.sum(target, dim=0, out=out)
    return out
