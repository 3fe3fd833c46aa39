"""lorafft.kernels.sketch against torch fp64 on fresh random inputs, with poisoned outputs.

On CPU through the Triton interpreter, every weight dtype: the kernel's UPCAST switch (on only under the
interpreter, whose bf16 ``tl.dot`` is wrong) multiplies the same 16-bit parts in fp32, where each product is exact,
so the loads, fp8 widening, masks, splits and scales are the GPU kernel's. The 16-bit split of X is checked in torch
against fp64; the tensor-core code itself statically (tests/test_static_sm90.py) and by the gpu-marked tests."""
import os

import pytest
import torch

# Without CUDA the kernel runs under Triton's CPU interpreter, which must be on before the kernel is jitted.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from lorafft.kernels.sketch import BLOCK_M, X_COLUMNS, _x_parts, sketch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]

SCALE_BLOCK = 128  # the block side of every FP8 format read today
RTOL = 1e-5  # fp32 accumulation over at most a few hundred terms: ~1e-6 relative, with margin


def _dequantized(W, scale, block=SCALE_BLOCK):
    W = W.double()
    if scale is None:
        return W
    L, m, n = W.shape
    s = scale.double()
    if s.shape == (L,):
        return W * s[:, None, None]
    if s.shape == (L, m):
        return W * s[:, :, None]
    s = s.repeat_interleave(block, 1)[:, :m].repeat_interleave(block, 2)[:, :, :n]
    return W * s


def _check(W, X, *, transpose=False, scale=None, split_k=None, rtol=RTOL, scale_block=SCALE_BLOCK):
    """Run sketch into a NaN-poisoned buffer and compare it entrywise against the fp64 product."""
    W, X = W.to(DEVICE), X.to(DEVICE)
    scale = None if scale is None else scale.to(DEVICE)
    Wd = _dequantized(W, scale, scale_block)
    if transpose:
        Wd = Wd.mT
    ref = Wd @ X.double()
    bound = Wd.abs() @ X.double().abs()  # each entry's rounding error is relative to sum |w x|, not to |sum w x|
    out = torch.full(ref.shape, float("nan"), dtype=torch.float32, device=W.device)
    got = sketch(W, X, transpose=transpose, scale=scale, scale_block=scale_block, out=out, split_k=split_k)
    assert got is out
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= rtol * bound + 1e-30).all(), (err / bound).max().item()
    assert (err.norm() <= rtol * ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("L,m,n,b", [(1, 70, 45, 5), (3, 33, 130, 20), (3, 17, 16, 1), (2, 40, 70, 45)])
def test_matches_fp64(dtype, transpose, L, m, n, b):
    W = (10 * torch.randn(L, m, n)).to(dtype)
    X = torch.randn(L, m if transpose else n, b) * torch.logspace(-20, 20, b)  # columns of very different sizes
    _check(W, X, transpose=transpose)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_split_parts_keep_fp32_accuracy(dtype, source):
    """X's three 16-bit parts (the split kernel, stacked as the sketch kernel reads them: part j of column
    ``b X_COLUMNS + c`` in row ``j X_COLUMNS + c`` of block b's BLOCK_M rows) times the column factors give X back
    within 2^-24 relative for bf16 parts (2^-23 from fp64, rounded to bf16 through fp32), within
    max(2^-33 |x|, 2^-38 max|x_col|) for fp16 parts (2^-25, half the fp16 subnormal spacing, against a column maximum
    >= 2^13), against fp64; padding is zero."""
    L, K, nb = 2, 300, X_COLUMNS + 7  # two column blocks, the second partial
    X = torch.randn(L, K, nb, dtype=torch.float64) * torch.logspace(-3, 0, K, dtype=torch.float64)[:, None]
    X = (X * torch.logspace(-30, 30, nb, dtype=torch.float64)).to(source).to(DEVICE)
    XP, column = _x_parts(X, 320, dtype)
    assert XP.shape == (L, 320, 2 * BLOCK_M) and XP.dtype == dtype and column.shape == (L, nb)
    blocks = XP.view(L, 320, 2, BLOCK_M)
    stacked = blocks[..., :3 * X_COLUMNS].unflatten(-1, (3, X_COLUMNS))  # [L, k, block, part, column]
    assert (XP[:, K:] == 0).all() and (blocks[..., 3 * X_COLUMNS:] == 0).all() and (stacked[:, :, 1, :, 7:] == 0).all()
    parts = stacked[:, :K].double().sum(dim=3).flatten(2)[..., :nb]  # [L, K, nb]
    back = parts * column[:, None, :].double()
    exact = X.double()
    error = (back - exact).abs()
    top = exact.abs().amax(dim=1, keepdim=True)
    assert ((parts.abs().amax(dim=1) >= 2.0**12) & (parts.abs().amax(dim=1) < 2.0**14)).all()  # scaled columns
    if dtype == torch.bfloat16:
        limit = (2.0**-24 if source == torch.float32 else 2.0**-23) * exact.abs()  # fp64: rounded through fp32
    else:
        limit = torch.maximum(2.0**-33 * exact.abs(), 2.0**-38 * top)
    assert (error <= limit).all(), (error / limit).max()
    assert not (error == 0).all() or source == torch.float32  # fp64 has bits beyond the three parts


def test_default_output_and_strided_inputs():
    """A transposed view of W and a non-contiguous X are read through their strides, not copied."""
    W = torch.randn(2, 40, 70, device=DEVICE).mT  # [2, 70, 40], column-major per layer
    X = torch.randn(2, 7, 40, device=DEVICE).mT  # [2, 40, 7]
    got = sketch(W, X)
    assert got.shape == (2, 70, 7) and got.dtype == torch.float32
    ref = W.double() @ X.double()
    assert ((got.double() - ref).norm() <= RTOL * ref.norm()).item()
    _check(W, torch.randn(2, 70, 3), transpose=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_scales(kind, transpose, dtype):
    L, m, n = 2, 150, 140  # 2×2 blocks of 128, the last ones partial
    W = (10 * torch.randn(L, m, n)).to(dtype)
    scale = {"tensor": lambda: torch.rand(L) + 0.5,
             "channel": lambda: torch.rand(L, m) + 0.5,
             "block": lambda: torch.rand(L, 2, 2) + 0.5}[kind]()
    _check(W, torch.randn(L, m if transpose else n, 6), transpose=transpose, scale=scale)


def test_block_side_arrives_with_the_scale():
    """The block scale's tile side is the caller's: 256-sided tiles read as such (one scale over 256×256), and a side
    the tiles do not divide, or a block scale without its side, is refused."""
    L, m, n = 2, 300, 270
    W = (10 * torch.randn(L, m, n)).to(torch.float8_e4m3fn)
    scale = torch.rand(L, 2, 2) + 0.5
    for transpose in (False, True):
        _check(W, torch.randn(L, m if transpose else n, 4), transpose=transpose, scale=scale, scale_block=256)
    with pytest.raises(ValueError, match="divide"):
        sketch(W, torch.randn(L, n, 4), scale=torch.rand(L, 10, 9), scale_block=32)
    with pytest.raises(ValueError, match="scale_block"):
        sketch(W, torch.randn(L, n, 4), scale=scale)


def test_rejects_bad_inputs():
    W = torch.randn(2, 8, 6)
    with pytest.raises(ValueError):
        sketch(W, torch.randn(2, 8, 3))  # W @ X needs X [2, 6, b]
    with pytest.raises(TypeError):
        sketch(W, torch.randn(2, 6, 3, dtype=torch.float16))
    with pytest.raises(TypeError):
        sketch(W.to(torch.int8), torch.randn(2, 6, 3))
    with pytest.raises(ValueError):
        sketch(W, torch.randn(2, 6, 3), out=torch.empty(2, 8, 4))
    with pytest.raises(ValueError):
        sketch(W, torch.randn(2, 6, 3), scale=torch.ones(2, 6))  # per channel is per row of W: [2, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_dtypes_gpu(dtype, transpose):
    W = (torch.randn(3, 300, 1030, device="cuda") * 10).to(dtype)
    _check(W, torch.randn(3, 300 if transpose else 1030, 20, device="cuda"), transpose=transpose)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", [None, "tensor", "channel", "block"])
def test_fp8_gpu(kind, transpose, dtype):
    L, m, n = 2, 300, 260
    W = (torch.randn(L, m, n, device="cuda") * 50).to(dtype)
    shapes = {"tensor": (L,), "channel": (L, m), "block": (L, 3, 3)}
    scale = None if kind is None else torch.rand(shapes[kind], device="cuda") + 0.5
    _check(W, torch.randn(L, m if transpose else n, 20, device="cuda"), transpose=transpose, scale=scale)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("split_k", [2, 3, 7, 1000])
def test_split_reduction_matches_fp64(split_k, transpose):
    """The reduction cut into parts (the last one partial; more parts asked than tiles) sums to the fp64
    product, also with 128×128 block scales (a part never straddles a scale block)."""
    L, m, n = 2, 150, 300
    W = torch.randn(L, m, n).to(torch.float16)
    X = torch.randn(L, m if transpose else n, 5)
    _check(W, X, transpose=transpose, split_k=split_k)
    _check(W, X, transpose=transpose, split_k=split_k, scale=torch.rand(L, 2, 3) + 0.5)


def test_split_count_fills_one_wave():
    """The most parts that keep the grid within one wave of CTAs (SMs × CTAs per SM), each part at least eight
    tiles deep; one part on the CPU (one slot) or when the grid alone fills the wave."""
    from lorafft.kernels.sketch import split_count

    assert split_count(64, 28672, 64, 1) == 1
    assert split_count(64, 28672, 64, 2 * 132) == 4  # 8192 rows of 128: 256 programs of 264
    assert split_count(224, 8192, 64, 2 * 132) == 1  # 28672 rows: one wave already
    assert split_count(64, 1024, 64, 2 * 132) == 2  # k/v W^T X: K = 1024 holds two parts of eight tiles
