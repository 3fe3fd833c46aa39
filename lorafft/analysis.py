"""Intruder analysis on tensors the caller already holds: one pair ``(W0, Wt)`` or stacks ``[L, m, n]``.

For each tuned singular vector y_j (j < k, descending singular value) and each side: ``max_i |<y_j, x_i>|`` over
**all** base singular vectors x_i of that side, the argmax i, and the number of y_j with max < ε for each ε (the
paper's intruder count, Shuttleworth et al. 2024, Sec. 3). Beside each count stands the random-direction floor
``1/sqrt(d)``: any unit vector in R^d has max |cos| >= 1/sqrt(d) against a complete basis of R^d (the side of
the smaller dimension; on the larger side the reduced basis spans only min(m, n) directions, and the floor is
a reference scale, not a bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafft import linalg

DEFAULT_EPS = (0.5,)
NEAR_THRESHOLD = 1e-3  # max|cos| this close to an ε is flagged: its count may flip under rounding


@dataclass
class SideAnalysis:
    """Results for one side of a stack of ``L`` matrices; ``E = len(eps)``.

    singular_values ``[L, k]`` fp64 (tuned, descending), max_cos ``[L, k]``, argmax ``[L, k]`` int64 (0-based rank
    of the best-matching base vector), error_bound ``[L, k]`` (bound on each max_cos error from the truncated SVD;
    inf where the tuned singular value is not separated from its neighbours), counts ``[L, E]`` int64,
    near_threshold ``[L, k]`` bool (max_cos within max(1e-3, error_bound) of some ε), random_floor ``1/sqrt(d)``.
    """

    side: str
    eps: tuple[float, ...]
    singular_values: torch.Tensor
    max_cos: torch.Tensor
    argmax: torch.Tensor
    error_bound: torch.Tensor
    counts: torch.Tensor
    near_threshold: torch.Tensor
    random_floor: float
    iterations: int


def analyze(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    *,
    k: int = 10,
    eps=DEFAULT_EPS,
    sides=("left",),
    start: torch.Tensor | None = None,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> dict[str, SideAnalysis]:
    """Intruder analysis of one pair ``W0, Wt [m, n]`` or a stack of same-shape pairs ``W0, Wt [L, m, n]`` (a pair is treated as L = 1).

    ``start``: optional extra left-space vectors ``[L, m, c]`` for the tuned SVD's first block (a LoRA adapter's
    B columns); the base's own top left singular vectors are always used. Returns ``{side: SideAnalysis}``.
    """
    if W0.shape != Wt.shape or W0.dim() not in (2, 3):
        raise ValueError(f"W0 and Wt must have one shape [m, n] or [L, m, n]; got {tuple(W0.shape)}, {tuple(Wt.shape)}")
    if W0.dim() == 2:
        W0, Wt = W0.unsqueeze(0), Wt.unsqueeze(0)
        start = None if start is None else start.unsqueeze(0)
    for side in sides:
        if side not in linalg.SIDES:
            raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    eps = (float(eps),) if isinstance(eps, (int, float)) else tuple(float(e) for e in eps)
    basis = linalg.base_basis(W0)
    Wt = Wt if Wt.dtype == torch.float64 else Wt.float()
    block = max(2 * k, k + 10)
    guesses = basis.top_vectors("left", block - block // 4)
    if start is not None:
        guesses = torch.cat([start.double(), guesses], dim=-1)
    tuned = linalg.truncated_svd(Wt, k, start=guesses, block_size=block, tol=tol, generator=generator)
    results = {}
    for side in sides:
        vectors = tuned.U if side == "left" else tuned.V
        match = linalg.max_abs_cos(basis.project(vectors, side), eps)
        max_cos = match.max_cos.double()
        slack = tuned.error_bound.clamp_min(NEAR_THRESHOLD)
        thresholds = torch.tensor(eps, dtype=torch.float64)
        near = ((max_cos.unsqueeze(-1) - thresholds).abs() < slack.unsqueeze(-1)).any(dim=-1)
        results[side] = SideAnalysis(
            side=side,
            eps=eps,
            singular_values=tuned.S,
            max_cos=max_cos,
            argmax=match.argmax,
            error_bound=tuned.error_bound,
            counts=match.counts,
            near_threshold=near,
            random_floor=1.0 / math.sqrt(vectors.shape[-2]),
            iterations=tuned.iterations,
        )
    return results

