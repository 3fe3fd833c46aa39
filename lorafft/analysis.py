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
import math
from dataclasses import dataclass

import torch

from lorafft import linalg, options, updating
from lorafft.arrays import as_tensor

DEFAULT_EPS = options.DEFAULT_EPS
NEAR_THRESHOLD = 1e-3  # max|cos| this close to an ε is flagged: its count may flip under rounding


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
    iteration from them); None from :func:`analyze_update`, which keeps them in the base's coordinates.
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
    W0: torch.Tensor,
    Wt: torch.Tensor | None = None,
    *,
    lora=None,
    k: int = 10,
    eps=DEFAULT_EPS,
    sides=("left",),
    start: torch.Tensor | None = None,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    basis: linalg.BaseBasis | None = None,
    backend: str | None = None,
    scale: torch.Tensor | None = None,
) -> dict[str, SideAnalysis]:
    """Intruder analysis of one pair ``W0, Wt [m, n]`` or a stack of same-shape pairs ``[L, m, n]`` (a pair is
    treated as L = 1).

    Args:
        W0, Wt: base and tuned weights: torch tensors, or DLPack arrays (CuPy, NumPy, JAX: wrapped without a copy,
            on their device); fp32, fp64, or fp16/bf16 as stored (the Triton kernels read those without an fp32
            copy; the torch backend upcasts Wt once).
        lora: instead of Wt, a LoRA update ``(B, A, s)`` (B ``[m, r]`` / ``[L, m, r]``, A ``[r, n]`` / ``[L, r, n]``,
            s a number or one per matrix) or a :class:`lorafft.linalg.LowRank`: the tuned matrix is ``W0 + s·B·A``,
            never formed (each product is W0's plus two thin ones).
        k, eps, tol: as in :func:`lorafft.scan`; sides: a tuple of "left" and/or "right".
        start: optional extra left-space vectors ``[L, m, c]`` for the tuned SVD's first block (a LoRA adapter's
            B columns); the base's own top left singular vectors are always used.
        generator: for the random part of the start block (reproducible results).
        basis: ``linalg.base_basis(W0)`` when the caller already has it (scans of several checkpoints of one run
            pay for it once).
        backend: "torch", "triton" or "auto" (:func:`lorafft.linalg.resolve_backend`): with Triton, the products of
            the truncated SVD run in :mod:`lorafft.kernels.sketch`; the max |cos| is one full-fp32 product with the
            basis and a reduction (:func:`lorafft.linalg.match`).
        scale: an FP8 ``Wt``'s dequantisation scale as stored (``Wt · scale`` is the matrix; layouts as
            :func:`lorafft.linalg.truncated_svd`'s ``scale``): the Triton kernels read both as they are.

    Returns ``{side: SideAnalysis}``.
    """
    W0, Wt, low_rank, single = _stacks(W0, Wt, lora)
    start = None if start is None else as_tensor(start)
    start = start.unsqueeze(0) if single and start is not None else start
    scale = None if scale is None else as_tensor(scale)
    scale = scale.unsqueeze(0) if single and scale is not None else scale
    for side in sides:
        if side not in linalg.SIDES:
            raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    eps, k = options.thresholds(eps), options.positive_int(k)
    basis = linalg.base_basis(W0) if basis is None else basis
    guesses, block = start_block(basis, k, start)
    tuned_matrix = W0 if Wt is None else Wt
    backend = linalg.resolve_backend(tuned_matrix.device, backend)
    tuned = linalg.truncated_svd(tuned_matrix, k, start=guesses, block_size=block, tol=tol, generator=generator,
                                 backend=backend, low_rank=low_rank, scale=scale,
                                 base_gram=basis.gram if Wt is None else None)
    results, rank = {}, base_rank(basis)
    for side in sides:
        vectors = tuned.U if side == "left" else tuned.V
        defined = _defined_match(basis, vectors, side, eps, backend, rank)
        results[side] = _side_analysis(side, eps, tuned, basis, rank, defined, vectors)
    return results


@dataclass
class UpdateAnalysis:
    """:func:`analyze_update`'s answer: ``sides`` ``{side: SideAnalysis}`` (``vectors`` None), the tuned vectors'
    ``coordinates [L, s, k + 1]`` in the base's small-side basis (the next call's ``previous``), and ``changes``,
    ``(ΔM [L], ΔD [L])`` of :func:`magnitude_direction`."""

    sides: dict[str, SideAnalysis]
    coordinates: torch.Tensor
    changes: tuple[torch.Tensor, torch.Tensor]


def analyze_update(basis: linalg.BaseBasis, lora: linalg.LowRank, *, k: int = 10, eps=DEFAULT_EPS,
                   sides=("left",), previous: torch.Tensor | None = None, tol: float = 1e-5,
                   base_norms: torch.Tensor | None = None) -> UpdateAnalysis | None:
    """:func:`analyze` of ``basis.W0 + lora`` computed in the base's coordinates (:mod:`lorafft.updating`), for a
    basis whose small side is explicit in fp64 (with the tuned matrices' ΔM and ΔD); None when the dense top-k must
    answer instead (:func:`lorafft.updating.updated_top`). ``previous``: the last call's coordinates;
    ``base_norms``: W0's squared row norms ``[L, m]`` fp64, when the caller keeps them."""
    eps, k = options.thresholds(eps), options.positive_int(k)
    tuned = updating.updated_top(basis, lora, k, previous, tol)
    if tuned is None:
        return None
    results, rank = {}, base_rank(basis)
    for side in sides:
        cosines = tuned.cosines(side)
        match = linalg.max_abs_cos(cosines, eps)
        defined = _restrict_to_rank(match, lambda: cosines, rank, basis.sigma.shape[-1], eps)
        results[side] = _side_analysis(side, eps, tuned, basis, rank, defined, None)
    W0 = basis.W0
    if base_norms is None:
        base_norms = (W0.double() ** 2).sum(dim=-1)
    # W0 A^T is the first half of the update's factors when the left side is the small one (updating.UpdatedSVD)
    W0_At = tuned.product if tuned.small_side == "left" else (lora.A.to(W0.device, torch.float64) @ W0.double().mT).mT
    return UpdateAnalysis(results, tuned.coordinates,
                          magnitude_direction(W0, lora=lora, base_rows=(base_norms, W0_At)))


def _side_analysis(side: str, eps: tuple[float, ...], tuned, basis: linalg.BaseBasis, rank: torch.Tensor,
                   defined: tuple, vectors: torch.Tensor | None) -> SideAnalysis:
    """One side's :class:`SideAnalysis` from the tuned top-k (``S``, ``error_bound``, ``iterations`` of a
    :class:`lorafft.linalg.TruncatedSVD` or :class:`lorafft.updating.UpdatedSVD`) and the ``(match, undetermined,
    outside)`` of :func:`_restrict_to_rank`."""
    match, undetermined, outside = defined
    max_cos = match.max_cos.double()
    thresholds = torch.tensor(eps, dtype=torch.float64, device=max_cos.device)
    slack = tuned.error_bound.clamp_min(NEAR_THRESHOLD)  # vectors without a bound are not "near": see report
    near = ((max_cos.unsqueeze(-1) - thresholds).abs() < slack.unsqueeze(-1)).any(dim=-1)
    near &= tuned.error_bound.isfinite()
    dimension = basis.W0.shape[-2] if side == "left" else basis.W0.shape[-1]
    return SideAnalysis(
        side=side,
        eps=eps,
        singular_values=tuned.S,
        base_singular_values=basis.sigma[:, : tuned.S.shape[-1]],
        max_cos=max_cos,
        argmax=match.argmax,
        error_bound=tuned.error_bound,
        intruders=match.intruders,
        near_threshold=near,
        random_floor=1.0 / math.sqrt(dimension),
        random_reference=random_max_cos(dimension, basis.sigma.shape[-1]),
        iterations=tuned.iterations,
        base_rank=rank,
        undetermined=undetermined,
        outside=outside,
        vectors=vectors,
    )


def classify(basis: linalg.BaseBasis, vectors: torch.Tensor, side: str, eps) -> linalg.CosineMatch:
    """max |cos| of tuned unit vectors ``vectors [L, d, k]`` against the base basis of ``side`` and which of them are
    intruders at each ε, decided as :func:`analyze` decides (the undetermined vectors of a rank-deficient base are
    not intruders): for pictures of vectors computed outside :func:`analyze`."""
    eps = options.thresholds(eps)
    return _defined_match(basis, vectors, side, eps, "torch", base_rank(basis))[0]


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


def batch_generator(seed: int, position: int) -> torch.Generator:
    """The random stream of the start blocks of batch ``position``: one per batch, so that a resumed, distributed or
    tracked run draws exactly what one scan draws."""
    return torch.Generator().manual_seed(seed + 7919 * position)


def start_block(basis: linalg.BaseBasis, k: int, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The tuned SVD's start: ``(guesses [L, m, c] fp64, block size)`` for the top ``k`` left singular vectors.

    The block holds ``max(2k, k + 10)`` vectors; the guesses are ``extra`` (a LoRA adapter's B columns, or the
    previous vectors of a tracked matrix) followed by the base's top three quarters of a block of left singular
    vectors, since a fine-tune mostly keeps them (a synthetic 4096² fine-tune started there certifies in 7 iterations,
    ``benchmarks/results/claims.json``); :func:`lorafft.linalg.truncated_svd` fills the rest of the block with
    random vectors.
    """
    block = max(2 * k, k + 10)
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


ROW_BLOCK = 1 << 18  # elements upcast to fp64 at a time by magnitude_direction: 2 MB temporaries stay in cache


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

    Everything is accumulated in fp64. For a factored LoRA update ΔW = s·B·A the tuned matrix is not formed: with
    rows b_i of B, ``||w_0,i + s b_i A||² = ||w_0,i||² + 2s <w_0,i, b_i A> + s² b_i (A Aᵀ) b_iᵀ`` and
    ``<w_t,i, w_0,i> = ||w_0,i||² + s <w_0,i, b_i A>``, from ``W0 Aᵀ [m, r]`` and ``A Aᵀ [r, r]``.

    Args:
        W0: base weights ``[m, n]`` or a stack ``[L, m, n]`` (any float dtype; torch or DLPack arrays).
        Wt: tuned weights of W0's shape, or None with ``lora``.
        lora: instead of Wt, the update ``(B, A, s)`` or a :class:`lorafft.linalg.LowRank`, as in :func:`analyze`.
        base_rows: with ``lora``, ``(||w_0,i||² [L, m], W0 Aᵀ [L, m, r])`` fp64 when the caller has them (a tracker
            keeps the first; :func:`analyze_update` forms the second): W0 is then not read.

    Returns:
        ``(ΔM [L], ΔD [L])`` fp64 on W0's device (L = 1 for a pair).
    """
    W0, Wt, low_rank, _ = _stacks(W0, Wt, lora)
    if base_rows is not None and low_rank is not None:
        base = base_rows[0]
        low_rank = low_rank.to(base.device, torch.float64)
        tuned, inner = _updated_rows(base, base_rows[1], low_rank.B, low_rank.A @ low_rank.A.mT, low_rank.scale)
    else:
        base, tuned, inner = _row_products(W0, Wt, low_rank)
    base_norm, tuned_norm = base.sqrt(), tuned.sqrt()
    magnitude = (tuned_norm - base_norm).abs().mean(dim=-1)
    defined = (base > 0) & (tuned > 0)
    cosine = inner / torch.where(defined, base_norm * tuned_norm, 1.0)
    change = torch.where(defined, (1 - cosine).clamp(0, 2), 0.0)
    direction = change.sum(dim=-1) / defined.sum(dim=-1)  # 0/0 = NaN where no row has a direction
    return magnitude, direction


def _row_products(W0: torch.Tensor, Wt: torch.Tensor | None,
                  low_rank: linalg.LowRank | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||w_0,i||², ||w_t,i||², <w_t,i, w_0,i>)``, each ``[L, m]`` fp64, for W0 ``[L, m, n]`` and Wt (or the
    factored update ``low_rank``, see :func:`magnitude_direction`), upcast to fp64 a block of rows at a time."""
    L, m, n = W0.shape
    device = W0.device
    if low_rank is not None:
        low_rank = low_rank.to(device, torch.float64)
        A_At = low_rank.A @ low_rank.A.mT  # [L, r, r], once for every block of rows
    base, tuned, inner = (torch.empty(L, m, dtype=torch.float64, device=device) for _ in range(3))
    step = max(1, ROW_BLOCK // max(1, L * n))
    for start in range(0, m, step):
        rows = slice(start, start + step)
        w0 = W0[:, rows].double()
        base[:, rows] = (w0 * w0).sum(dim=-1)
        if low_rank is None:
            wt = Wt[:, rows].double()
            tuned[:, rows], inner[:, rows] = (wt * wt).sum(dim=-1), (wt * w0).sum(dim=-1)
        else:
            tuned[:, rows], inner[:, rows] = _updated_rows(base[:, rows], w0 @ low_rank.A.mT, low_rank.B[:, rows],
                                                           A_At, low_rank.scale)
    return base, tuned, inner


def _updated_rows(base: torch.Tensor, W0_At: torch.Tensor, B: torch.Tensor, A_At: torch.Tensor,
                  scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||w_t,i||², <w_t,i, w_0,i>)`` ``[L, m]`` of ``W0 + s B A`` from ``base = ||w_0,i||² [L, m]``,
    ``W0_At = W0 Aᵀ [L, m, r]``, ``B [L, m, r]``, ``A_At = A Aᵀ [L, r, r]`` and ``scale [L]`` (all fp64; see
    :func:`magnitude_direction`)."""
    along = scale[:, None] * (W0_At * B).sum(dim=-1)  # s <w_0,i, b_i A>
    squared = scale[:, None] ** 2 * ((B @ A_At) * B).sum(dim=-1)  # s² b_i A Aᵀ b_iᵀ
    return (base + 2 * along + squared).clamp_min(0), base + along
