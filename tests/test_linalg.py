"""Unit tests of the batched linear-algebra primitives in ``lorafft.linalg`` against an fp64 LAPACK oracle.

The oracle is ``torch.linalg.svd(W.double(), full_matrices=False)`` of the very matrix handed to the code under
test (fp32 inputs are exact in fp64). Singular vectors are compared up to sign, cosines in absolute value.
Inputs have realistic spectra: slowly decaying (like real LLM weights) with a tail of small singular values
down to 1e-3·σ1, which is where Gram-based bases lose accuracy, or ``lorafft.synthetic.random_weight``.
"""

import math

import pytest
import torch

from lorafft import linalg, synthetic
from lorafft.scales import Scale

SIDES = ("left", "right")

# --------------------------------------------------------------------------------------------------- helpers
def spectrum(s: int) -> torch.Tensor:
    """[s] fp64, σ1 = 1, descending: a slow power-law head (1+i)^-0.3 and, for the last min(10, s//4) values,
    a tail 1e-3·(1 + 1.5 j): small singular values (Gram squares their condition) that stay 1.5e-3·σ1 apart."""
    tail = min(10, s // 4)
    head = (1.0 + torch.arange(s - tail, dtype=torch.float64)) ** -0.3
    low = 1e-3 * (1.0 + 1.5 * torch.arange(tail - 1, -1, -1, dtype=torch.float64))
    return torch.cat([head, low])


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def spectral_weight(m: int, n: int, g: torch.Generator, L: int | None = None, sigma1: float = 3.0) -> torch.Tensor:
    """fp32 ``U diag(sigma1·spectrum) V^T`` with random singular vectors; [m, n], or [L, m, n] when L is given."""
    if L is not None:
        return torch.stack([spectral_weight(m, n, g, sigma1=sigma1) for _ in range(L)])
    s = min(m, n)
    return ((orthonormal(m, s, g) * (sigma1 * spectrum(s))) @ orthonormal(n, s, g).T).float()


def make_weight(kind: str, m: int, n: int, g: torch.Generator, L: int) -> torch.Tensor:
    if kind == "spectral":
        return spectral_weight(m, n, g, L)
    return torch.stack([synthetic.random_weight(m, n, generator=g) for _ in range(L)])


def oracle(W: torch.Tensor):
    """fp64 reduced SVD of a stack: U [L, m, s], S [L, s], V [L, n, s]."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U, S, Vh.mT


def side_vectors(U, V, side):
    return U if side == "left" else V


def sign_aligned_distance(X: torch.Tensor, X_ref: torch.Tensor) -> torch.Tensor:
    """Column-wise ``min_sign ||x - sign·x_ref||`` for [L, d, k] stacks -> [L, k]."""
    sign = torch.sign((X * X_ref).sum(dim=-2, keepdim=True))
    sign[sign == 0] = 1
    return (X - sign * X_ref).norm(dim=-2)


def unit_columns(L, d, k, g):
    Y = torch.randn(L, d, k, generator=g, dtype=torch.float64)
    return Y / Y.norm(dim=-2, keepdim=True)


# (m, n, L): square, tall, wide; s = min(m, n) above 256 in some (the Gram is built in row blocks of
# max(256, s/8) rows, so s > 256 exercises the blocked path), stacks L > 1, and tiny ones (s = 2, 3).
BASIS_CASES = [(96, 96, 1), (200, 72, 3), (72, 200, 1), (320, 300, 1), (300, 512, 2), (512, 300, 1), (7, 3, 2),
               (3, 7, 1), (2, 9, 1)]


def basis_input(m, n, L, seed):
    return spectral_weight(m, n, torch.Generator().manual_seed(seed), L)


# --------------------------------------------------------------------------------------------------- base_basis
@pytest.mark.parametrize("m,n,L", BASIS_CASES)
def test_base_basis_sigma_matches_svdvals(m, n, L):
    W = basis_input(m, n, L, seed=m * 1000 + n + L)
    basis = linalg.base_basis(W)
    S = torch.linalg.svdvals(W.double())
    assert basis.sigma.shape == (L, min(m, n))
    assert basis.sigma.dtype == torch.float64
    assert torch.all(basis.sigma[:, :-1] >= basis.sigma[:, 1:]), "sigma must be descending"
    torch.testing.assert_close(basis.sigma, S, rtol=0, atol=1e-10 * S[:, :1].max().item())


@pytest.mark.parametrize("m,n,L", BASIS_CASES)
@pytest.mark.parametrize("side", SIDES)
def test_project_matches_fp64_cosines(m, n, L, side):
    """``project(Y, side)`` = X^T Y over every base singular vector X of that side, row i = i-th largest."""
    g = torch.Generator().manual_seed(7 * m + 13 * n + L)
    W = basis_input(m, n, L, seed=m * 1000 + n + L)
    U, S, V = oracle(W)
    X = side_vectors(U, V, side)
    d = X.shape[-2]
    basis = linalg.base_basis(W)

    # random unit vectors (cosines spread over every row) ...
    Y = unit_columns(L, d, 6, g)
    C = basis.project(Y, side)
    assert C.shape == (L, min(m, n), 6)
    assert C.dtype == torch.float64
    torch.testing.assert_close(C.abs(), (X.mT @ Y).abs(), rtol=0, atol=1e-9)

    # ... and the base vectors themselves: |X^T x_j| = e_j, including the smallest singular values' vectors
    C_self = basis.project(X, side)
    eye = torch.eye(min(m, n), dtype=torch.float64).expand(L, -1, -1)
    torch.testing.assert_close(C_self.abs(), eye, rtol=0, atol=1e-8)


@pytest.mark.parametrize("m,n", [(1, 5), (5, 1)])
def test_base_basis_of_a_single_row_or_column(m, n):
    """min(m, n) = 1 (a one-output head, a [out, 1] weight): one singular triplet, sigma = the norm."""
    W = torch.randn(2, m, n, generator=torch.Generator().manual_seed(17))
    basis = linalg.base_basis(W)
    torch.testing.assert_close(basis.sigma, W.double().flatten(1).norm(dim=1, keepdim=True), rtol=1e-12, atol=0)
    U, S, V = oracle(W)
    for side in SIDES:
        X = side_vectors(U, V, side)
        assert sign_aligned_distance(basis.top_vectors(side, 1), X).max() < 1e-12
        Y = unit_columns(2, X.shape[-2], 3, torch.Generator().manual_seed(18))
        torch.testing.assert_close(basis.project(Y, side).abs(), (X.mT @ Y).abs(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", SIDES)
def test_project_keeps_fp32_dtype(side):
    g = torch.Generator().manual_seed(3)
    W = spectral_weight(64, 48, g, 2)
    U, S, V = oracle(W)
    X = side_vectors(U, V, side)
    Y = unit_columns(2, X.shape[-2], 4, g)
    C = linalg.base_basis(W).project(Y.float(), side)
    assert C.dtype == torch.float32
    torch.testing.assert_close(C.abs().double(), (X.mT @ Y).abs(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("m,n,L", BASIS_CASES)
@pytest.mark.parametrize("side", SIDES)
def test_top_vectors_orthonormal_and_equal_to_svd(m, n, L, side):
    W = basis_input(m, n, L, seed=m + 31 * n)
    U, S, V = oracle(W)
    s = min(m, n)
    basis = linalg.base_basis(W)
    for count in sorted({1, min(12, s), s, s + 5}):  # count > s clamps to s
        X = basis.top_vectors(side, count)
        c = min(count, s)
        d = m if side == "left" else n
        assert X.shape == (L, d, c)
        assert X.dtype == torch.float64
        torch.testing.assert_close(X.mT @ X, torch.eye(c, dtype=torch.float64).expand(L, -1, -1), rtol=0, atol=1e-9)
        dist = sign_aligned_distance(X, side_vectors(U, V, side)[..., :c])
        assert dist.max().item() < 1e-8, dist.max().item()


def test_base_basis_accepts_bf16_and_fp32_inputs():
    """The basis is of the matrix as given (bf16 values are exact in fp64)."""
    g = torch.Generator().manual_seed(5)
    W = spectral_weight(80, 120, g, 1).bfloat16()
    basis = linalg.base_basis(W)
    U, S, V = oracle(W)
    torch.testing.assert_close(basis.sigma, S, rtol=0, atol=1e-10)
    assert sign_aligned_distance(basis.top_vectors("right", 10), V[..., :10]).max() < 1e-8


# --------------------------------------------------------------------------------------------------- truncated_svd
def check_truncated(result, W, k, *, rel=1e-6):
    """Orthonormal U and V, a reported residual no smaller than the real one, an honest error bound (checked
    first: it must hold even where the answer is inaccurate), and S vs fp64 svdvals (rel)."""
    L, m, n = W.shape
    U, S, V = oracle(W)
    assert result.U.shape == (L, m, k) and result.V.shape == (L, n, k) and result.S.shape == (L, k)
    assert result.residual.shape == (L, k) and result.error_bound.shape == (L, k)
    eye = torch.eye(k, dtype=torch.float64).expand(L, -1, -1)
    torch.testing.assert_close(result.U.mT @ result.U, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(result.V.mT @ result.V, eye, rtol=0, atol=1e-8)
    # the residual it reports is (at least) the real one, up to the rounding of the fp32 product
    true_residual = (W.double() @ result.V - result.U * result.S.unsqueeze(1)).norm(dim=1)
    scale = S[:, :1] * 1e-6
    assert torch.all(true_residual <= result.residual + scale), (true_residual, result.residual)
    # honesty: the distance to the exact (sign-aligned) vectors never exceeds the reported bound
    finite = torch.isfinite(result.error_bound)
    for X, X_ref in ((result.U, U[..., :k]), (result.V, V[..., :k])):
        err = sign_aligned_distance(X, X_ref)
        bad = finite & (err > result.error_bound + 1e-6)
        assert not bad.any(), f"error {err[bad].tolist()} exceeds bound {result.error_bound[bad].tolist()}"
    rel_err = ((result.S - S[:, :k]).abs() / S[:, :k]).max().item()
    assert rel_err <= rel, f"singular values off by {rel_err:.2e} relative (iterations={result.iterations})"
    return S


TSVD_CASES = [
    # (kind, m, n, L, k): dense fallback (small) and Krylov (3·block < min(m, n)) paths, all three shapes
    ("spectral", 60, 50, 2, 45),
    ("spectral", 50, 60, 1, 50),
    ("spectral", 120, 80, 1, 10),
    ("spectral", 384, 384, 2, 10),
    ("spectral", 512, 200, 1, 10),
    ("spectral", 200, 512, 3, 10),
    ("spectral", 512, 256, 1, 30),
    ("synthetic", 384, 384, 1, 10),
    ("synthetic", 512, 256, 2, 10),
    ("synthetic", 256, 512, 1, 10),
    ("synthetic", 512, 256, 1, 30),
    ("synthetic", 256, 512, 1, 30),
]


@pytest.mark.parametrize("kind,m,n,L,k", TSVD_CASES)
def test_truncated_svd_matches_fp64(kind, m, n, L, k):
    g = torch.Generator().manual_seed(m + n + k + L)
    W = make_weight(kind, m, n, g, L)
    result = linalg.truncated_svd(W, k, generator=torch.Generator().manual_seed(1))
    check_truncated(result, W, k)
    if 3 * max(2 * k, k + 10) >= min(m, n):
        assert result.iterations == 0  # small: dense fp64 SVD (Krylov may also fall back to it when its space fills up)


def test_cholesky_orthonormalize_spans_what_householder_spans():
    """Cholesky QR of a projected block: orthonormal and orthogonal to the basis to ORTHONORMAL_DEFECT, the same
    span as Householder QR gives; a block whose columns are dependent after the projection is flagged."""
    g = torch.Generator().manual_seed(21)
    basis = torch.linalg.qr(torch.randn(2, 300, 40, generator=g, dtype=torch.float64)).Q
    block = torch.randn(2, 300, 20, generator=g, dtype=torch.float64)
    block[0, :, :10] = basis[0, :, :10] + 1e-6 * block[0, :, :10]  # mostly in the basis already
    mine, orthonormal = linalg.cholesky_orthonormalize(block, basis)
    theirs = linalg.orthonormalize(block, basis)
    assert orthonormal.tolist() == [True, True]
    eye = torch.eye(20, dtype=torch.float64)
    assert (mine.mT @ mine - eye).abs().max() <= linalg.ORTHONORMAL_DEFECT
    assert (basis.mT @ mine).abs().max() <= linalg.ORTHONORMAL_DEFECT
    torch.testing.assert_close(mine @ mine.mT, theirs @ theirs.mT, rtol=0, atol=1e-9)
    block[1, :, 5] = block[1, :, 4]  # dependent columns: no orthonormal basis of 20 columns spans them
    failed, orthonormal = linalg.cholesky_orthonormalize(block, basis)
    assert orthonormal.tolist() == [True, False]
    assert torch.isfinite(failed).all()  # the Krylov step's eigh runs on it before the flag is read
    torch.linalg.eigh(failed.mT @ failed)


@pytest.mark.usefixtures("krylov_path")
def test_krylov_redoes_a_block_whose_cholesky_qr_failed(monkeypatch):
    """A Krylov block whose Cholesky QR lost orthogonality is rebuilt by Householder QR with its products taken
    again: the answer is still fp64's, in as many iterations as without the failure."""
    g = torch.Generator().manual_seed(22)
    W = make_weight("spectral", 512, 256, g, 1)
    clean = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(1))
    cholesky, failures = linalg.cholesky_orthonormalize, []

    def failing_once(block, basis):
        result, orthonormal = cholesky(block, basis)
        if not failures:
            failures.append(True)
            return result + 1e-3 * torch.randn(result.shape, generator=g, dtype=torch.float64), ~orthonormal
        return result, orthonormal

    monkeypatch.setattr(linalg, "cholesky_orthonormalize", failing_once)
    result = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(1))
    assert failures and result.iterations == clean.iterations > 1
    check_truncated(result, W, 10)


@pytest.mark.parametrize("m,n,L,r", [(384, 300, 3, 4), (256, 512, 1, 16), (60, 50, 2, 2)])
def test_truncated_svd_of_a_factored_low_rank_update_matches_fp64(m, n, L, r):
    """W + s·B·A kept factored (one s per matrix; Krylov and dense paths) is certified like the formed sum."""
    g = torch.Generator().manual_seed(m + n + r)
    W = spectral_weight(m, n, g, L)
    B, A = torch.randn(L, m, r, generator=g), torch.randn(L, r, n, generator=g) / math.sqrt(n)
    scale = torch.tensor([0.5, 2.0, 1.0][:L], dtype=torch.float64)
    low_rank = linalg.LowRank(B=B, A=A, scale=scale)
    result = linalg.truncated_svd(W, 10, low_rank=low_rank, generator=torch.Generator().manual_seed(0))
    check_truncated(result, W.double() + scale[:, None, None] * (B.double() @ A.double()), 10)


@pytest.mark.parametrize("m,n", [(300, 520), (520, 300)])
def test_dense_top_k_adds_a_low_rank_update_to_the_base_gram(m, n):
    """The dense path with the base's Gram matrix (``BaseBasis.gram``, kept by ``base_basis`` for small sides;
    s = 300 spans two of its column blocks) plus a LoRA update's low-rank terms, on both orientations: the same
    top-k as fp64 LAPACK on the formed sum, certified, and the Gram equal to the base's own."""
    g = torch.Generator().manual_seed(m)
    W0 = spectral_weight(m, n, g, 2)
    B, A = torch.randn(2, m, 8, generator=g) / 10, torch.randn(2, 8, n, generator=g) / math.sqrt(n)
    low_rank = linalg.LowRank(B=B, A=A, scale=torch.tensor([2.0, 0.5], dtype=torch.float64))
    basis = linalg.base_basis(W0)
    small = W0.double() if m <= n else W0.double().mT
    torch.testing.assert_close(basis.gram, small @ small.mT, rtol=1e-13, atol=1e-13)
    result = linalg.truncated_svd(W0, 10, low_rank=low_rank, base_gram=basis.gram)
    assert result.iterations == 0
    check_truncated(result, W0.double() + low_rank.dense(), 10, rel=1e-12)
    assert torch.all(result.error_bound < 1e-9)


def test_truncated_svd_k_clamped_to_min_dimension():
    g = torch.Generator().manual_seed(2)
    W = spectral_weight(30, 20, g, 1)
    result = linalg.truncated_svd(W, 25)
    assert result.S.shape == (1, 20)
    check_truncated(result, W, 20)


@pytest.mark.usefixtures("krylov_path")
@pytest.mark.parametrize("m,n", [(400, 300), (300, 400)])
def test_truncated_svd_adversarial_start(m, n):
    """A start block orthogonal to the top vectors (the bottom left singular vectors) must not stop the
    iteration early or steer it to a wrong answer: the random part of the first block still finds the top."""
    k = 10
    g = torch.Generator().manual_seed(11)
    W = spectral_weight(m, n, g, 2)
    U, S, V = oracle(W)
    bad = U[..., -(2 * k):]  # orthogonal to the top-k (and top s-2k) left singular vectors
    result = linalg.truncated_svd(W, k, start=bad, generator=torch.Generator().manual_seed(0))
    assert result.iterations > 0
    check_truncated(result, W, k)
    # also a start block with duplicated (rank-deficient) columns and a zero column
    dup = torch.cat([bad[..., :3], bad[..., :3], torch.zeros(2, m, 1, dtype=torch.float64)], dim=-1)
    check_truncated(linalg.truncated_svd(W, k, start=dup, generator=torch.Generator().manual_seed(0)), W, k)


@pytest.mark.usefixtures("krylov_path")
def test_truncated_svd_good_start_converges_fast():
    k = 10
    g = torch.Generator().manual_seed(12)
    W = spectral_weight(400, 300, g, 1)
    U, S, V = oracle(W)
    cold = linalg.truncated_svd(W, k, generator=torch.Generator().manual_seed(0))
    warm = linalg.truncated_svd(W, k, start=U[..., : 2 * k], generator=torch.Generator().manual_seed(0))
    check_truncated(warm, W, k)
    assert 0 < warm.iterations <= cold.iterations


def test_truncated_svd_fp64_input():
    g = torch.Generator().manual_seed(13)
    W = spectral_weight(300, 400, g, 1).double()
    result = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(0))
    check_truncated(result, W, 10, rel=1e-10)
    U, S, V = oracle(W)
    gap = torch.minimum(S[:, :10] - S[:, 1:11], torch.cat([S[:, :1] * math.inf, S[:, :9] - S[:, 1:10]], -1))
    well = gap > 1e-2 * S[:, :1]
    assert torch.all(result.error_bound[well] <= 1e-5)  # the default tol is reachable in fp64


def test_truncated_svd_of_half_weights_with_torch_multiplies_in_fp32():
    """fp16 weights are exact in fp32: the torch backend must not multiply in fp16 (its products would be off by
    ~1e-3), so the result is the fp32 matrix's, certified against the fp64 oracle."""
    g = torch.Generator().manual_seed(15)
    W = spectral_weight(300, 400, g, 2).half()
    half = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(0), backend="torch")
    single = linalg.truncated_svd(W.float(), 10, generator=torch.Generator().manual_seed(0), backend="torch")
    check_truncated(half, W.float(), 10)
    assert torch.equal(half.S, single.S) and torch.equal(half.U, single.U)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_truncated_svd_ignores_a_tf32_matmul_setting(device):
    """A caller's ``set_float32_matmul_precision("high")`` (TF32 on CUDA) must not reach the certified products, and
    is the setting again afterwards."""
    g = torch.Generator().manual_seed(16)
    W = spectral_weight(300, 400, g, 1)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        result = linalg.truncated_svd(W.to(device), 10, generator=torch.Generator().manual_seed(0), backend="torch")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    on_cpu = linalg.TruncatedSVD(**{name: value.cpu() if torch.is_tensor(value) else value
                                    for name, value in vars(result).items()})
    check_truncated(on_cpu, W, 10)


def test_truncated_svd_reproducible_with_generator():
    g = torch.Generator().manual_seed(14)
    W = spectral_weight(300, 300, g, 1)
    a = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(5))
    b = linalg.truncated_svd(W, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.S, b.S) and torch.equal(a.U, b.U) and a.iterations == b.iterations


@pytest.mark.parametrize("m,n", [(40, 30), (400, 300)])
def test_truncated_svd_repeated_singular_value_is_not_certified(m, n):
    """σ3 = σ4 exactly: the vectors are not determined by the matrix, so the bound must not claim they are."""
    g = torch.Generator().manual_seed(15)
    s = min(m, n)
    sv = 3.0 * spectrum(s)
    sv[3] = sv[2]
    W = ((orthonormal(m, s, g) * sv) @ orthonormal(n, s, g).T).unsqueeze(0)  # fp64: keep the tie exact
    result = linalg.truncated_svd(W, 8, generator=torch.Generator().manual_seed(0))
    U, S, V = oracle(W)
    torch.testing.assert_close(result.S, S[:, :8], rtol=1e-10, atol=0)
    # any vector in the 2-D singular subspace is a valid answer: the bound for those two must be >= sqrt(2)
    assert torch.all(result.error_bound[0, 2:4] >= math.sqrt(2.0) - 1e-9)
    assert torch.all(torch.isfinite(result.error_bound[0, :2]))
    # their span is still right
    P = result.U[0, :, 2:4]
    P_ref = U[0, :, 2:4]
    torch.testing.assert_close(P @ P.T, P_ref @ P_ref.T, rtol=0, atol=1e-8)


def test_error_bound_holds_when_the_space_holds_a_direction_outside_the_range():
    """A Krylov space that has exhausted W's range holds a direction u outside it: its Ritz value is ~0, and its
    residual ``||W W^T u|| / theta`` divides the products' rounding (fp32 weights: ~1e-7 σ_1²) by that ~0, far above
    every gap. That residual must not make the top vectors' bounds infinite (it did, by a rounding's chance, for a
    448×160 fp32 matrix): the singular value that Ritz pair vouches for lies within ``sqrt(rho theta)`` of it. The
    bounds must still hold against fp64's SVD."""
    g = torch.Generator().manual_seed(16)
    m, n, rank = 60, 40, 12
    basis = orthonormal(m, rank + 1, g)
    W = ((basis[:, :rank] * (3.0 * spectrum(rank))) @ orthonormal(n, rank, g).T).unsqueeze(0)
    Q = torch.cat([basis[:, :rank] @ orthonormal(rank, rank, g), basis[:, rank:]], -1).unsqueeze(0)  # range, outside
    rows = Q.mT @ W + 1e-7 * 3.0 * torch.randn(1, rank + 1, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    image = W @ rows.mT + 1e-7 * 9.0 * torch.randn(1, m, rank + 1, generator=g, dtype=torch.float64) / math.sqrt(m)
    ritz = linalg._Ritz.of(Q, rows, image)  # the products as fp32 weights give them, rounding included
    assert ritz.theta[0, -1] < 1e-6 and ritz.residual[0, -1] > 3.0  # the direction outside, as described
    top = ritz.top(6, 1, "krylov")
    assert torch.isfinite(top.error_bound).all() and torch.all(top.error_bound < 1e-5)
    U, S, _ = oracle(W)
    aligned = (top.U * torch.sign((top.U * U[..., :6]).sum(dim=1, keepdim=True)) - U[..., :6]).norm(dim=1)
    assert torch.all(aligned <= top.error_bound), (aligned, top.error_bound)
    assert torch.all((top.S - S[:, :6]).abs() <= top.residual)


# --------------------------------------------------------------------------------------------------- max_abs_cos
def test_max_abs_cos_hand_made():
    cos = torch.tensor(
        [
            [[0.1, -0.9, 0.3], [0.6, 0.2, -0.3], [-0.7, 0.1, 0.29]],  # columns: max 0.7 @2, 0.9 @0, 0.3 @0/2
            [[0.0, 0.5, 0.0], [0.49, -0.49, 0.0], [0.0, 0.0, -1.0]],
        ]
    )
    match = linalg.max_abs_cos(cos, (0.5, 0.8, 0.95))
    torch.testing.assert_close(match.max_cos, torch.tensor([[0.7, 0.9, 0.3], [0.49, 0.5, 1.0]]))
    assert match.argmax.tolist() == [[2, 0, 0], [1, 0, 2]]
    # strictly below ε counts; 0.5 is not below 0.5
    assert match.counts.tolist() == [[1, 2, 3], [1, 2, 2]]
    assert match.counts.shape == (2, 3)


def test_max_abs_cos_random_against_reference():
    g = torch.Generator().manual_seed(16)
    cos = torch.randn(3, 40, 7, generator=g, dtype=torch.float64) / 4
    eps = (0.3, 0.5, 0.7)
    match = linalg.max_abs_cos(cos, eps)
    for l in range(3):
        for j in range(7):
            col = [abs(x) for x in cos[l, :, j].tolist()]
            best = max(col)
            assert match.max_cos[l, j].item() == best
            assert match.argmax[l, j].item() == col.index(best)
        for e, t in enumerate(eps):
            assert match.counts[l, e].item() == sum(match.max_cos[l, j].item() < t for j in range(7))


def test_max_abs_cos_accepts_any_iterable_of_eps():
    cos = torch.tensor([[[0.2], [0.1]]])
    assert linalg.max_abs_cos(cos, [0.5]).counts.tolist() == [[1]]
    assert linalg.max_abs_cos(cos, torch.tensor([0.1, 0.3])).counts.tolist() == [[0, 1]]


# --------------------------------------------------------------------------------------------------- match
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n", [(60, 90), (90, 60)])
def test_match_against_fp64_svd(backend, side, m, n):
    """``linalg.match`` (the fp32 explicit-basis product on the Triton path's small side, fp64 projection
    otherwise) against max |cos| over the fp64 SVD's vectors of the same side."""
    g = torch.Generator().manual_seed(m + 3 * n)
    W = spectral_weight(m, n, g, L=2)
    basis = linalg.base_basis(W)
    U, _, V = oracle(W)
    reference_basis = side_vectors(U, V, side)
    vectors = unit_columns(2, reference_basis.shape[1], 6, g)
    result = linalg.match(basis, vectors, side, (0.2, 0.5), backend)
    reference = (reference_basis.mT @ vectors).abs()
    torch.testing.assert_close(result.max_cos.double(), reference.amax(dim=-2), atol=1e-5, rtol=0)
    picked = reference.gather(1, result.argmax.unsqueeze(1)).squeeze(1)  # argmax may differ only at near-ties
    torch.testing.assert_close(picked, reference.amax(dim=-2), atol=1e-5, rtol=0)
    assert result.counts.tolist() == (result.max_cos.unsqueeze(-1) < torch.tensor([0.2, 0.5])).sum(-2).tolist()
    if backend == "triton" and side == basis.small_side:
        assert basis.small_basis_fp32 is basis.small_basis_fp32  # formed once per basis


def test_match_ties_take_the_smallest_index_and_nan_is_an_error():
    s = 300  # more rows than one reduction tile of any torch kernel
    Z = torch.zeros(1, s, s, dtype=torch.float64)
    Z[0, 0, [3, 7, 170]] = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # y_0 = e_0: exact ties at 3, 7 and 170
    Z[0, 1, [280, 290]] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    basis = linalg.BaseBasis(W0=torch.zeros(1, s, s), sigma=torch.ones(1, s, dtype=torch.float64), Z=Z,
                             kind="explicit64")
    vectors = torch.zeros(1, s, 3, dtype=torch.float64)
    vectors[0, 0, 0] = vectors[0, 1, 1] = vectors[0, 299, 2] = 1.0
    for backend in ("torch", "triton"):
        result = linalg.match(basis, vectors, "left", (0.5,), backend)
        assert result.max_cos.tolist() == [[1.0, 1.0, 0.0]] and result.argmax.tolist() == [[3, 280, 0]]
        with pytest.raises(ValueError, match="NaN"):
            linalg.match(basis, vectors * float("nan"), "left", (0.5,), backend)


# --------------------------------------------------------------------------------------------------- dispatch
def test_fp64_goes_to_torch_on_any_device(monkeypatch):
    monkeypatch.setenv("LORAFFT_BACKEND", "triton")
    for device in ("cpu", "cuda"):
        assert linalg.resolve_backend(torch.device(device), dtype=torch.float64) == "torch"
        assert linalg.resolve_backend(torch.device(device), "triton", torch.float64) == "torch"
        assert linalg.resolve_backend(torch.device(device), dtype=torch.float32) == "triton"


def test_fp64_weights_match_in_fp64_whatever_the_backend():
    g = torch.Generator().manual_seed(5)
    W = spectral_weight(60, 90, g, L=1).double()
    basis = linalg.base_basis(W)
    vectors = unit_columns(1, 60, 4, g)
    mine = linalg.match(basis, vectors, "left", (0.5,), "triton")
    theirs = linalg.match(basis, vectors, "left", (0.5,), "torch")
    assert mine.max_cos.dtype == torch.float64 and torch.equal(mine.max_cos, theirs.max_cos)


def test_random_block_is_the_cpu_generator_draw_on_the_cpu():
    """On the CPU the start block is exactly ``torch.randn(..., generator)`` (reports stay byte-identical)."""
    a = linalg._random_block((2, 30, 5), torch.Generator().manual_seed(4), torch.device("cpu"))
    b = torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_random_block_on_the_device_reproducible():
    device = torch.device("cuda")
    a = linalg._random_block((2, 30, 5), torch.Generator().manual_seed(4), device)
    b = linalg._random_block((2, 30, 5), torch.Generator().manual_seed(4), device)
    assert a.device.type == "cuda" and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.usefixtures("krylov_path")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_krylov_synchronises_twice_per_iteration(backend):
    """CUDA host synchronisations of truncated_svd, counted by torch's sync debug mode: at most two per iteration
    (eigh's error check, the stopping decision) plus a constant, also with a CPU-held LoRA factor and scale."""
    import warnings

    g = torch.Generator().manual_seed(0)
    W = spectral_weight(600, 500, g).cuda()[None]
    low_rank = linalg.LowRank(B=torch.randn(1, 600, 4), A=torch.randn(1, 4, 500) / 30, scale=torch.tensor([2.0]))
    linalg.truncated_svd(W, 10, generator=g, backend=backend, low_rank=low_rank)  # warm-up (kernel compilation)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = linalg.truncated_svd(W, 10, generator=g, backend=backend, low_rank=low_rank)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert result.iterations > 0  # the Krylov path, not the dense fallback
    assert syncs <= 2 * result.iterations + 4, (syncs, result.iterations)


@pytest.mark.gpu
def test_analyze_takes_cupy_arrays():
    """CuPy arrays reach analyze through DLPack, on their device, without a copy, and give the torch tensors'
    answer."""
    cupy = pytest.importorskip("cupy")
    import lorafft

    g = torch.Generator().manual_seed(3)
    W0, Wt = spectral_weight(300, 200, g), spectral_weight(300, 200, g)
    mine = lorafft.analyze(cupy.asarray(W0.numpy()), cupy.asarray(Wt.numpy()), k=5,
                           generator=torch.Generator().manual_seed(0))["left"]
    theirs = lorafft.analyze(W0.cuda(), Wt.cuda(), k=5, generator=torch.Generator().manual_seed(0))["left"]
    assert mine.max_cos.device.type == "cuda"
    assert torch.equal(mine.max_cos, theirs.max_cos) and torch.equal(mine.counts, theirs.counts)


@pytest.mark.usefixtures("krylov_path")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_truncated_svd_of_fp8_weights_with_their_scale(kind, backend):
    """fp8 weights as stored plus their scale (read by the kernel as they are, dequantised once by torch) give the
    certified top-k of the dequantised matrix, against fp64 LAPACK."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(11)
    L, m, n = 2, 300, 260
    W8 = (spectral_weight(m, n, g, L=L) * 100).to(torch.float8_e4m3fn)
    scale = {"tensor": torch.rand(L, generator=g), "channel": torch.rand(L, m, generator=g),
             "block": torch.rand(L, 3, 3, generator=g)}[kind] + 0.5
    if kind == "tensor":
        expanded = scale[:, None, None].expand(L, m, n)
    elif kind == "channel":
        expanded = scale[:, :, None].expand(L, m, n)
    else:
        expanded = torch.stack([torch.kron(s, torch.ones(128, 128))[:m, :n] for s in scale])
    reference = W8.double() * expanded.double()
    result = linalg.truncated_svd(W8, 10, scale=Scale(scale, 128), generator=torch.Generator().manual_seed(0),
                                  backend=backend)
    assert result.iterations > 0
    check_truncated(result, reference, 10, rel=1e-5)

def test_dense_rule_paths_agree_with_fp64(monkeypatch):
    """Both sides of ``linalg.dense_is_cheaper`` (forced by moving ``DENSE_SVD_MAX``) give the fp64 SVD's top-k of
    one 200×160 stack plus a LoRA update: singular values, and vectors within the reported bounds."""
    g = torch.Generator().manual_seed(160)
    W0 = spectral_weight(200, 160, g, 2)
    B = torch.randn(2, 200, 4, generator=g, dtype=torch.float64)
    A = torch.randn(2, 4, 160, generator=g, dtype=torch.float64)
    update = linalg.LowRank(B=B, A=A, scale=torch.full((2,), 0.5))
    Ut, St, Vt = oracle(W0.double() + update.dense())
    for limit, dense in ((0, False), (160, True)):
        monkeypatch.setattr(linalg, "DENSE_SVD_MAX", limit)
        assert linalg.dense_is_cheaper(200, 160) is dense
        result = linalg.truncated_svd(W0, 10, low_rank=update, generator=torch.Generator().manual_seed(0))
        assert (result.iterations == 0) is dense
        torch.testing.assert_close(result.S, St[:, :10], rtol=1e-6, atol=0)  # Krylov: fp32 products with W0
        for vectors, reference in ((result.U, Ut), (result.V, Vt)):
            assert torch.all(sign_aligned_distance(vectors, reference[..., :10]) <= result.error_bound.clamp_min(1e-9))


def test_dense_top_k_rank_below_k():
    """The dense path on tuned matrices of rank 3 < k (the Gram cannot give the vectors of zero singular values, so a
    full SVD does): top-3 singular values and vectors equal fp64's, orthonormal vectors, and no count from a zero."""
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(2, *shape, generator=g, dtype=torch.float64) for shape in ((90, 3), (3, 60))]
    W = factors[0] @ factors[1]
    U, S, V = oracle(W)
    result = linalg.truncated_svd(W, 10)
    assert result.iterations == 0
    torch.testing.assert_close(result.S[:, :3], S[:, :3], rtol=1e-12, atol=0)
    assert torch.all(sign_aligned_distance(result.U[..., :3], U[..., :3]) < 1e-10)
    torch.testing.assert_close(result.U.mT @ result.U, torch.eye(10, dtype=torch.float64).expand(2, 10, 10),
                               atol=1e-12, rtol=0)
