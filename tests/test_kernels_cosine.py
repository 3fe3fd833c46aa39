"""The fused |cos| kernel against a torch fp64 reference, under the Triton interpreter on the CPU."""

import os

import pytest
import torch

# Without CUDA the kernels run under Triton's CPU interpreter; it must be switched on before triton is first
# imported in this process (a suite-wide conftest is the safer place if other test files import triton too).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed; the fused cosine kernel cannot run")

from lorafft.kernels.cosine import max_abs_cos_fused, similarity_tiles

from lorafft.linalg import max_abs_cos

EPS = (0.1, 0.3, 0.5, 0.9)


def _unit(L, d, n, dtype, gen):
    v = torch.randn(L, d, n, dtype=torch.float64, generator=gen)
    return (v / v.norm(dim=1, keepdim=True)).to(dtype=dtype, device=DEVICE)


def _poisoned(L, k, E, device=DEVICE):
    return (
        torch.full((L, k), float("nan"), dtype=torch.float32, device=device),
        torch.full((L, k), -1, dtype=torch.int64, device=device),
        torch.full((L, E), -1, dtype=torch.int64, device=device),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,d,s,k", [(1, 50, 37, 3), (3, 130, 70, 10), (2, 17, 5, 70)])
def test_matches_fp64_reference(dtype, L, d, s, k):
    gen = torch.Generator().manual_seed(1000 * L + d + s + k)
    X, Y = _unit(L, d, s, dtype, gen), _unit(L, d, k, dtype, gen)
    out = _poisoned(L, k, len(EPS))
    max_cos, argmax, counts = max_abs_cos_fused(X, Y, EPS, out=out)
    assert all(a is b for a, b in zip((max_cos, argmax, counts), out))

    cos = X.double().mT @ Y.double()  # the stored (rounded) inputs, exact products
    ref = max_abs_cos(cos, EPS)
    assert not max_cos.isnan().any() and (argmax >= 0).all() and (counts >= 0).all()
    torch.testing.assert_close(max_cos.double(), ref.max_cos, atol=1e-5, rtol=0)
    # argmax may differ only between near-ties; then the chosen vector must attain the max too.
    picked = cos.abs().gather(1, argmax.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, ref.max_cos, atol=1e-5, rtol=0)
    assert (argmax < s).all()
    torch.testing.assert_close(counts, (max_cos.unsqueeze(-1) < torch.tensor(EPS, device=DEVICE)).sum(-2))
    torch.testing.assert_close(counts, ref.counts)


def test_ties_take_smallest_index_across_tiles():
    # s = 100 spans two BLOCK_S=64 tiles; column j is matched exactly (|cos| = 1) by base vectors listed below.
    L, d, s, k = 1, 20, 100, 4
    X = torch.zeros(L, d, s)
    X[0, 0, [3, 7, 70]] = torch.tensor([1.0, -1.0, 1.0])  # y_0 = e_0: tie at 3, 7, 70 -> 3
    X[0, 1, [80, 90]] = torch.tensor([-1.0, 1.0])  # y_1 = e_1: tie only in the second tile -> 80
    X[0, 2, [5, 65]] = 1.0  # y_2 = e_2: tie across tiles -> 5
    Y = torch.zeros(L, d, k)
    Y[0, 0, 0] = Y[0, 1, 1] = Y[0, 2, 2] = 1.0
    Y[0, 19, 3] = 1.0  # y_3 = e_19: orthogonal to everything -> max 0 at index 0
    X, Y = X.to(DEVICE), Y.to(DEVICE)
    max_cos, argmax, counts = max_abs_cos_fused(X, Y, (0.5, 1.5), out=_poisoned(L, k, 2))
    assert max_cos.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    assert argmax.tolist() == [[3, 80, 5, 0]]
    assert counts.tolist() == [[1, 4]]


def test_similarity_tiles():
    gen = torch.Generator().manual_seed(7)
    L, d, s, k, n = 2, 40, 30, 25, 20
    X, Y = _unit(L, d, s, torch.float32, gen), _unit(L, d, k, torch.float32, gen)
    out = torch.full((L, n, n), float("nan"), device=DEVICE)
    got = similarity_tiles(X, Y, n, out=out)
    assert got is out
    torch.testing.assert_close(got.double(), (X[..., :n].double().mT @ Y[..., :n].double()).abs(), atol=1e-5, rtol=0)


def test_validation():
    X, Y = torch.zeros(1, 8, 4), torch.zeros(1, 8, 3)
    with pytest.raises(ValueError, match="agree"):
        max_abs_cos_fused(X, torch.zeros(1, 9, 3), EPS)
    with pytest.raises(TypeError, match="share a dtype"):
        max_abs_cos_fused(X, Y.half(), EPS)
    with pytest.raises(TypeError, match="fp32 or fp16"):
        max_abs_cos_fused(X.double(), Y.double(), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        max_abs_cos_fused(torch.zeros(1, 4, 8).mT, Y, EPS)
    with pytest.raises(ValueError, match="max_cos"):
        bad = (torch.empty(1, 4), torch.empty(1, 3, dtype=torch.long), torch.empty(1, 4, dtype=torch.long))
        max_abs_cos_fused(X, Y, EPS, out=bad)
    with pytest.raises(ValueError, match="n=5"):
        similarity_tiles(X, Y, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    L, d, s, k = 4, 1000, 300, 70
    X, Y = _unit(L, d, s, dtype, gen), _unit(L, d, k, dtype, gen)
    max_cos, argmax, _ = max_abs_cos_fused(X, Y, EPS, out=_poisoned(L, k, len(EPS)))
    cos = X.double().mT @ Y.double()
    ref = max_abs_cos(cos, EPS)
    torch.testing.assert_close(max_cos.double(), ref.max_cos, atol=1e-5, rtol=0)
    picked = cos.abs().gather(1, argmax.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, ref.max_cos, atol=1e-5, rtol=0)
