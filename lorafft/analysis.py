"""Intruder analysis on tensors the caller already holds: one pair ``(W0, Wt)`` or stacks ``[L, m, n]``.

For each tuned singular vector y_j (j < k, descending singular value) and each side: ``max_i |<y_j, x_i>|`` over
**all** base singular vectors x_i of that side, the argmax i, and the number of y_j with max < ε for each ε (the
paper's intruder count, Shuttleworth et al. 2024, Sec. 3). Beside each count stands the random-direction floor
``1/sqrt(d)``: any unit vector in R^d has max |cos| >= 1/sqrt(d) against a complete basis of R^d (the side of
the smaller dimension; on the larger side the reduced basis spans only min(m, n) directions, and the floor is
a reference scale, not a bound).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from lorafft import linalg, options, profiling, updating
from lorafft.arrays import as_tensor
from lorafft.errors import InternalError, WrongBasis
from lorafft.scales import Scale

NEAR_THRESHOLD = 1e-3  # max|cos| this close to an ε is flagged: its count may flip under rounding
PRODUCT_FLOOR = 16  # a certified residual at or below 16 eps σ_1 is at the rounding floor of the products


@dataclass
class SideAnalysis:
    """Results for one side of a stack of ``L`` matrices; ``E = len(eps)``.

    singular_values ``[L, k]`` fp64 (tuned, descending), base_singular_values ``[L, k]`` fp64 (the base's top k),
    max_cos ``[L, k]``, argmax ``[L, k]`` int64 (0-based rank
    of the best-matching base vector), error_bound ``[L, k]`` (bound on each max_cos error from the truncated SVD;
    inf where the tuned singular value is not separated from its neighbours), intruders ``[L, k, E]`` bool (y_j
    counted as an intruder at eps_e; ``counts [L, E]`` their number), near_threshold ``[L, k]`` bool (max_cos
    within max(1e-3, error_bound) of some ε), random_floor ``1/sqrt(d)``,
    random_reference: quantiles of max |cos| of a uniformly random unit vector of R^d against the side's basis
    (see :func:`random_max_cos`), to read whether an ε means anything at this width.
    base_rank ``[L]`` int64: numerical rank ρ of W0 (:func:`base_rank`); undetermined ``[L, E]`` int64: vectors
    whose intruder status at ε depends on how a rank-deficient base basis is completed (:func:`_defined_match`),
    left out of ``counts``; zero when ρ = min(m, n); outside ``[L, k]`` fp64: each y_j's length outside the span of
    the ρ defined base vectors (0 at full rank), so y_j is an intruder at ε iff ``max(max_cos, outside) < ε``.
    vectors ``[L, d, k]`` fp64: the tuned singular vectors y_j themselves (a tracker warm-starts the next step's
    Krylov iteration from them). method: per matrix, the path that answered (``"dense"``, ``"krylov"`` or
    ``"update"``, :func:`tuned_top`). coordinates ``[L, s, k + 1]`` fp64 or None: the tuned vectors in the base's
    small-side basis where the update path answered (a tracker's next start). delta_magnitude, delta_direction
    ``[L]`` fp64: DoRA's ΔM and ΔD of each matrix (:func:`magnitude_direction`), the same on every side.
    """

    side: str
    eps: tuple[float, ...]
    singular_values: torch.Tensor
    base_singular_values: torch.Tensor
    max_cos: torch.Tensor
    argmax: torch.Tensor
    error_bound: torch.Tensor
    intruders: torch.Tensor
    near_threshold: torch.Tensor
    random_floor: float
    random_reference: dict[str, float]
    iterations: int
    base_rank: torch.Tensor
    undetermined: torch.Tensor
    outside: torch.Tensor
    vectors: torch.Tensor | None
    method: list[str]
    coordinates: torch.Tensor | None
    delta_magnitude: torch.Tensor
    delta_direction: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``[L, E]`` int64: the number of intruders at each ε."""
        return self.intruders.sum(dim=-2)

    @property
    def counts_by_eps(self) -> dict[str, torch.Tensor]:
        """The counts named by their threshold, as a report names them: ``{"0.5": tensor([L])}`` (int64, one count
        per matrix of the stack)."""
        counts = self.counts
        return {options.eps_key(eps): counts[..., index] for index, eps in enumerate(self.eps)}


RANDOM_QUANTILES = (0.05, 0.5, 0.95, 0.99)


@functools.lru_cache(maxsize=64)
def random_max_cos(dimension: int, basis_size: int, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Quantiles of ``max_i |<y, x_i>|`` for y uniform on the unit sphere of R^d and ``basis_size`` orthonormal x_i.

    By rotation invariance the basis can be the first coordinate axes, so this is the law of
    ``max_{i < s} |g_i| / ||g||`` for Gaussian g: estimated from ``samples`` draws (seeded, so reports are
    reproducible; the quantiles' Monte Carlo error is about 1e-3). Keys ``"p5"``, ``"p50"``, ``"p95"``, ``"p99"``.
    """
    generator = torch.Generator().manual_seed(seed)
    maxima = []
    for start in range(0, samples, 256):
        g = torch.randn(min(256, samples - start), dimension, generator=generator, dtype=torch.float64)
        maxima.append(g[:, :basis_size].abs().amax(dim=1) / g.norm(dim=1))
    quantiles = torch.quantile(torch.cat(maxima), torch.tensor(RANDOM_QUANTILES, dtype=torch.float64))
    return {f"p{round(100 * q)}": float(v) for q, v in zip(RANDOM_QUANTILES, quantiles)}


def analyze(
    W0,
    Wt=None,
    *,
    lora=None,
    k: int = options.DEFAULT_K,
    eps=options.DEFAULT_EPS,
    sides=("left",),
    start: torch.Tensor | None = None,
    tol: float = options.DEFAULT_TOL,
    generator=None,
    basis: linalg.BaseBasis | None = None,
    backend: str | None = None,
    scale: Scale | None = None,
    previous: torch.Tensor | None = None,
) -> dict[str, SideAnalysis]:
    """Intruder analysis of one pair ``W0, Wt [m, n]`` or a stack of same-shape pairs ``[L, m, n]`` (a pair is
    treated as L = 1), with DoRA's ΔM and ΔD of each matrix.

    Args:
        W0, Wt: base and tuned weights: torch tensors, or DLPack arrays (CuPy, NumPy, JAX: wrapped without a copy,
            on their device); fp32, fp64, or fp16/bf16 as stored (the Triton kernels read those without an fp32
            copy; the torch backend upcasts Wt once).
        lora: instead of Wt, a LoRA update ``(B, A, s)`` (B ``[m, r]`` / ``[L, m, r]``, A ``[r, n]`` / ``[L, r, n]``,
            s a number or one per matrix) or a :class:`lorafft.linalg.LowRank`: the tuned matrix is ``W0 + s·B·A``,
            never formed, and is analysed in the base's coordinates (:func:`tuned_top`).
        k, eps, tol: as in :func:`lorafft.scan`; sides: a tuple of "left" and/or "right".
        start: optional extra left-space vectors ``[L, m, c]`` for the Krylov start block (a LoRA adapter's B
            columns, a tracker's previous vectors); the base's own top left singular vectors are always used.
        generator: for the random part of the Krylov start block (reproducible results): one for the stack or one
            per matrix (:func:`matrix_generators`).
        basis: ``linalg.base_basis(W0)`` when the caller already has it (scans of several checkpoints of one run
            pay for it once), or a cache's; a basis not yet ``verified`` is checked against W0 here.
        backend: "torch", "triton" or "auto" (:func:`lorafft.linalg.resolve_backend`): with Triton, the products with
            the weights run in :mod:`lorafft.kernels.sketch`; the max |cos| is one full-fp32 product with the basis
            and a reduction (:func:`lorafft.linalg.match`).
        scale: an FP8 ``Wt``'s dequantisation scale as stored (``Wt · scale`` is the matrix), a
            :class:`lorafft.scales.Scale` (values ``[L]``, ``[L, m]`` or per tile, without the ``L`` for a pair, and
            the tile side): the Triton kernels read both as they are.
        previous: a LoRA update's last :attr:`SideAnalysis.coordinates`, where the update path starts (a tracker).

    Returns ``{side: SideAnalysis}``. Raises :class:`lorafft.errors.WrongBasis` when a basis given unverified does
    not answer for W0.
    """
    W0, Wt, low_rank, single = _stacks(W0, Wt, lora)
    start = None if start is None else as_tensor(start)
    start = start.unsqueeze(0) if single and start is not None else start
    if scale is not None:
        values = as_tensor(scale.values)
        scale = Scale(values.unsqueeze(0) if single else values, scale.block)
    for side in sides:
        if side not in linalg.SIDES:
            raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    eps, k = options.thresholds(eps), options.positive_int(k)
    basis = linalg.base_basis(W0) if basis is None else basis
    backend = linalg.resolve_backend((W0 if Wt is None else Wt).device, backend)
    device = W0.device
    with profiling.stage("tuned_topk", device):
        tuned = tuned_top(W0, Wt, k=k, low_rank=low_rank, scale=scale, basis=basis, start=start, tol=tol,
                          generator=generator, backend=backend, previous=previous)
    with profiling.stage("magnitude_direction", device):
        Wt = None if Wt is None else linalg.dequantized(Wt, scale)
        changes = magnitude_direction(W0, Wt, lora=low_rank, base_rows=(basis.base_rows(), tuned.W0_At))
    results = {}
    with profiling.stage("match", device):
        rank = base_rank(basis)
        for side in sides:
            vectors = tuned.svd.U if side == "left" else tuned.svd.V
            if tuned.small_cosines is not None:  # the update path: both sides from the coordinates
                cosines = tuned.small_cosines if side == basis.small_side else tuned.large_cosines
                defined = _restrict_to_rank(linalg.max_abs_cos(cosines, eps), lambda: cosines, rank,
                                            basis.sigma.shape[-1], eps)
            else:
                defined = _defined_match(basis, vectors, side, eps, backend, rank)
            results[side] = _side_analysis(side, eps, tuned, basis, rank, defined, vectors, changes)
    return results


@dataclass
class Tuned:
    """:func:`tuned_top`'s answer: the certified top-k ``svd`` (a :class:`lorafft.linalg.TruncatedSVD`), which path
    answered each matrix (``method``), the update path's ``coordinates`` ``[L, s, k + 1]`` (None elsewhere),
    ``W0_At`` ``[L, m, r]`` fp64, ``W0 Aᵀ`` of a LoRA update when the update path formed it (DoRA's ΔM, ΔD), and
    ``small_cosines`` and ``large_cosines``, where the update path answered every matrix: the certified vectors'
    cosines with every base vector of their side, the small side's and the larger side's, from the coordinates (no
    product with the basis or W0; as exact as the basis: :func:`lorafft.updating.larger_side_cosines`)."""

    svd: linalg.TruncatedSVD
    method: list[str]
    coordinates: torch.Tensor | None = None
    W0_At: torch.Tensor | None = None
    small_cosines: torch.Tensor | None = None  # [L, s, k] the certified small-side vectors' cosines, update path
    large_cosines: torch.Tensor | None = None  # [L, s, k] the larger side's (updating.larger_side_cosines)


def tuned_top(W0: torch.Tensor, Wt: torch.Tensor | None, *, k: int, basis: linalg.BaseBasis, backend: str,
              low_rank: linalg.LowRank | None = None, scale: Scale | None = None,
              start: torch.Tensor | None = None, tol: float = options.DEFAULT_TOL, generator=None,
              previous: torch.Tensor | None = None) -> Tuned:
    """The certified top-k singular triplets of the tuned matrices: the one place that chooses how.

    * **update** (a LoRA update kept factored, ``Wt`` None): in the base's coordinates (:mod:`lorafft.updating`,
      from ``previous`` coordinates when given), then certified on the matrix itself: one Rayleigh–Ritz step on the
      vectors found, two passes over W0 (:func:`lorafft.linalg.certify`), whatever the basis's precision. With
      ``W0 Aᵀ`` (also what ΔM and ΔD need) that makes three passes over W0 per matrix when the left side is the
      small one; four otherwise (``W0ᵀ B``, and ``W0 Aᵀ`` for ΔM, ΔD). A vector is certified when its bound is
      ``<= tol`` or its residual is at the rounding floor of the products (``<= PRODUCT_FLOOR eps σ_1``, where the
      Krylov iteration would stall too; small matrices are certified in fp64, as the dense top-k answers them).
      A matrix whose answer is not certified (the inertia count disagrees, clustered values, a residual above the
      floor) takes the Krylov path, started from the vectors found. Not taken for small matrices with a cache's
      fp32 basis: vectors built from it are off by its ~1e-7, which one Rayleigh–Ritz step on their span cannot
      certify in fp64; the dense fp64 top-k is exact there and about as cheap.
    * **dense** (``min(m, n) <= DENSE_SVD_MAX``) or **krylov** otherwise: :func:`lorafft.linalg.truncated_svd`,
      started from ``start``, the base's top vectors and random vectors (:func:`start_block`).

    An unverified basis (a base cache's) is checked against W0 on the way (:meth:`lorafft.linalg.BaseBasis.answers`,
    riding in the certifying passes on the update path): :class:`lorafft.errors.WrongBasis` when it fails.
    """
    L, m, n = W0.shape
    if low_rank is not None and Wt is None and not (basis.kind == "explicit32" and linalg.dense_is_cheaper(m, n)):
        found = _update_path(W0, k, basis, backend, low_rank, previous, tol)
        if found is not None:
            tuned, failed = found
            if not failed:
                return tuned
            start = tuned.svd.U[failed] if start is None else torch.cat([tuned.svd.U, start.to(W0.device)], -1)[failed]
            rescue = _krylov(W0[failed], k, basis.select(failed), backend, low_rank.select(failed), None, start, tol,
                             _select(generator, failed))
            tuned.svd = _merged(tuned.svd, rescue, failed)
            tuned.method = [rescue.method if i in failed else "update" for i in range(L)]
            return tuned
    if not basis.verified:
        _refuse_wrong(basis.verify(backend), basis)
    svd = _krylov(W0 if Wt is None else Wt, k, basis, backend, low_rank, scale, start, tol, generator,
                  base_gram=basis.gram if Wt is None else None)
    return Tuned(svd, [svd.method] * L)


def _update_path(W0, k, basis, backend, low_rank, previous, tol) -> tuple[Tuned, list[int]] | None:
    """The update path: ``(Tuned, matrices whose answer is not certified)``, or None when the coordinates give no
    answer at all (then every matrix takes the Krylov path)."""
    L, m, n = W0.shape
    image = linalg.update_image(W0, low_rank, backend)
    updated = updating.updated_top(basis, low_rank, k, previous, tol, image)
    if updated is None:  # the Krylov path answers (tuned_top checks an unverified basis before it)
        return None
    right = basis.small_side == "right"
    vectors = basis.small_vectors(updated.coordinates)
    checked = None if basis.verified else basis.checked_vectors()
    small = linalg.dense_is_cheaper(m, n)  # certified in fp64, as the dense top-k would answer there
    certified = linalg.certify(W0.double() if small else W0, vectors, min(k, m, n), backend="torch" if small else
                               backend, low_rank=low_rank, transposed=right, checked=checked)
    if checked is not None:
        _refuse_wrong(basis.answers(certified.checked), basis)
    svd = certified.svd
    svd.iterations = updated.iterations
    precision = torch.float64 if small or W0.dtype == torch.float64 else torch.float32
    floor = svd.S[:, :1] * PRODUCT_FLOOR * torch.finfo(precision).eps  # no product in this precision does better
    done = ((svd.error_bound <= tol) | (svd.residual <= floor)).all(dim=-1)
    failed = (~done).nonzero().flatten().tolist()
    if failed:
        return Tuned(svd, ["update"] * L, updated.coordinates, None if right else image), failed
    small = updated.coordinates @ certified.mix
    large = updating.larger_side_cosines(basis.sigma, updated.factors, low_rank.scale, small, svd.S)
    return Tuned(svd, ["update"] * L, updated.coordinates, None if right else image, small, large), []


def _krylov(W, k, basis, backend, low_rank, scale, start, tol, generator, base_gram=None) -> linalg.TruncatedSVD:
    """:func:`lorafft.linalg.truncated_svd` from :func:`start_block` (``start`` first)."""
    guesses, block = start_block(basis, k, start)
    return linalg.truncated_svd(W, k, start=guesses, block_size=block, tol=tol, generator=generator,
                                backend=backend, low_rank=low_rank, scale=scale, base_gram=base_gram)


def _refuse_wrong(answers: torch.Tensor, basis: linalg.BaseBasis) -> None:
    """WrongBasis for the matrices whose basis failed its check; else the basis is marked verified."""
    wrong = (~answers).nonzero().flatten().tolist()
    if wrong:
        raise WrongBasis(wrong)
    basis.verified = True


def _select(generator, rows: list[int]):
    return [generator[i] for i in rows] if isinstance(generator, (list, tuple)) else generator


def _merged(svd: linalg.TruncatedSVD, rescue: linalg.TruncatedSVD, rows: list[int]) -> linalg.TruncatedSVD:
    """``svd`` with the matrices ``rows`` replaced by ``rescue``'s answers."""
    for name in ("U", "S", "V", "residual", "error_bound"):
        getattr(svd, name)[rows] = getattr(rescue, name).to(getattr(svd, name).device)
    svd.iterations = max(svd.iterations, rescue.iterations)
    return svd


def matrix_generators(seed: int, names: list[str]) -> list[torch.Generator]:
    """One random stream per matrix, seeded by ``seed`` and the matrix's name: the random part of its Krylov start
    is then the same whatever batch it is analysed in (a resumed, distributed, tracked, or memory-split run, or
    another device's batch size), so every run draws exactly what one scan draws."""
    return [torch.Generator().manual_seed((seed + int(hashlib.blake2b(name.encode(errors="surrogatepass"),
                                                                      digest_size=8).hexdigest(), 16)) % 2**63)
            for name in names]


def _side_analysis(side: str, eps: tuple[float, ...], tuned: Tuned, basis: linalg.BaseBasis, rank: torch.Tensor,
                   defined: tuple, vectors: torch.Tensor, changes: tuple[torch.Tensor, torch.Tensor]) -> SideAnalysis:
    """One side's :class:`SideAnalysis` from the tuned top-k (:func:`tuned_top`), the ``(match, undetermined,
    outside)`` of :func:`_restrict_to_rank` and the matrices' ``(ΔM, ΔD)``. InternalError for a max |cos| above 1
    plus its bound: no correct basis gives one, so it is never a row."""
    svd = tuned.svd
    match, undetermined, outside = _without_tuned_null(svd.S, basis.W0.shape[-2:], eps, *defined)
    max_cos = match.max_cos.double()
    limit = 1 + NEAR_THRESHOLD + torch.where(svd.error_bound.isfinite(), svd.error_bound, 0.0)
    if bool((max_cos > limit).any()):
        worst = int((max_cos - limit).argmax())
        raise InternalError(f"a max |cos| of {float(max_cos.flatten()[worst]):.6g} for a {list(basis.W0.shape[-2:])} "
                            f"matrix: above 1 plus its error bound, so the base basis is not this matrix's")
    thresholds = torch.tensor(eps, dtype=torch.float64, device=max_cos.device)
    slack = svd.error_bound.clamp_min(NEAR_THRESHOLD)  # vectors without a bound are not "near": see report
    near = ((max_cos.unsqueeze(-1) - thresholds).abs() < slack.unsqueeze(-1)).any(dim=-1)
    near &= svd.error_bound.isfinite()
    dimension = basis.W0.shape[-2] if side == "left" else basis.W0.shape[-1]
    return SideAnalysis(
        side=side,
        eps=eps,
        singular_values=svd.S,
        base_singular_values=basis.sigma[:, : svd.S.shape[-1]],
        max_cos=max_cos,
        argmax=match.argmax,
        error_bound=svd.error_bound,
        intruders=match.intruders,
        near_threshold=near,
        random_floor=1.0 / math.sqrt(dimension),
        random_reference=random_max_cos(dimension, basis.sigma.shape[-1]),
        iterations=svd.iterations,
        base_rank=rank,
        undetermined=undetermined,
        outside=outside,
        vectors=vectors,
        method=tuned.method,
        coordinates=tuned.coordinates,
        delta_magnitude=changes[0],
        delta_direction=changes[1],
    )


def _without_tuned_null(S: torch.Tensor, shape, eps: tuple[float, ...], match: linalg.CosineMatch,
                        undetermined: torch.Tensor, outside: torch.Tensor):
    """``(match, undetermined, outside)`` with the tuned vectors beyond the tuned matrix's numerical rank taken out
    of the counts: a singular value ``S [L, k]`` at or below ``σ_1 · max(m, n) · ε_fp32`` (all of them for an
    all-zero tuned matrix) belongs to its null space, where any unit vector is a y_j. Such a vector gets ``outside``
    1 (it is unconstrained), so it is undetermined at every ε its computed max |cos| is below, as a rank-deficient
    base's undetermined vectors are (:func:`_defined_match`), and never an intruder."""
    null = S <= S[:, :1] * max(shape) * torch.finfo(torch.float32).eps
    if not bool(null.any()):
        return match, undetermined, outside
    thresholds = torch.tensor(eps, dtype=torch.float64, device=S.device)
    unsure = null.unsqueeze(-1) & (match.max_cos.double().unsqueeze(-1) < thresholds)  # [L, k, E]
    undetermined = undetermined + (unsure & match.intruders).sum(dim=-2)
    outside = torch.where(null, 1.0, outside)
    return (linalg.CosineMatch(match.max_cos, match.argmax, match.intruders & ~null.unsqueeze(-1)), undetermined,
            outside)


def base_rank(basis: linalg.BaseBasis) -> torch.Tensor:
    """Numerical rank ρ ``[L]`` int64 of each base matrix: the σ_i above ``σ_1 · max(m, n) · ε_fp32`` (NumPy's
    ``matrix_rank`` rule at the precision weights are stored in); 0 for an all-zero matrix."""
    m, n = basis.W0.shape[-2:]
    floor = basis.sigma[:, :1] * max(m, n) * torch.finfo(torch.float32).eps
    return (basis.sigma > floor).sum(dim=-1)


def _defined_match(basis: linalg.BaseBasis, vectors: torch.Tensor, side: str, eps: tuple[float, ...], backend: str,
                   rank: torch.Tensor) -> tuple[linalg.CosineMatch, torch.Tensor, torch.Tensor]:
    """:func:`lorafft.linalg.match` of ``vectors`` against the basis (``backend`` as there), restricted to the
    defined part of a rank-deficient base basis; and the undetermined vectors.

    Beyond its rank ρ a base matrix's singular vectors are any orthonormal completion: the paper's max over
    *all* x_i is then not a property of W0. For a tuned vector y (unit, ``vectors [L, d, k]``) let ``c`` be its
    max |cos| over the ρ defined x_i and ``r = sqrt(1 - Σ_{i<ρ} cos_i²)`` its length outside their span. Some
    completion has a vector at |cos| = r with y, another spreads r thinly, so y is an intruder at ε for every
    completion iff ``max(c, r) < ε``, for none iff ``c >= ε``, and *undetermined* otherwise (``c < ε <= r``).
    Rows of full rank keep ``match``; rank-deficient ones get max_cos = c and argmax over the defined x_i, and
    counts of the certain intruders only. Returns ``(match, undetermined [L, E] int64, outside [L, k] fp64)``.
    """
    match = linalg.match(basis, vectors, side, eps, backend)
    return _restrict_to_rank(match, lambda: basis.project(vectors.double(), side), rank, basis.sigma.shape[-1], eps)


def _restrict_to_rank(match: linalg.CosineMatch, cosine_matrix, rank: torch.Tensor, size: int,
                      eps: tuple[float, ...]) -> tuple[linalg.CosineMatch, torch.Tensor, torch.Tensor]:
    """:func:`_defined_match`'s rule applied to ``match``: ``cosine_matrix()`` gives the full cosine matrix
    ``[L, s, k]`` (rows by descending σ_i), called only when some base matrix is rank-deficient (ρ < s = size)."""
    undetermined = torch.zeros(match.counts.shape, dtype=torch.int64, device=match.counts.device)
    outside = torch.zeros(match.max_cos.shape, dtype=torch.float64, device=match.max_cos.device)
    deficient = (rank < size).nonzero().flatten().tolist()
    if not deficient:
        return match, undetermined, outside
    max_cos, argmax, intruders = match.max_cos.clone(), match.argmax.clone(), match.intruders.clone()
    thresholds = torch.tensor(eps, dtype=torch.float64, device=max_cos.device)
    cosines = cosine_matrix()
    for index in deficient:
        defined = cosines[index, : int(rank[index])]  # [ρ, k]
        best, best_index = (defined.abs().max(dim=0) if defined.shape[0] else
                            (torch.zeros_like(cosines[index, 0]), torch.zeros_like(argmax[index])))
        outside[index] = (1 - (defined**2).sum(dim=0)).clamp_min(0).sqrt()
        below = best.unsqueeze(-1) < thresholds  # [k, E]
        unsure = below & (outside[index].unsqueeze(-1) >= thresholds)
        max_cos[index], argmax[index] = best.to(max_cos.dtype), best_index
        intruders[index], undetermined[index] = below & ~unsure, unsure.sum(dim=0)
    return linalg.CosineMatch(max_cos=max_cos, argmax=argmax, intruders=intruders), undetermined, outside


def start_block(basis: linalg.BaseBasis, k: int, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The tuned SVD's start: ``(guesses [L, m, c] fp64, block size)`` for the top ``k`` left singular vectors.

    The block holds :func:`lorafft.linalg.krylov_block` vectors; the guesses are ``extra`` (a LoRA adapter's B
    columns, the update path's vectors, or the previous vectors of a tracked matrix) followed by the base's top three
    quarters of a block of left singular vectors, since a fine-tune mostly keeps them (a synthetic 4096² fine-tune
    started there certifies in 7 iterations, ``benchmarks/results/claims.json``); :func:`lorafft.linalg.truncated_svd`
    fills the rest of the block with random vectors.
    """
    block = linalg.krylov_block(k)
    guesses = basis.top_vectors("left", block - block // 4)
    if extra is not None:
        guesses = torch.cat([extra.to(guesses.device, torch.float64), guesses], dim=-1)
    return guesses, block


def _stacks(W0, Wt, lora) -> tuple[torch.Tensor, torch.Tensor | None, linalg.LowRank | None, bool]:
    """``(W0 [L, m, n], Wt [L, m, n] | None, LowRank | None, single)`` from a pair ``[m, n]`` (``single``: L = 1) or
    stacks, with either Wt or ``lora`` (:func:`analyze`'s arguments); ValueError when they do not fit."""
    if (Wt is None) == (lora is None):
        raise ValueError("give the tuned matrix Wt or its LoRA update lora=(B, A, s), not both")
    W0 = as_tensor(W0)
    Wt = None if Wt is None else as_tensor(Wt)
    if W0.dim() not in (2, 3) or (Wt is not None and W0.shape != Wt.shape):
        raise ValueError(f"W0 and Wt must have one shape [m, n] or [L, m, n]; got {tuple(W0.shape)}, "
                         f"{None if Wt is None else tuple(Wt.shape)}")
    single = W0.dim() == 2
    if single:
        W0, Wt = W0.unsqueeze(0), None if Wt is None else Wt.unsqueeze(0)
    return W0, Wt, None if lora is None else _low_rank(lora, W0, single), single


def _low_rank(lora, W0: torch.Tensor, single: bool) -> linalg.LowRank:
    """``lora`` as a LowRank for ``W0 [L, m, n]``: a LowRank as is, or ``(B, A, s)`` with 2-D factors for a single
    pair (``single``) and 3-D ones for a stack; ValueError when the shapes do not make an ``[L, m, n]`` update."""
    if not isinstance(lora, linalg.LowRank):
        B, A, scale = lora
        B, A = as_tensor(B), as_tensor(A)
        if single:
            B, A = B.unsqueeze(0), A.unsqueeze(0)
        scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(W0.shape[0])
        lora = linalg.LowRank(B=B, A=A, scale=scale)
    L, m, n = W0.shape
    r = lora.B.shape[-1]
    if lora.B.shape != (L, m, r) or lora.A.shape != (L, r, n) or lora.scale.shape != (L,):
        raise ValueError(f"lora must be B [{L}, {m}, r], A [{L}, r, {n}] and one scale per matrix for W0 "
                         f"{tuple(W0.shape)}; got {tuple(lora.B.shape)}, {tuple(lora.A.shape)}, "
                         f"{tuple(lora.scale.shape)}")
    return lora


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j`` (Roy & Vetterli 2007;
    the paper's Figure 14) of singular values ``sigma [L, s]``; ``[L]``, 0 for a zero matrix."""
    total = sigma.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, sigma / total, 0.0)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), 0.0)


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Stable rank ``||M||_F^2 / ||M||_2^2`` from singular values ``sigma [L, s]``; ``[L]``, 0 for a zero matrix."""
    top = sigma.amax(dim=-1)
    return torch.where(top > 0, (sigma**2).sum(dim=-1) / top.clamp_min(torch.finfo(sigma.dtype).tiny) ** 2, 0.0)


def delta_ranks(W0: torch.Tensor, Wt: torch.Tensor | None, modules: list) -> list[tuple[float, float]]:
    """(effective rank, stable rank) of ΔW = Wt - W0 for each matrix of the stack ``W0 [L, m, n]``.

    ``modules``: per matrix the PEFT LoRA module (:class:`lorafft.adapters.LoraModule`) or None. A LoRA module
    without DoRA magnitude gives its singular values from the r×r core of its factors (``Wt`` may then be None: the
    batch was kept factored); otherwise they come from the dense difference ``Wt[i] - W0[i]`` in fp32.
    """
    sigmas = []
    for index, module in enumerate(modules):
        if module is not None and module.magnitude is None:
            sigma = linalg.low_rank_singular_values(module.lora_B[None], module.lora_A[None], module.scaling)
        else:
            sigma = linalg.singular_values((Wt[index].float() - W0[index].float())[None])
        sigmas.append(sigma)
    return [(float(effective_rank(s)[0]), float(stable_rank(s)[0])) for s in sigmas]


def magnitude_direction(W0, Wt=None, *, lora=None, base_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA's weight decomposition analysis (Liu et al. 2024, Sec. 3.2, Figure 2): how much each matrix of a stack
    changed its neurons' magnitudes and directions.

    DoRA writes a weight as magnitude times direction, ``W = m · V / ||V||_c``; in the analysed torch orientation
    ``[out, in]`` the paper's column n is row i, ``w_i`` (one output neuron: PEFT's ``lora_magnitude_vector`` has
    one entry per row). For base rows ``w_0,i`` and tuned rows ``w_t,i``, i = 1..m:

        ΔM = (1/m) Σ_i | ||w_t,i|| − ||w_0,i|| |,        ΔD = (1/m') Σ_i' (1 − cos(w_t,i', w_0,i')),

    where the i' are the m' rows that are non-zero in both W0 and Wt: a zero row has no direction, so it is left out
    of ΔD's mean (ΔD is NaN when no row has a direction); ΔM counts every row. The paper plots ΔD (x) against ΔM
    (y) over layers and training steps: full fine-tuning shows a negative slope, LoRA a positive one.

    Everything is accumulated in fp64, over the whole stack at once, a slab of rows widened at a time
    (:func:`lorafft.linalg.widened_rows`: a handful of batched ops per stack on a GPU; on a CPU slabs that stay in
    its cache). For a factored LoRA update ΔW = s·B·A the tuned matrix is not formed: with rows b_i of B,
    ``||w_0,i + s b_i A||² = ||w_0,i||² + 2s <w_0,i, b_i A> + s² b_i (A Aᵀ) b_iᵀ`` and
    ``<w_t,i, w_0,i> = ||w_0,i||² + s <w_0,i, b_i A>``, from ``W0 Aᵀ [m, r]`` and ``A Aᵀ [r, r]``: O(m n r).

    Args:
        W0: base weights ``[m, n]`` or a stack ``[L, m, n]`` (any float dtype; torch or DLPack arrays).
        Wt: tuned weights of W0's shape, or None with ``lora``.
        lora: instead of Wt, the update ``(B, A, s)`` or a :class:`lorafft.linalg.LowRank`, as in :func:`analyze`.
        base_rows: ``(||w_0,i||² [L, m] or None, W0 Aᵀ [L, m, r] or None)`` fp64, what the caller has already (a
            basis's row norms, :meth:`lorafft.linalg.BaseBasis.base_rows`; the update path's ``W0 Aᵀ``): what is
            given is not computed from W0 again.

    Returns:
        ``(ΔM [L], ΔD [L])`` fp64 on W0's device (L = 1 for a pair).
    """
    W0, Wt, low_rank, _ = _stacks(W0, Wt, lora)
    base, W0_At = (None, None) if base_rows is None else base_rows
    base = linalg.row_norms(W0) if base is None else base.to(W0.device)
    if low_rank is not None:
        low_rank = low_rank.to(W0.device, torch.float64)
        W0_At = linalg.matmul_fp64(W0, low_rank.A.mT) if W0_At is None else W0_At.to(W0.device)
        tuned, inner = _updated_rows(base, W0_At, low_rank.B, low_rank.A @ low_rank.A.mT, low_rank.scale)
    else:
        tuned, inner = _tuned_rows(W0, Wt)
    base_norm, tuned_norm = base.sqrt(), tuned.sqrt()
    magnitude = (tuned_norm - base_norm).abs().mean(dim=-1)
    defined = (base > 0) & (tuned > 0)
    cosine = inner / torch.where(defined, base_norm * tuned_norm, 1.0)
    change = torch.where(defined, (1 - cosine).clamp(0, 2), 0.0)
    direction = change.sum(dim=-1) / defined.sum(dim=-1)  # 0/0 = NaN where no row has a direction
    return magnitude, direction


def _tuned_rows(W0: torch.Tensor, Wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||w_t,i||², <w_t,i, w_0,i>)``, each ``[L, m]`` fp64, for stacks ``W0, Wt [L, m, n]``, widened to fp64 a slab
    of rows at a time."""
    tuned, inner = [], []
    for w0, wt in zip(linalg.widened_rows(W0), linalg.widened_rows(Wt)):
        tuned.append(torch.einsum("lmn,lmn->lm", wt, wt))
        inner.append(torch.einsum("lmn,lmn->lm", wt, w0))
    return torch.cat(tuned, dim=1), torch.cat(inner, dim=1)


def _updated_rows(base: torch.Tensor, W0_At: torch.Tensor, B: torch.Tensor, A_At: torch.Tensor,
                  scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||w_t,i||², <w_t,i, w_0,i>)`` ``[L, m]`` of ``W0 + s B A`` from ``base = ||w_0,i||² [L, m]``,
    ``W0_At = W0 Aᵀ [L, m, r]``, ``B [L, m, r]``, ``A_At = A Aᵀ [L, r, r]`` and ``scale [L]`` (all fp64; see
    :func:`magnitude_direction`)."""
    along = scale[:, None] * (W0_At * B).sum(dim=-1)  # s <w_0,i, b_i A>
    squared = scale[:, None] ** 2 * ((B @ A_At) * B).sum(dim=-1)  # s² b_i A Aᵀ b_iᵀ
    return (base + 2 * along + squared).clamp_min(0), base + along
