"""LoRA updates analysed in the base's coordinates (lorafft.updating; lorafft.analysis.tuned_top's update path, what a
scan of an adapter and a Tracker do at every size): against fp64 LAPACK SVDs and eigenvalues of the formed tuned
matrices, through every form of base basis, certified on the matrix itself."""

import dataclasses

import pytest
import torch

from lorafft import analysis, linalg, updating

K = 10


def explicit_basis(W0, dtype=torch.float64):
    """The base basis with its small side explicit: fp64 (a tracker's small matrices) or fp32 (a base cache's)."""
    basis = linalg.base_basis(W0)
    Z = basis.top_vectors(basis.small_side, basis.sigma.shape[-1]).to(dtype)
    return dataclasses.replace(basis, Z=Z, kind="explicit64" if dtype == torch.float64 else "explicit32",
                               reflectors=None, tau=None)


def bases(W0):
    """Every form a base basis takes: Householder fp64 (a scan on the CPU), explicit fp64, explicit fp32 (a cache)."""
    return {"householder": linalg.base_basis(W0), "explicit64": explicit_basis(W0),
            "explicit32": explicit_basis(W0, torch.float32)}


def base_stack(L, m, n, generator, rank=None):
    """Base matrices with a slowly decaying spectrum (σ from 5 down to 0.1, like MiniLM's), fp64."""
    s = min(m, n)
    sigma = 5 * torch.linspace(1, 0.02, s, dtype=torch.float64) ** 0.7
    if rank is not None:
        sigma[rank:] = 0

    def orthonormal(d):
        return torch.linalg.qr(torch.randn(d, s, generator=generator, dtype=torch.float64))[0]

    return torch.stack([orthonormal(m) * sigma @ orthonormal(n).T for _ in range(L)])


def update(L, m, n, r, scale, generator, size=0.3):
    B = size * torch.randn(L, m, r, generator=generator, dtype=torch.float64)
    A = size * torch.randn(L, r, n, generator=generator, dtype=torch.float64)
    return linalg.LowRank(B, A, torch.full((L,), float(scale), dtype=torch.float64))


def reference(W0, low_rank, k=K):
    """Top-k singular values and each side's cosines ``[L, s, k]`` with the base's vectors, by fp64 LAPACK SVDs."""
    U0, _, V0h = torch.linalg.svd(W0, full_matrices=False)
    U, S, Vh = torch.linalg.svd(W0 + low_rank.dense(), full_matrices=False)
    return S[:, :k], {"left": U0.mT @ U[..., :k], "right": V0h @ Vh.mT[..., :k]}


def assert_matches(found, W0, low_rank, basis):
    """The coordinates' singular values and small-side cosines against LAPACK (max|cos| within the bound)."""
    S, cosines = reference(W0, low_rank)
    torch.testing.assert_close(found.S, S, rtol=1e-12, atol=1e-12)
    assert (found.error_bound <= 1e-5).all()
    got, expected = found.coordinates[..., :K].abs(), cosines[basis.small_side].abs()
    assert ((got.amax(dim=-2) - expected.amax(dim=-2)).abs() <= found.error_bound + 1e-12).all()
    assert torch.equal(got.argmax(dim=-2), expected.argmax(dim=-2))


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)])
def test_top_k_and_cosines_equal_lapack(shape):
    """The singular values and the small side's max|cos| and argmax from a first step (no previous vectors) and
    from the previous step's vectors after the update moved."""
    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    W0 = base_stack(3, m, n, g)
    basis = explicit_basis(W0)
    first = update(3, m, n, 4, 2.0, g)
    found = updating.updated_top(basis, first, K)
    assert found is not None and found.iterations >= 1
    assert_matches(found, W0, first, basis)
    moved = linalg.LowRank(first.B + 0.02 * torch.randn(first.B.shape, generator=g, dtype=torch.float64),
                           first.A, first.scale)
    again = updating.updated_top(basis, moved, K, previous=found.coordinates)
    assert again is not None
    assert_matches(again, W0, moved, basis)


@pytest.mark.parametrize("form", ["householder", "explicit64", "explicit32"])
@pytest.mark.parametrize("shape", [(700, 1100), (1100, 700)])
def test_the_update_path_answers_for_every_basis_form(form, shape):
    """A scan's path for a LoRA adapter at a size above the dense limit: the base's coordinates, certified on the
    matrix itself, whatever the basis's form and precision (a cache's fp32 basis is not orthonormal to fp64): the
    update path answered, and both sides' counts, argmax and max|cos| are LAPACK's within the certified bounds."""
    g = torch.Generator().manual_seed(shape[0] + len(form))
    m, n = shape
    W0 = base_stack(2, m, n, g).float()
    low_rank = update(2, m, n, 8, 2.0, g, size=0.15)
    basis = bases(W0.double())[form]
    basis = dataclasses.replace(basis, W0=W0)
    eps = (0.5, 0.7, 0.9)
    result = analysis.analyze(W0, lora=low_rank, k=K, eps=eps, sides=("left", "right"), basis=basis)
    S, cosines = reference(W0.double(), low_rank)
    for side, got in result.items():
        assert got.method == ["update", "update"], got.method
        torch.testing.assert_close(got.singular_values, S, rtol=1e-6, atol=0)
        expected = cosines[side].abs().amax(dim=-2)
        slack = got.error_bound + (2e-6 if form == "explicit32" else 1e-9)  # an fp32 basis: its own ~1e-7
        assert ((got.max_cos - expected).abs() <= slack).all(), side
        counts = (expected.unsqueeze(-1) < torch.tensor(eps, dtype=torch.float64)).sum(dim=-2)
        assert torch.equal(got.counts, counts) or bool(got.near_threshold.any())
        assert int(got.counts[:, 0].sum()) > 0  # intruders to find
        assert torch.equal(got.argmax, cosines[side].abs().argmax(dim=-2))


def test_an_uncertified_answer_falls_back_to_krylov_from_its_vectors(monkeypatch):
    """Coordinates that are off (here: the tail rows of the found vectors zeroed) fail the certificate on the
    matrix; those matrices take the Krylov path, started from the vectors found, and answer LAPACK's top-k."""
    g = torch.Generator().manual_seed(21)
    W0 = base_stack(2, 600, 900, g)
    low_rank = update(2, 600, 900, 4, 2.0, g)
    updated_top = updating.updated_top

    def off(*args, **kwargs):
        found = updated_top(*args, **kwargs)
        found.coordinates[:, 30:] = 0  # drops what the update added below the head
        return found

    monkeypatch.setattr(updating, "updated_top", off)
    result = analysis.analyze(W0, lora=low_rank, k=K, eps=(0.5,), basis=linalg.base_basis(W0))["left"]
    assert result.method == ["krylov", "krylov"]
    S, cosines = reference(W0, low_rank)
    torch.testing.assert_close(result.singular_values, S, rtol=1e-10, atol=0)
    assert ((result.max_cos - cosines["left"].abs().amax(dim=-2)).abs() <= result.error_bound + 1e-9).all()


def test_a_new_top_vector_from_the_tail_is_found_after_a_warm_start():
    """A strong update along the base's weakest directions brings new top singular vectors (intruders): started
    from the previous step's vectors (of a zero update: the base's own, on which this update does not act), the
    answer is still LAPACK's."""
    g = torch.Generator().manual_seed(5)
    W0, strong = tail_update(g)
    basis = explicit_basis(W0)
    zero = update(2, 120, 200, 2, 1.0, g)
    zero.B.zero_()
    previous = updating.updated_top(basis, zero, K).coordinates
    found = updating.updated_top(basis, strong, K, previous=previous)
    assert found is not None
    assert_matches(found, W0, strong, basis)
    assert (found.coordinates[..., 0].abs().amax(dim=-1) < 0.5).all()  # the new top vector is an intruder


def test_an_answer_that_misses_a_top_vector_is_refused(monkeypatch):
    """A start that cannot see the update (base vectors it does not act on) converges at once, with zero residuals,
    to the base's values: the inertia count refuses that answer, and the second start, from the update's own
    directions, gives LAPACK's."""
    g = torch.Generator().manual_seed(6)
    W0, strong = tail_update(g)
    basis = explicit_basis(W0)
    start, starts = updating._start, []

    def blind_start(problem, previous):
        starts.append(previous is not None)
        if previous is None:
            return start(problem, None)
        eye = torch.eye(problem.lam0.shape[-1] - problem.head, 2 * (K + 1), dtype=torch.float64)
        return eye.expand(problem.lam0.shape[0], -1, -1)  # tail unit vectors next to the head: untouched by B, A

    monkeypatch.setattr(updating, "_start", blind_start)
    found = updating.updated_top(basis, strong, K, previous=torch.zeros(2, 120, K + 1, dtype=torch.float64))
    assert starts == [True, False]
    assert_matches(found, W0, strong, basis)


def tail_update(generator, m=120, n=200, r=2):
    """Base matrices ``[2, m, n]`` and a strong update acting only on their last 60 left and 40 right singular
    vectors (two new top singular values, far above the base's)."""
    W0 = base_stack(2, m, n, generator)
    U0, _, V0h = torch.linalg.svd(W0, full_matrices=False)
    B = U0[..., -60:] @ torch.randn(2, 60, r, generator=generator, dtype=torch.float64)
    A = torch.randn(2, r, 40, generator=generator, dtype=torch.float64) @ V0h[:, -40:]
    return W0, linalg.LowRank(B, A, torch.full((2,), 3.0, dtype=torch.float64))


def test_count_above_equals_eigvalsh_of_the_formed_matrix():
    """The inertia count against the eigenvalues of diag(σ0²) + U C U^T formed and decomposed by LAPACK: at random
    thresholds, next to a base value, and for a zero update (scale 0) and a zero B (PEFT's initial adapter)."""
    g = torch.Generator().manual_seed(11)
    m, n, r = 60, 90, 3
    W0 = base_stack(4, m, n, g)
    basis = explicit_basis(W0)
    low_rank = update(4, m, n, r, 2.0, g)
    low_rank.scale[1] = 0.0
    low_rank.B[2] = 0.0
    F, C = linalg.update_factors(W0, low_rank, left=True)
    U = basis.coordinates(F)
    lam0 = basis.sigma**2
    H = torch.diag_embed(lam0) + U @ C @ U.mT
    eigenvalues = torch.linalg.eigvalsh(H)
    for tau in (lam0[:, 7] * (1 + 1e-12), 0.5 * (lam0[:, 3] + lam0[:, 4]), eigenvalues[:, -5] - 1e-6,
                torch.rand(4, generator=g, dtype=torch.float64) * lam0[:, 0]):
        expected = (eigenvalues > tau.unsqueeze(-1)).sum(dim=-1)
        assert torch.equal(updating.count_above(lam0, U, low_rank.scale, C, tau), expected)


def test_zero_update_keeps_the_base():
    """B = 0 (PEFT's initial adapter): the tuned vectors are the base's, each found at max|cos| 1 at its own rank."""
    g = torch.Generator().manual_seed(2)
    W0 = base_stack(2, 80, 100, g)
    low_rank = update(2, 80, 100, 4, 2.0, g)
    low_rank.B.zero_()
    found = updating.updated_top(explicit_basis(W0), low_rank, K)
    torch.testing.assert_close(found.S, torch.linalg.svdvals(W0)[:, :K], rtol=1e-13, atol=0)
    cosines = found.coordinates[..., :K].abs()
    torch.testing.assert_close(cosines.amax(dim=-2), torch.ones(2, K, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(cosines.argmax(dim=-2), torch.arange(K).expand(2, K))


def test_too_small_for_a_tail_leaves_it_to_the_dense_top_k():
    g = torch.Generator().manual_seed(3)
    W0 = base_stack(1, 14, 20, g)
    assert updating.updated_top(explicit_basis(W0), update(1, 14, 20, 2, 2.0, g), K) is None
    result = analysis.analyze(W0, lora=update(1, 14, 20, 2, 2.0, g), k=K)["left"]
    assert result.method == ["dense"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_update_path_equals_the_dense_top_k_on_a_rank_deficient_base(side):
    """Same rows as the dense fp64 top-k (forced by taking the update path away), including the undetermined
    vectors of a rank-deficient base, and ΔM, ΔD of the formed tuned matrices."""
    g = torch.Generator().manual_seed(7)
    m, n = (100, 150) if side == "left" else (150, 100)
    W0 = base_stack(3, m, n, g, rank=60)
    low_rank = update(3, m, n, 4, 2.0, g)
    basis = explicit_basis(W0)
    eps = (0.3, 0.5, 0.9)
    updated = analysis.analyze(W0, lora=low_rank, k=K, eps=eps, sides=("left", "right"), basis=basis)
    dense = analysis.analyze(W0, W0 + low_rank.dense(), k=K, eps=eps, sides=("left", "right"), basis=basis)
    for name in ("left", "right"):
        got, want = updated[name], dense[name]
        assert got.method == ["update"] * 3 and want.method == ["dense"] * 3
        torch.testing.assert_close(got.singular_values, want.singular_values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.max_cos, want.max_cos, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.outside, want.outside, rtol=0, atol=1e-9)
        assert torch.equal(got.argmax, want.argmax) and torch.equal(got.counts, want.counts)
        assert torch.equal(got.undetermined, want.undetermined) and int(got.undetermined.sum()) > 0
    changes = analysis.magnitude_direction(W0, W0 + low_rank.dense())
    torch.testing.assert_close((updated["left"].delta_magnitude, updated["left"].delta_direction), changes,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,rank", [((96, 160), None), ((160, 96), None), ((128, 128), None), ((160, 96), 60)])
def test_larger_side_cosines_from_the_coordinates_equal_lapack(shape, rank):
    """The larger side's cosines come from the small side's coordinates and U alone (no product with W0): fp64
    LAPACK's cosines of that side's tuned vectors with its base vectors (the reduced SVD's, within the base's rank),
    within each vector's certified bound."""
    g = torch.Generator().manual_seed(sum(shape) + (rank or 0))
    m, n = shape
    W0 = base_stack(2, m, n, g, rank=rank)
    basis = explicit_basis(W0)
    low_rank = update(2, m, n, 4, 2.0, g)
    found = updating.updated_top(basis, low_rank, K)
    small = found.coordinates[..., :K]
    large = updating.larger_side_cosines(basis.sigma, found.factors, low_rank.scale, small, found.S)
    _, cosines = reference(W0, low_rank)
    expected = cosines["right" if basis.small_side == "left" else "left"]
    rows = torch.arange(basis.sigma.shape[-1])  # beyond the base's rank a row is undefined (the match skips it)
    defined = (rows < analysis.base_rank(basis).unsqueeze(-1)).unsqueeze(-1)
    error = torch.where(defined, large.abs() - expected.abs(), 0.0).abs()  # (signs: each basis has its own)
    assert (error <= found.error_bound.unsqueeze(1) + 1e-9).all()  # the bound, and rounding divided by σ0_i
    assert (found.error_bound <= 1e-5).all() and error.max() > 0  # a real comparison, not of a matrix with itself
