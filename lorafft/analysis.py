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

from lorafft import linalg
from lorafft.arrays import as_tensor

DEFAULT_EPS = (0.5,)
NEAR_THRESHOLD = 1e-3  # max|cos| this close to an ε is flagged: its count may flip under rounding


@dataclass
class SideAnalysis:
    """Results for one side of a stack of ``L`` matrices; ``E = len(eps)``.

    singular_values ``[L, k]`` fp64 (tuned, descending), base_singular_values ``[L, k]`` fp64 (the base's top k),
    max_cos ``[L, k]``, argmax ``[L, k]`` int64 (0-based rank
    of the best-matching base vector), error_bound ``[L, k]`` (bound on each max_cos error from the truncated SVD;
    inf where the tuned singular value is not separated from its neighbours), counts ``[L, E]`` int64,
    near_threshold ``[L, k]`` bool (max_cos within max(1e-3, error_bound) of some ε), random_floor ``1/sqrt(d)``,
    random_reference: quantiles of max |cos| of a uniformly random unit vector of R^d against the side's basis
    (see :func:`random_max_cos`), to read whether an ε means anything at this width.
    """

    side: str
    eps: tuple[float, ...]
    singular_values: torch.Tensor
    base_singular_values: torch.Tensor
    max_cos: torch.Tensor
    argmax: torch.Tensor
    error_bound: torch.Tensor
    counts: torch.Tensor
    near_threshold: torch.Tensor
    random_floor: float
    random_reference: dict[str, float]
    iterations: int


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
            the truncated SVD run in :mod:`lorafft.kernels.sketch` and the small side's max |cos| in
            :mod:`lorafft.kernels.cosine`.

    Returns ``{side: SideAnalysis}``.
    """
    if (Wt is None) == (lora is None):
        raise ValueError("give the tuned matrix Wt or its LoRA update lora=(B, A, s), not both")
    W0 = as_tensor(W0)
    Wt = None if Wt is None else as_tensor(Wt)
    start = None if start is None else as_tensor(start)
    if W0.dim() not in (2, 3) or (Wt is not None and W0.shape != Wt.shape):
        raise ValueError(f"W0 and Wt must have one shape [m, n] or [L, m, n]; got {tuple(W0.shape)}, "
                         f"{None if Wt is None else tuple(Wt.shape)}")
    single = W0.dim() == 2
    if single:
        W0, Wt = W0.unsqueeze(0), None if Wt is None else Wt.unsqueeze(0)
        start = None if start is None else start.unsqueeze(0)
    low_rank = None if lora is None else _low_rank(lora, W0, single)
    for side in sides:
        if side not in linalg.SIDES:
            raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    eps = (float(eps),) if isinstance(eps, (int, float)) else tuple(float(e) for e in eps)
    basis = linalg.base_basis(W0) if basis is None else basis
    block = max(2 * k, k + 10)
    guesses = basis.top_vectors("left", block - block // 4)
    if start is not None:
        guesses = torch.cat([start.to(guesses.device, torch.float64), guesses], dim=-1)
    tuned_matrix = W0 if Wt is None else Wt
    backend = linalg.resolve_backend(tuned_matrix.device, backend)
    tuned = linalg.truncated_svd(tuned_matrix, k, start=guesses, block_size=block, tol=tol, generator=generator,
                                 backend=backend, low_rank=low_rank)
    results = {}
    for side in sides:
        vectors = tuned.U if side == "left" else tuned.V
        match = linalg.match(basis, vectors, side, eps, backend)
        max_cos = match.max_cos.double()
        slack = tuned.error_bound.clamp_min(NEAR_THRESHOLD)
        thresholds = torch.tensor(eps, dtype=torch.float64, device=max_cos.device)
        near = ((max_cos.unsqueeze(-1) - thresholds).abs() < slack.unsqueeze(-1)).any(dim=-1)
        results[side] = SideAnalysis(
            side=side,
            eps=eps,
            singular_values=tuned.S,
            base_singular_values=basis.sigma[:, : tuned.S.shape[-1]],
            max_cos=max_cos,
            argmax=match.argmax,
            error_bound=tuned.error_bound,
            counts=match.counts,
            near_threshold=near,
            random_floor=1.0 / math.sqrt(vectors.shape[-2]),
            random_reference=random_max_cos(vectors.shape[-2], basis.sigma.shape[-1]),
            iterations=tuned.iterations,
        )
    return results


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
