"""Batched thin sketch products ``W @ X`` / ``W^T @ X`` for a stack of same-shape weights in their checkpoint dtype.

One kernel family, two layers (the Liger-Kernel layout): :func:`_split_kernel` and :func:`_sketch_kernel`
(jitted) and :func:`sketch` (the launcher, the only name other modules import). These are the two products of
every block-Krylov iteration of :func:`lorafft.linalg.truncated_svd` (``W^T K`` and ``W (W^T K)``, K thin with
b ≈ 20 columns).

W is read once, tile by tile, in its stored dtype; no upcast copy of W is ever made. The products run on Hopper's
warpgroup MMA with fp32 accuracy and fp32 accumulation:

* X (thin, fp32/fp64) is scaled per column by a power of two (exact; undone on the output) so that its largest
  entry lies in [2^13, 2^14), then split once per call (:func:`_split_kernel`) into three 16-bit parts ``X_j``
  (hi, mid, lo; the remainder is below 2^-23 of each entry, or 2^-38 of its column's largest: fp32 accuracy),
  zero-padded to whole tiles. The parts are fp16 for fp16 and fp8 weights (both exact in fp16, and fp8 widens to
  fp16 with one instruction per pair), bf16 for bf16 and fp32 weights.
* The three parts are stacked on the MMA's row side: rows ``j * 21 + c`` of one 64-row operand hold part j of
  column c, so ``OUT^T = X_s^T W'^T`` is ONE ``tl.dot`` per W tile (per part of W), 64 rows being what Triton needs
  for warpgroup MMA with 4 warps (b = 20 columns fill 60 of them); the three row groups are summed once, after the
  reduction.
* W is converted in registers to X's part dtype: bf16, fp16 and fp8 (e4m3/e5m2) are exact in one part, fp32
  (24 significant bits) in three bf16 parts (three MMAs per tile).

Sums over the reduction are deterministic: no atomics, split-K parts added in a fixed order. The sm_90 machine code
and its cost per tile (tensor-core, shared-memory and HBM cycles) are read offline by
``benchmarks/static_sm90.py``.
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
# (parts needed to hold each weight dtype exactly, their dtype = X's part dtype)
W_PARTS = {torch.bfloat16: 1, torch.float8_e4m3fn: 1, torch.float8_e5m2: 1, torch.float16: 1, torch.float32: 3}
PART_DTYPE = {torch.bfloat16: torch.bfloat16, torch.float32: torch.bfloat16, torch.float16: torch.float16,
              torch.float8_e4m3fn: torch.float16, torch.float8_e5m2: torch.float16}
COLUMN_TOP = 14  # X's columns are scaled so that their largest entry lies in [2^13, 2^14): fp16 parts stay normal
X_PARTS = 3

# Tiles, by W's itemsize. The MMA's row side is BLOCK_M = 64 rows of stacked X parts (Triton's warpgroup MMA needs
# 64 rows with 4 warps), so one program takes X_COLUMNS = 21 columns of X (more columns take more programs, each
# reading W again); its wide side is BLOCK_R = 128 rows of W, BLOCK_K deep: 128 bytes a row (fp32 32 deep: 64 left
# Triton 3.6 a stack frame at 255 registers). Weights widened in registers (fp8, fp32: PREFETCH) are loaded one tile
# ahead into registers, not through the shared-memory pipeline, whose stages then hold X alone; 16-bit weights go to
# shared memory as stored, NUM_STAGES deep. CTAS_PER_SM is what fits an SM (shared memory and registers in the sm_90
# static analysis, benchmarks/results/static_sm90.md, whose test checks it); split_count sizes the grid to one wave
# of it.
BLOCK_R, BLOCK_M, NUM_WARPS = 128, 64, 4
X_COLUMNS = BLOCK_M // X_PARTS
BLOCK_K = {1: 128, 2: 64, 4: 32}
NUM_STAGES = {1: 2, 2: 4, 4: 2}
PREFETCH = {1: True, 2: False, 4: True}
CTAS_PER_SM = {1: 2, 2: 2, 4: 2}


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
def _split_dots(x, w, acc, W_PARTS: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + X_s^T W_i`` summed over W's parts i: x the [BLOCK_M, BLOCK_K] tile of the stacked parts of X (X_s^T),
    w a [BLOCK_K, BLOCK_R] tile of W'^T in its stored dtype, widened exactly to X's part dtype (fp32: three bf16
    parts). One MMA per part of W; the three parts of X are the MMA's rows."""
    if W_PARTS == 1:
        return _mma(x, w.to(x.dtype), acc, UPCAST)
    else:
        wf = w.to(tl.float32)
        w0 = wf.to(tl.bfloat16)
        rest = wf - w0.to(tl.float32)
        w1 = rest.to(tl.bfloat16)
        w2 = (rest - w1.to(tl.float32)).to(tl.bfloat16)
        acc = _mma(x, w0, acc, UPCAST)
        acc = _mma(x, w1, acc, UPCAST)
        return _mma(x, w2, acc, UPCAST)


@triton.jit
def _w_tile(w_base, k0, k_stop, offs_r, mask_r, stride_wk, stride_wr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_R] tile of W'^T at reduction rows ``k0 ...`` (zeros from k_stop on)."""
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    return tl.load(w_base + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                   mask=(offs_k < k_stop)[:, None] & mask_r[None, :], other=0.0)


@triton.jit
def _sum_parts(acc, PARTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``[BLOCK_C, BLOCK_R]``: row c is the sum over j < PARTS of acc's row ``c + j * (BLOCK_M // PARTS)`` (acc
    ``[BLOCK_M, BLOCK_R]``, rows stacked by part); rows c >= BLOCK_M // PARTS are left for the caller to mask."""
    block_m: tl.constexpr = acc.shape[0]
    rows = tl.arange(0, BLOCK_C)[:, None] + tl.zeros((BLOCK_C, acc.shape[1]), dtype=tl.int32)
    out = tl.gather(acc, rows, 0)
    for j in tl.static_range(1, PARTS):
        out += tl.gather(acc, tl.minimum(rows + j * (block_m // PARTS), block_m - 1), 0)
    return out


@triton.jit
def _sketch_kernel(
    W, XP, COLUMN, OUT, S,
    R, K, NB,
    SPLITS, K_SPLIT,
    stride_wl, stride_wr, stride_wk,
    stride_xl, stride_xk, stride_cl,
    stride_os, stride_ol, stride_or,
    stride_sl, stride_sr, stride_sk,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PARTS: tl.constexpr,
    W_PARTS: tl.constexpr,
    PREFETCH: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``OUT[s, l, r, c] = sum_{k in split s} W'[l, r, k] X[l, k, c]`` where W' is W (or W^T: the launcher swaps
    the strides); split s covers ``[s K_SPLIT, (s + 1) K_SPLIT)`` of the reduction, K_SPLIT a multiple of BLOCK_K.
    Computed transposed, ``OUT^T = X_s^T W'^T``: the MMA's rows are X's PARTS parts stacked (``BLOCK_M // PARTS``
    columns of X each), its wide side the W tile; the part rows are summed once, after the loop.
    XP ``[L, K_pad, column blocks * BLOCK_M]`` holds the stacked parts, zero-padded (row stride stride_xk, unit
    column stride), so only W's loads need masks; COLUMN ``[L, NB]`` fp32 undoes X's column scaling on the output.
    PREFETCH: W is loaded one tile ahead into registers instead of through the shared-memory pipeline (for weights
    that are widened in registers anyway)."""
    pid_l = (tl.program_id(0) // SPLITS).to(tl.int64)
    pid_s = (tl.program_id(0) % SPLITS).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    k_start = pid_s * K_SPLIT
    k_stop = tl.minimum(k_start + K_SPLIT, K)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    w_base = W + pid_l * stride_wl
    x_base = XP + pid_l * stride_xl + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    s_base = S + pid_l * stride_sl

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # OUT^T tile, one row group per part of X
    if PREFETCH:
        w_next = _w_tile(w_base, k_start, k_stop, offs_r, mask_r, stride_wk, stride_wr, BLOCK_K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        if PREFETCH:
            w = w_next
            w_next = _w_tile(w_base, k0 + BLOCK_K, k_stop, offs_r, mask_r, stride_wk, stride_wr, BLOCK_K)
        else:
            w = _w_tile(w_base, k0, k_stop, offs_r, mask_r, stride_wk, stride_wr, BLOCK_K)
        x = tl.load(x_base + (k0 + tl.arange(0, BLOCK_K).to(tl.int64))[None, :] * stride_xk)
        if SCALE_MODE == 4:  # BLOCK_R and BLOCK_K divide SCALE_BLOCK: the tile lies inside one scale block
            part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        else:
            part = acc
        part = _split_dots(x, w, part, W_PARTS, UPCAST)
        if SCALE_MODE == 4:
            s = tl.load(s_base + (pid_r * BLOCK_R // SCALE_BLOCK) * stride_sr + (k0 // SCALE_BLOCK) * stride_sk)
            acc += s * part
        else:
            acc = part

    columns = tl.arange(0, BLOCK_C)
    offs_c = pid_b * (BLOCK_M // PARTS) + columns
    mask_c = (columns < BLOCK_M // PARTS) & (offs_c < NB)
    out = _sum_parts(acc, PARTS, BLOCK_C) * tl.load(COLUMN + pid_l * stride_cl + offs_c, mask=mask_c)[:, None]
    if SCALE_MODE == 1:
        out = out * tl.load(s_base)
    if SCALE_MODE == 2:  # per-channel scale on W's rows, which are the output rows of W X
        s = tl.load(s_base + offs_r * stride_sr, mask=mask_r, other=0.0)
        out = out * s[None, :]

    out_base = OUT + pid_s * stride_os + pid_l * stride_ol
    tl.store(out_base + offs_r[None, :] * stride_or + offs_c[:, None], out, mask=mask_c[:, None] & mask_r[None, :])


@triton.jit
def _split_kernel(
    X, M, XP, COLUMN,
    K, NB, K_PAD,
    stride_xl, stride_xk, stride_xb, stride_pl, stride_pk, stride_cl,
    PARTS: tl.constexpr,
    COLUMN_TOP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """X's parts, stacked, one launch: ``XP[l, k, b BLOCK_M + j G + c] = X_j[l, k, b G + c]`` (G = BLOCK_M // PARTS
    columns per block b, PARTS = 3), the j-th 16-bit part (hi, mid, lo) of ``X[l, k, c] 2^t_c``,
    where ``2^t_c`` brings the column's largest |x| (``M [L, NB]`` fp32) into [2^(COLUMN_TOP-1), 2^COLUMN_TOP),
    ``COLUMN[l, c] = 2^-t_c``; zeros in the padding (k >= K, columns c >= NB, rows past PARTS * G).
    Each remainder is exact in X's dtype (fp32 or fp64), so the parts sum to the scaled x within the last part's
    rounding."""
    pid_l = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    stacked = tl.arange(0, BLOCK_M)
    part = stacked // (BLOCK_M // PARTS)
    col = tl.program_id(2) * (BLOCK_M // PARTS) + stacked % (BLOCK_M // PARTS)
    valid = (part < PARTS) & (col < NB)
    top = tl.load(M + pid_l * NB + col, mask=valid, other=0.0)
    exponent = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # top = f 2^exponent, f in [0.5, 1)
    t = tl.minimum(tl.maximum(COLUMN_TOP - exponent, -126), 126)
    scale = ((t + 127) << 23).to(tl.float32, bitcast=True)  # 2^t, exactly
    if tl.program_id(1) == 0:
        tl.store(COLUMN + pid_l * stride_cl + col, ((127 - t) << 23).to(tl.float32, bitcast=True),
                 mask=valid & (part == 0))
    x = tl.load(X + pid_l * stride_xl + offs_k[:, None] * stride_xk + col[None, :] * stride_xb,
                mask=(offs_k < K)[:, None] & valid[None, :], other=0.0)
    x = x * scale.to(x.dtype)[None, :]
    # rounded through fp32 (fp64 -> 16-bit is not converted directly everywhere): each part is still within a
    # 16-bit ulp of what is left, so every remainder stays exact in X's dtype
    high = x.to(tl.float32).to(XP.dtype.element_ty)
    rest = x - high.to(x.dtype)
    mid = rest.to(tl.float32).to(XP.dtype.element_ty)
    low = (rest - mid.to(x.dtype)).to(tl.float32).to(XP.dtype.element_ty)
    value = tl.where(part[None, :] == 0, high, tl.where(part[None, :] == 1, mid, low))
    target = XP + pid_l * stride_pl + offs_k[:, None] * stride_pk + (tl.program_id(2) * BLOCK_M + stacked)[None, :]
    tl.store(target, value, mask=(offs_k < K_PAD)[:, None])


def split_count(programs: int, K: int, block_k: int, slots: int) -> int:
    """How many parts to cut a reduction of length K into: the most that keep ``programs`` (the grid without a
    split) times the parts within ``slots`` programs (one wave: SMs × CTAS_PER_SM on CUDA, 1 on the CPU), each part
    keeping at least eight BLOCK_K tiles."""
    return max(1, min(slots // programs, K // (8 * block_k)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles_for(R: int, K: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_K)`` for an ``[R, K]`` product with weights of ``dtype``: the tile of W's itemsize, smaller
    (>= 16, ``tl.dot``'s minimum) only for smaller matrices. Powers of two up to 128: both divide a 128×128 scale
    block."""
    return _block(R, BLOCK_R), _block(K, BLOCK_K[dtype.itemsize])


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _scale_mode(scale, block, W: torch.Tensor, transpose: bool, tiles: tuple[int, int]):
    """``(mode, strides)`` of a dequantization scale with tiles of side ``block`` (see :func:`sketch`); the
    reduction-side channel scale of ``W^T X`` is returned as mode None (the launcher folds it into X)."""
    L, m, n = W.shape
    if scale is None:
        return _NO_SCALE, (0, 0, 0)
    if scale.dtype != torch.float32 or scale.device != W.device:
        raise TypeError(f"sketch: scale must be fp32 on {W.device}, got {scale.dtype} on {scale.device}")
    if scale.shape == (L,):
        return _TENSOR, (scale.stride(0), 0, 0)
    if scale.shape == (L, m):
        return (None, (0, 0, 0)) if transpose else (_ROW_CHANNEL, (scale.stride(0), scale.stride(1), 0))
    if scale.dim() == 3 and block is not None:
        blocks = (L, triton.cdiv(m, block), triton.cdiv(n, block))
        if scale.shape != blocks:
            raise ValueError(f"sketch: a scale of {block}x{block} blocks must be {list(blocks)}, "
                             f"got {tuple(scale.shape)}")
        if any(block % tile for tile in tiles):
            raise ValueError(f"sketch: the tiles {tiles} must divide the scale block {block}")
        strides = scale.stride()
        return _BLOCK, (strides[0], strides[2], strides[1]) if transpose else strides
    raise ValueError(f"sketch: scale must be [{L}] (tensor), [{L}, {m}] (channel) or [{L}, ceil(m/block), "
                     f"ceil(n/block)] with its scale_block, got {tuple(scale.shape)}")


def _check(W: torch.Tensor, X: torch.Tensor, transpose: bool) -> None:
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
    if W.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sketch: CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")


def _x_parts(X: torch.Tensor, k_pad: int, dtype: torch.dtype):
    """``(XP, column)``: X's three 16-bit parts after scaling each column by a power of two, stacked for the
    sketch kernel: ``XP [L, k_pad, blocks * BLOCK_M]`` in ``dtype``, block b's rows ``j X_COLUMNS + c`` holding part
    j of column ``b X_COLUMNS + c``, zero-padded; and ``column [L, b]`` fp32, the inverse scales (exact powers of
    two) that the sketch kernel applies to its output's columns. Two launches: the column maxima, then
    :func:`_split_kernel`."""
    L, K, nb = X.shape
    blocks = triton.cdiv(nb, X_COLUMNS)
    top = torch.linalg.vector_norm(X, ord=float("inf"), dim=1).float()  # [L, nb]
    XP = torch.empty(L, k_pad, blocks * BLOCK_M, dtype=dtype, device=X.device)
    column = torch.empty(L, nb, dtype=torch.float32, device=X.device)
    _split_kernel[(L, triton.cdiv(k_pad, 64), blocks)](
        X, top, XP, column,
        K, nb, k_pad,
        X.stride(0), X.stride(1), X.stride(2), XP.stride(0), XP.stride(1), column.stride(0),
        PARTS=X_PARTS, COLUMN_TOP=COLUMN_TOP, BLOCK_K=64, BLOCK_M=BLOCK_M,
    )
    return XP, column


def sketch(
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    transpose: bool = False,
    scale: torch.Tensor | None = None,
    scale_block: int | None = None,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Batched thin product ``W @ X`` (or ``W^T @ X``) with W read once in its stored dtype, fp32 accuracy.

    Args:
        W: ``[L, m, n]`` fp32, fp16, bf16 or fp8 (e4m3fn / e5m2), any strides; never copied or upcast in memory.
        X: ``[L, n, b]`` (``[L, m, b]`` with ``transpose``) fp32 or fp64, on W's device; each program takes
            X_COLUMNS (21) of its b columns.
        transpose: compute ``W^T @ X`` instead of ``W @ X``.
        scale: optional fp32 dequantization scale, so that the weight is ``W * scale`` (multiplied, as DeepSeek's
            ``weight_dequant`` and compressed-tensors do): ``[L]`` per tensor, ``[L, m]`` per output channel
            (row of W), or ``[L, ceil(m/scale_block), ceil(n/scale_block)]`` per ``scale_block``-sided tile.
        scale_block: the tile side of a block scale (128 in DeepSeek-V3 and compressed-tensors' block strategy),
            a multiple of 128; needed only with a block scale.
        out: optional fp32 ``[L, m, b]`` (``[L, n, b]``) output buffer; every entry is overwritten.
        split_k: cut the reduction into this many parts, computed by separate programs and summed afterwards (a
            fixed order: deterministic). Default :func:`split_count`: as many as fill one wave of CTAs when
            ``L · R / BLOCK_R`` programs alone would not (an 8192-row product has only 64 row blocks of 128).

    Returns:
        ``out``, fp32 ``[L, m, b]`` (``[L, n, b]`` with ``transpose``).

    Runs on CUDA tensors (launched on W's device), or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check(W, X, transpose)
    L, m, n = W.shape
    R, K, nb = (n, m, X.shape[2]) if transpose else (m, n, X.shape[2])
    if out is None:
        out = torch.empty(L, R, nb, dtype=torch.float32, device=W.device)
    elif out.shape != (L, R, nb) or out.dtype != torch.float32 or out.device != W.device or out.stride(2) != 1:
        raise ValueError(f"sketch: out must be fp32 [{L}, {R}, {nb}] on {W.device} with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    block_r, block_k = tiles_for(R, K, W.dtype)
    mode, s_strides = _scale_mode(scale, scale_block, W, transpose, (block_r, block_k))
    if L == 0 or R == 0 or nb == 0:
        return out
    if mode is None:  # per-channel scale on W's rows = the reduction index of W^T X: scale X's rows instead
        X, mode = X * scale.to(X.dtype)[:, :, None], _NO_SCALE

    # W'[r, k]: W[r, k] or W[k, r]; the scale's strides follow the same roles.
    stride_wr, stride_wk = (W.stride(2), W.stride(1)) if transpose else (W.stride(1), W.stride(2))
    size = W.dtype.itemsize
    grid = (L, triton.cdiv(R, block_r), triton.cdiv(nb, X_COLUMNS))
    slots = CTAS_PER_SM[size] * _multiprocessors(W.device.index) if W.is_cuda else 1
    splits = split_count(grid[0] * grid[1] * grid[2], K, block_k, slots) if split_k is None else max(1, int(split_k))
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k  # whole tiles per split
    splits = triton.cdiv(K, k_split)  # no empty split
    target = out if splits == 1 else torch.empty(splits, L, R, nb, dtype=torch.float32, device=W.device)
    split_stride = 0 if splits == 1 else target.stride(0)
    t_strides = target.stride()[-3:-1]
    with torch.cuda.device(W.device) if W.is_cuda else contextlib.nullcontext():
        XP, column = _x_parts(X, triton.cdiv(K, block_k) * block_k, PART_DTYPE[W.dtype])
        _sketch_kernel[(L * splits, grid[1], grid[2])](
            W, XP, column, target, out if scale is None else scale,  # S is unused (a valid pointer) without a scale
            R, K, nb,
            splits, k_split,
            W.stride(0), stride_wr, stride_wk,
            XP.stride(0), XP.stride(1), column.stride(0),
            split_stride, *t_strides,
            *s_strides,
            SCALE_MODE=mode, SCALE_BLOCK=scale_block or BLOCK_R,  # SCALE_BLOCK is read by the block mode only
            BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_M=BLOCK_M, BLOCK_C=triton.next_power_of_2(X_COLUMNS),
            PARTS=X_PARTS, W_PARTS=W_PARTS[W.dtype], PREFETCH=PREFETCH[size],
            UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=NUM_WARPS, num_stages=NUM_STAGES[size],
        )
        if splits > 1:
            torch.sum(target, dim=0, out=out)
    return out
