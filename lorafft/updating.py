"""Top singular triplets of a LoRA-updated matrix ``W = W0 + s·B·A`` from W0's known SVD, in W0's coordinates: the
update path of :func:`lorafft.analysis.tuned_top` (scans of LoRA adapters at every size, a tracker's steps).

Write the smaller side first: ``M = W`` when ``m <= n`` (else ``W^T``), ``M = M0 + s P Q`` with ``(P, Q) = (B, A)``
(else ``(A^T, B^T)``), and let ``X0 [s, s]`` hold M0's left singular vectors x_i (a base basis of any kind:
Householder fp64, explicit fp64, or a cache's explicit fp32), ``σ0`` its singular values. In X0's coordinates the
Gram matrix of M is a diagonal plus rank 2r (:func:`lorafft.linalg.update_factors`):

    H = X0^T M M^T X0 = diag(σ0²) + U C U^T,    U = X0^T [M0 Q^T, P]  [s, 2r],    C = [[0, s I], [s I, s² Q Q^T]],

so a product with H costs ``O(s r)``, and a top eigenvector y_j of H is the list of the tuned vector's cosines
with every base vector of that side. Nothing of size ``m n`` is touched but the one product ``M0 Q^T``
(:func:`lorafft.linalg.update_image`).

The eigenvectors: Rayleigh–Ritz on the base's *head* (every e_i with ``σ0_i² > HEAD σ0_q²``, ``q = k + 1``:
where the tuned top eigenvalues can sit) plus a *tail* block: the tail rows of U, and of the previous step's vectors
and their corrections (below) when there is a previous step (a tracker's: 2 iterations instead of 3 for a 4096²
layer). Each iteration adds to the tail, for every Ritz pair
``(θ, y)``, the exact solution of the tail rows of ``(H - θ I) y = 0`` given y's ``U C U^T y``, that is
``(θ - σ0_t²)^{-1} (U C U^T y)_t`` (Davidson's correction with the tail's own diagonal: exact there, and well
conditioned since θ lies above the tail). Matrices leave the batch as they finish.

What this module certifies, in the coordinates: residuals ``||H y - σ² y|| / σ`` small enough for
:func:`lorafft.linalg.error_bounds`, and an inertia count (:func:`count_above`) proving that no eigenvalue of H but
the q found lies above ``(σ_q - ρ_q)²`` (lowered by the basis's own error for an fp32 basis), which the bounds
assume. When the count disagrees after a start from the previous step (a new vector rose from the tail), the
iteration runs once more from U; when it still disagrees, a top singular value is below what fp64 resolves, or the
iteration does not finish, :func:`updated_top` returns None and the caller takes another path. The coordinates are
exact only as far as X0 is orthonormal and ``M0 Q^T`` is exact, so the caller certifies the vectors they give on
the matrix itself (:func:`lorafft.linalg.certify`: two passes over W0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafft import linalg

HEAD = 0.9  # base directions with σ0_i² above HEAD × σ0_q² are kept whole; the tail below is solved for exactly
MAX_ITERATIONS = 8
FP32_BASIS_ERROR = 1e-5  # relative to σ0_1²: how far an fp32 basis's H may be from X0^T M M^T X0 (inertia margin)


@dataclass
class UpdatedSVD:
    """Top-k triplets of a stack ``W0 + s·B·A`` (``[L, m, n]``) in the base's coordinates (all fp64).

    S, residual, error_bound ``[L, k]`` and iterations: as :class:`lorafft.linalg.TruncatedSVD`'s, measured in the
    coordinates. coordinates ``[L, s, q]``: the small side's tuned vectors y_j (j < q = k + 1) in the base basis of
    that side, row i for the base vector of the i-th largest σ0 (a tracker starts the next step from them).
    factors ``[L, s, 2r]``: U of the module docstring, which :func:`larger_side_cosines` reads.
    """

    S: torch.Tensor
    residual: torch.Tensor
    error_bound: torch.Tensor
    iterations: int
    coordinates: torch.Tensor
    small_side: str
    factors: torch.Tensor  # [L, s, 2r] U = X0^T [M0 Q^T, P] (the update in the base's coordinates)


def updated_top(basis: linalg.BaseBasis, low_rank: linalg.LowRank, k: int, previous: torch.Tensor | None = None,
                tol: float = 1e-5, image: torch.Tensor | None = None) -> UpdatedSVD | None:
    """Top-k triplets of ``basis.W0 + low_rank`` in the base's coordinates (see the module docstring), or None
    where another path must answer.

    Args:
        basis: the base's basis, of any kind (:class:`lorafft.linalg.BaseBasis`).
        low_rank: the update ``s·B·A`` (:class:`lorafft.linalg.LowRank`).
        k: number of triplets.
        previous: ``[L, s, c]`` coordinates of the last step's vectors (:attr:`UpdatedSVD.coordinates`), to start
            from.
        tol: target error bound per vector, as in :func:`lorafft.linalg.truncated_svd`.
        image: ``W0 A^T`` (``W0^T B`` when the right side is the small one), :func:`lorafft.linalg.update_image`;
            formed from W0 in fp64 when not given.
    """
    L, m, n = basis.W0.shape
    left = m <= n
    sigma0 = basis.sigma
    s = sigma0.shape[-1]
    q = min(k + 1, s)
    low_rank = low_rank.to(sigma0.device, torch.float64)
    F, C = linalg.update_factors(basis.W0, low_rank, left, image)
    U = basis.coordinates(F)  # [L, s, 2r] X0^T F
    if not bool(U.isfinite().all()):
        return None
    lam0 = sigma0**2
    head = max(q, int((lam0 > HEAD * lam0[:, q - 1 : q]).sum(dim=-1).max()))  # the batch's widest head
    if head + U.shape[-1] >= s:
        return None  # no tail to speak of: the dense top-k is as cheap
    exact = basis.kind != "explicit32"
    problem = _Problem(lam0, U, C, head)
    floor = math.sqrt(torch.finfo(torch.float64 if exact else torch.float32).eps)
    margin = 0.0 if exact else FP32_BASIS_ERROR
    starts = [None] if previous is None else [previous, None]  # then from U, where a new top vector comes from
    for start in starts:
        found = _iterate(problem, _start(problem, start), k, q, tol, floor)
        if found is not None and _certified(problem, low_rank.scale, found[0], found[1], margin):
            break
    else:
        return None
    sigma, residual, bound, Y, iterations = found
    return UpdatedSVD(S=sigma[:, :k], residual=residual[:, :k], error_bound=bound, iterations=iterations,
                      coordinates=Y, small_side="left" if left else "right", factors=U)


def larger_side_cosines(sigma0: torch.Tensor, factors: torch.Tensor, scale: torch.Tensor, small: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
    """The cosines ``[L, s, k]`` of the larger side's tuned vectors with that side's base vectors, from the small
    side's coordinates alone: no product with W0.

    The larger side's tuned vector is ``z_j = M^T x_j / σ_j`` and its base vectors ``w_i = M0^T x0_i / σ0_i``
    (the reduced SVD's; for ``σ0_i = 0`` the row is 0, undefined, as :meth:`lorafft.linalg.BaseBasis.project` has
    it). With ``M0 M^T = M0 M0^T + s M0 Q^T P^T`` and ``x0_i^T M0 M0^T = σ0_i² x0_i^T``:

        w_i^T z_j = (σ0_i² y_ij + s U_img,i (U_P^T y_j)) / (σ0_i σ_j),    [U_img, U_P] = U = X0^T [M0 Q^T, P],

    for ``small [L, s, k]`` the small side's vectors' coordinates y_j (their cosines with that side's base vectors),
    ``sigma [L, k]`` their singular values and ``sigma0 [L, s]``, ``factors`` U ``[L, s, 2r]`` and ``scale [L]``
    of the update (all fp64). As exact as the coordinates: dividing by a small σ0_i amplifies the basis's error as
    it does in ``project``, which multiplies W0's image by the basis and divides by σ0_i too."""
    r = factors.shape[-1] // 2
    image, P = factors[..., :r], factors[..., r:]
    along = scale.to(small.device, small.dtype)[:, None, None] * image @ (P.mT @ small)  # s U_img (U_P^T y)
    inverse = torch.where(sigma0 > 0, 1.0 / sigma0, 0.0).unsqueeze(-1)
    defined = sigma > sigma[:, :1] * torch.finfo(torch.float64).eps  # as linalg's Ritz vectors: 0 for a zero σ_j
    return (sigma0.unsqueeze(-1) * small + along * inverse) * torch.where(defined, 1.0 / sigma, 0.0).unsqueeze(1)


@dataclass
class _Problem:
    """``H = diag(lam0) + U C U^T`` for a stack (``lam0 [L, s]`` descending, ``U [L, s, 2r]``, ``C [L, 2r, 2r]``),
    its first ``head`` coordinates kept whole."""

    lam0: torch.Tensor
    U: torch.Tensor
    C: torch.Tensor
    head: int

    def times(self, Y: torch.Tensor) -> torch.Tensor:
        """``H Y`` for ``Y [L, s, c]``."""
        return self.lam0.unsqueeze(-1) * Y + self.U @ (self.C @ (self.U.mT @ Y))

    def select(self, rows: torch.Tensor) -> _Problem:
        return _Problem(self.lam0[rows], self.U[rows], self.C[rows], self.head)

    def correction(self, Y: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For approximate eigenpairs ``(lam [L, c], Y [L, s, c])``: the tail's exact solution given Y,
        ``-(H Y - Y Λ)_t / (lam - σ0_t²)`` ``[L, s - head, c]``, and the residual ``H Y - Y Λ`` ``[L, s, c]``;
        None when some lam is not above the tail."""
        R = self.times(Y) - Y * lam.unsqueeze(1)
        gap = lam.unsqueeze(1) - self.lam0[:, self.head :].unsqueeze(-1)
        if not bool((gap > 0).all()):
            return None
        return -R[:, self.head :] / gap, R

    def rayleigh_ritz(self, tail: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top q Ritz pairs of H on span(head e_i, ``tail [L, s - head, c]`` zero on the head, orthonormal):
        ``(θ [L, q] descending, y [L, s, q])``, from the blocks ``[[H_hh, U_h C G], [., tail^T diag(σ0_t²) tail +
        G^T C G]]`` with ``G = U_t^T tail``."""
        h, U, C = self.head, self.U, self.C
        G = U[:, h:].mT @ tail
        corner = tail.mT @ (self.lam0[:, h:].unsqueeze(-1) * tail) + G.mT @ C @ G
        side = U[:, :h] @ C @ G
        T_head = torch.diag_embed(self.lam0[:, :h]) + U[:, :h] @ C @ U[:, :h].mT
        T = torch.cat([torch.cat([T_head, side], -1), torch.cat([side.mT, corner], -1)], -2)
        lam, Z = torch.linalg.eigh(T)
        lam, Z = lam.flip(-1)[:, :q], Z.flip(-1)[..., :q]
        return lam, torch.cat([Z[:, :h], tail @ Z[:, h:]], dim=1)


def _start(problem: _Problem, previous: torch.Tensor | None) -> torch.Tensor:
    """The first tail block ``[L, s - head, c]``: the tail rows of U, the update's own directions, where a new top
    vector comes from, and of the last step's vectors and their corrections under the current H (unless a value is
    not above the tail)."""
    h = problem.head
    start = [problem.U[:, h:]]
    if previous is not None:
        previous = previous.to(problem.U.dtype)
        lam = (previous * problem.times(previous)).sum(dim=1) / (previous * previous).sum(dim=1)
        correction = problem.correction(previous, lam)
        if correction is not None:
            start = [previous[:, h:], correction[0], problem.U[:, h:]]
    return linalg.orthonormalize(torch.cat(start, dim=-1), None)


def _iterate(problem: _Problem, tail: torch.Tensor, k: int, q: int, tol: float, floor: float) -> tuple | None:
    """Rayleigh–Ritz and tail corrections until every matrix is :func:`lorafft.linalg.finished` (those that are
    leave the batch): ``(σ [L, q], residual [L, q], bound [L, k], y [L, s, q], iterations)``, or None. ``floor``:
    the relative rounding floor of H (the basis's precision) below which a residual that stopped falling is done."""
    L, s = problem.lam0.shape
    sigma_all, residual_all = (problem.lam0.new_zeros(L, q) for _ in range(2))
    bound_all, Y_all = problem.lam0.new_zeros(L, k), problem.lam0.new_zeros(L, s, q)
    rows, last = torch.arange(L, device=tail.device), None
    for iteration in range(1, MAX_ITERATIONS + 1):
        if problem.head + tail.shape[-1] >= s:
            return None  # the space would be all of R^s: the dense top-k is cheaper
        lam, Y = problem.rayleigh_ritz(tail, q)
        sigma = lam.clamp_min(0).sqrt()
        correction = problem.correction(Y, lam)
        if correction is None or not bool((sigma > sigma[:, :1] * math.sqrt(torch.finfo(torch.float64).eps)).all()):
            return None  # a Ritz value fell to the tail (the head was cut too short), or a top value is below
            # what an fp64 Gram matrix resolves (its vector is not defined by H)
        step, R = correction
        residual = R.norm(dim=1) / sigma  # ||W v - σ u||
        bound = linalg.error_bounds(sigma, residual, k)
        done = linalg.finished(bound, residual[:, :k], last, sigma[:, :1] * floor, tol)
        for store, value in ((sigma_all, sigma), (residual_all, residual), (bound_all, bound), (Y_all, Y)):
            store[rows[done]] = value[done]
        if bool(done.all()):
            return sigma_all, residual_all, bound_all, Y_all, iteration
        going = ~done
        problem, rows, last, step = problem.select(going), rows[going], residual[going, :k], step[going]
        tail = torch.cat([tail[going], linalg.orthonormalize(step, tail[going])], dim=-1)
    return None


def _certified(problem: _Problem, scale: torch.Tensor, sigma: torch.Tensor, residual: torch.Tensor,
               margin: float) -> bool:
    """Whether the q values found are the top q: no eigenvalue of H but them above ``(σ_q - ρ_q)² - margin σ0_1²``
    (``margin``: how far H may be from the true Gram matrix in these coordinates)."""
    tau = (sigma[:, -1] - residual[:, -1]).clamp_min(0) ** 2 - margin * problem.lam0[:, 0]
    tau = _off_the_base(problem.lam0, tau)
    return bool((count_above(problem.lam0, problem.U, scale, problem.C, tau) == sigma.shape[-1]).all())


def _off_the_base(lam0: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``tau [L]`` moved, where it sits on a base value ``lam0 [L, s]`` (closer than 1e-9 σ0_1²), to the middle of
    the gap below that value: ``(D - τ)^{-1}`` stays far from overflow, and exactly q values above a lower τ
    certifies all the more. (An unchanged base vector has its base value exactly: a zero update, PEFT's B = 0.)"""
    tau = tau.clone()
    floor = 1e-9 * lam0[:, 0]
    on_a_value = ((lam0 - tau.unsqueeze(-1)).abs() <= floor.unsqueeze(-1)).any(dim=-1)
    for index in on_a_value.nonzero().flatten().tolist():  # one host sync, and a loop only where τ must move
        values = lam0[index]
        while bool(((values - tau[index]).abs() <= floor[index]).any()):
            i = int(((values - tau[index]).abs() <= floor[index]).nonzero()[-1])
            below = values[i + 1] if i + 1 < values.shape[0] else -floor[index]
            tau[index] = (values[i] + below) / 2
    return tau


def count_above(lam0: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, C: torch.Tensor,
                tau: torch.Tensor) -> torch.Tensor:
    """How many eigenvalues of ``H = diag(lam0) + U C U^T`` lie above ``tau [L]``, without H's eigen-decomposition:
    ``[L]`` int64.

    Sylvester's law of inertia on the bordered matrix ``[[D - τ, U], [U^T, -C^{-1}]]`` (Haynsworth): its positive
    eigenvalues number ``n+(D - τ) + n+(S)`` with ``S = -C^{-1} - U^T (D - τ)^{-1} U`` [2r, 2r], and also
    ``n+(-C^{-1}) + n+(H - τ)``. ``C^{-1} = [[-Q Q^T, I/s], [I/s, 0]]`` has r positive and r negative eigenvalues
    (its off-diagonal block is invertible), so ``n+(H - τ) = n+(D - τ) + n+(S) - r``. A zero update (``s = 0``)
    is counted as ``U = 0``. ``O(s r²)`` per matrix. ValueError when a tau equals a value of lam0."""
    r = U.shape[-1] // 2
    live = scale != 0
    safe = torch.where(live, scale, 1.0)[:, None, None]
    eye = torch.eye(r, dtype=U.dtype, device=U.device).expand(U.shape[0], r, r)
    QQt = C[:, r:, r:] / safe**2
    inverse = torch.cat([torch.cat([-QQt, eye / safe], -1), torch.cat([eye / safe, torch.zeros_like(eye)], -1)], -2)
    shift = lam0 - tau.unsqueeze(-1)
    U = U * live[:, None, None]
    S = -inverse - U.mT @ (U / shift.unsqueeze(-1))
    if not bool(S.isfinite().all()):
        raise ValueError("tau is on a value of lam0: the count there is not defined")
    return (shift > 0).sum(dim=-1) + (torch.linalg.eigvalsh(S) > 0).sum(dim=-1) - r
