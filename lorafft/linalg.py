"""Batched linear algebra: the exact base basis, the certified top-k SVD of the tuned matrix, and max |cos|.

Shapes: a stack of ``L`` same-shape matrices ``W`` is ``[L, m, n]`` (torch ``[out, in]`` weights); the *left*
side is the output space R^m (the paper's choice), the *right* side the input space R^n. Singular values and
vectors are ordered by descending singular value; indices are 0-based.

Three primitives, each usable on its own:

* :func:`base_basis` — every singular vector of one stack of base matrices W0 (the paper's x_i), exact.
* :func:`truncated_svd` — the top-k singular triplets of the tuned matrices Wt (the paper's y_j), by block Krylov
  iteration that stops when a residual bound certifies the vectors (small matrices: a dense fp64 top-k, same bound),
  and reports that bound.
* :func:`max_abs_cos` — for each y_j, ``max_i |<y_j, x_i>|``, its argmax ``i``, and the counts below each ε.

This module is the only one that chooses algorithms; everything above it is device-agnostic.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from lorafft.errors import InputError
from lorafft.scales import Scale

SIDES = ("left", "right")
BACKENDS = ("auto", "torch", "triton")
SLAB_COLUMNS = 2048  # columns of a weight widened to fp64 at a time for its Gram matrix
WIDENED_ELEMENTS = 1 << 19  # elements of a weight widened to fp64 at a time on a CPU: slabs that stay in its cache
DEVICE_WIDENED_ELEMENTS = 1 << 24  # on a GPU: a handful of batched ops per stack, 128 MB per fp64 slab
THIN_COLUMNS = 16  # thin products take a multiple of 16 columns (thin_matmul)
DENSE_SVD_MAX = 512  # min(m, n) up to which the tuned top-k comes from a dense fp64 Gram matrix (dense_is_cheaper)


BASIS_KINDS = ("householder", "explicit64", "explicit32")
CHECKED_VECTORS = 4  # top base vectors of a cached basis checked against W0 before its answers are used
ORTHONORMAL_DEFECT = 1e-12  # max |Q^T Q - I| of a Cholesky-orthonormalised Krylov block (else Householder QR)
CHECK_TOLERANCE = 1e-3  # relative: ||M0 M0^T x_i - σ_i² x_i|| against σ_1² (an fp32 basis is good to ~1e-7)


def krylov_block(k: int) -> int:
    """Columns of a Krylov block for the top ``k`` (and of the start block :func:`lorafft.analysis.start_block`
    fills): ``max(2k, k + 10)``, the one place this rule is written."""
    return max(2 * k, k + 10)


def dense_is_cheaper(m: int, n: int, block_size: int = 0) -> bool:
    """The size rule between the tuned top-k's two paths for ``[m, n]`` matrices, ``s = min(m, n)``: dense fp64
    LAPACK (:func:`_dense_svd`, matrix by matrix) when ``s <= DENSE_SVD_MAX`` or when the Krylov space would
    need a third of the small side (``3 * block_size >= s``); certified block Krylov iteration otherwise.

    Measured on stacks of four square s×s matrices with rank-8 LoRA updates, one thread (``python
    benchmarks/small_models.py --crossover``, best of three, ``benchmarks/results/small_models.json``): dense 0.013 s
    against Krylov 0.036 s at s = 256, 0.030 / 0.064 s at 384, 0.063 / 0.089 s at 512, but 0.183 / 0.130 s at 768:
    the crossover lies between 512 and 768, so the limit is 512. Both paths certify their vectors by measured
    residuals, and the exactness tests hold each of them to fp64 (``tests/test_exactness.py`` runs through both,
    ``tuned_path``).
    """
    s = min(m, n)
    return s <= DENSE_SVD_MAX or 3 * block_size >= s


def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """``"torch"`` or ``"triton"``: ``backend``, else ``$LORAFFT_BACKEND``, else ``"auto"`` (Triton kernels for
    CUDA tensors when triton imports, torch.linalg / torch ops otherwise). fp64 weights (``dtype``) always go to
    torch, on any device: the kernels have no fp64 path. Forcing ``"triton"`` on the CPU needs
    ``TRITON_INTERPRET=1`` (the tests do that). InputError for another name, or for ``"triton"`` without triton."""
    source = "backend" if backend else "LORAFFT_BACKEND"
    choice = backend or os.environ.get("LORAFFT_BACKEND", "auto")
    if choice not in BACKENDS:
        raise InputError(source, f"must be one of {', '.join(BACKENDS)}, got {choice!r}")
    installed = _triton_installed()
    if choice == "triton" and not installed:
        raise InputError(source, "'triton' asked for, but triton is not installed (pip install 'lorafft[triton]')")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(source, f"'triton' runs on CUDA tensors, not on {device.type} (there only under "
                                 f"TRITON_INTERPRET=1, for testing): use the torch backend or a CUDA device")
    if dtype == torch.float64:
        return "torch"
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" and installed else "torch"


@functools.cache
def _triton_installed() -> bool:
    """Whether triton can be imported (looked up once: every batch resolves its backend)."""
    return importlib.util.find_spec("triton") is not None


@dataclass
class LowRank:
    """A low-rank term ``scale * B @ A`` kept factored (a LoRA update ΔW = s·B·A, never formed).

    B: ``[L, m, r]``, A: ``[L, r, n]`` (any float dtype), scale: ``[L]`` (s per matrix)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: torch.Tensor

    def select(self, rows: list[int]) -> LowRank:
        """The updates of the matrices ``rows`` of the stack."""
        return LowRank(B=self.B[rows], A=self.A[rows], scale=self.scale[rows])

    def to(self, device, dtype: torch.dtype | None = None) -> LowRank:
        return LowRank(B=self.B.to(device, dtype), A=self.A.to(device, dtype), scale=self.scale.to(device, dtype))

    def times(self, X: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``s·B (A X)`` or, with ``transpose``, ``s·A^T (B^T X)`` for a thin fp64 block X, in fp64 (no copy when
        the factors are fp64 on X's device already, as :func:`truncated_svd` makes them once)."""
        B, A = self.B.to(X.device, torch.float64), self.A.to(X.device, torch.float64)
        scale = self.scale.to(X.device, torch.float64)[:, None, None]
        return scale * (A.mT @ (B.mT @ X) if transpose else B @ (A @ X))

    def dense(self) -> torch.Tensor:
        """``s·B·A`` formed, ``[L, m, n]`` fp64 (for matrices small enough for a dense SVD)."""
        return self.scale.double()[:, None, None].to(self.B.device) * (self.B.double() @ self.A.double())


def operand(W: torch.Tensor, backend: str, scale: Scale | None = None):
    """``(W, scale)`` as :func:`product` multiplies them with ``backend``: as stored for the Triton kernels; for
    torch dequantised, and fp32 when stored in 16 bits (torch would multiply in the stored (b)f16)."""
    if backend != "torch":
        return W, None if scale is None else scale.to(W.device)
    W = dequantized(W, scale)
    return (W if W.dtype in (torch.float32, torch.float64) else W.float()), None


def product(W: torch.Tensor, X: torch.Tensor, *, transpose: bool, backend: str,
            low_rank: LowRank | None = None, scale: Scale | None = None) -> torch.Tensor:
    """``(W scale + low_rank) @ X`` or its transpose times X, for ``W [L, m, n]`` and a thin fp64 block X, in fp64:
    one pass over W. The batched Triton sketch kernel (W read once in its stored dtype with its dequantisation
    ``scale``, fp32-accurate tensor-core products, fp32 accumulation) or torch in W's dtype (W and scale as
    :func:`operand` gives them); the low-rank term through its thin factors."""
    if backend == "triton":
        from lorafft.kernels.sketch import sketch

        values, block = (None, None) if scale is None else (scale.values, scale.block)
        product = sketch(W, X, transpose=transpose, scale=values, scale_block=block).double()
    else:
        with _full_precision_fp32_matmul():  # X row-major: a QR's column-major Q against W^T takes a 20x slower path
            product = thin_matmul(W.mT if transpose else W, X.to(W.dtype)).double()
    return product if low_rank is None else product + low_rank.times(X, transpose)


@contextlib.contextmanager
def _full_precision_fp32_matmul():
    """fp32 matmuls in full fp32 (no TF32 passes on CUDA) whatever the caller set with
    ``torch.set_float32_matmul_precision``: the certified residuals need fp32-accurate products."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def dequantized(W: torch.Tensor, scale: Scale | None) -> torch.Tensor:
    """``W [L, m, n]`` itself without a scale, else ``W · scale`` in fp32 (:meth:`Scale.apply`)."""
    return W if scale is None else scale.apply(W)


def _gram_upper(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Upper triangle of ``W @ W.mT`` in ``dtype`` for ``W [L, s, d]`` (below it only the diagonal blocks are filled,
    the rest is zero): about half the flops of a full product, and all that the symmetric eigen-solvers read.
    Row-major upper is LAPACK's column-major lower, so ``gram[l].numpy().T`` goes to LAPACK without a copy. W is
    converted a slab of columns at a time, so no full-size copy in ``dtype`` is made (for a 28672×8192 fp32 weight
    that copy would be 1.9 GB)."""
    L, s, d = W.shape
    gram = torch.zeros(L, s, s, dtype=dtype, device=W.device)
    columns = max(256, math.ceil(s / 8))
    for start in range(0, d, SLAB_COLUMNS):
        slab = W[:, :, start : start + SLAB_COLUMNS].to(dtype)
        for first in range(0, s, columns):
            stop = min(s, first + columns)
            gram[:, :stop, first:stop] += slab[:, :stop] @ slab[:, first:stop].mT
    return gram


def matmul_fp64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` in fp64 for ``A [L, p, q]`` of any dtype and a thin ``B [L, q, c]``: A widened to fp64 a slab of rows
    at a time (:func:`widened_rows`), no fp64 copy of A. For ``A = W^T`` of a row-major W, W's rows are widened and
    their products summed (gathering A's rows from W's columns took twice as long for a 4096² W)."""
    B = B.to(A.device, torch.float64).contiguous()  # once, not once per slab
    transposed = not A.is_contiguous() and A.mT.is_contiguous()
    W = A.mT if transposed else A
    result = (torch.zeros if transposed else torch.empty)(*A.shape[:2], B.shape[-1], dtype=torch.float64,
                                                           device=A.device)
    start = 0
    for slab in widened_rows(W):
        rows = slice(start, start + slab.shape[1])
        if transposed:
            result.baddbmm_(slab.mT, B[:, rows])
        else:
            torch.matmul(slab, B, out=result[:, rows])
        start = rows.stop
    return result


def thin_matmul(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``W @ X`` for ``W [L, p, q]`` and a thin ``X [L, q, c]`` of W's dtype; in fp32, X's columns padded with zeros
    to a multiple of :data:`THIN_COLUMNS`: on this project's CPU MKL multiplies a 4096² fp32 W by 11 columns in 1.9x
    (W) and 4.8x (Wᵀ) the time it takes for 16 (``pytest benchmarks/test_bench_linalg.py -k thin``); its fp64
    products did not gain from padding."""
    columns = X.shape[-1]
    if W.dtype == torch.float32:
        X = torch.nn.functional.pad(X, (0, -columns % THIN_COLUMNS))
    return (W @ X.contiguous())[..., :columns]


def widened_rows(A: torch.Tensor):
    """The slabs of rows of ``A [L, p, q]`` widened to fp64 (thin products with W, its row norms, ΔM and ΔD): on a CPU
    :data:`WIDENED_ELEMENTS` elements each, small enough to stay in cache while they are used (measured on this
    project's CPU: 4x faster than slabs of 2048 columns for a 4096×11008 product with 16 columns); on a GPU
    :data:`DEVICE_WIDENED_ELEMENTS`, so that a stack takes a few launches, not hundreds.

    Every slab is a view of one buffer, overwritten by the next: use each before taking the next (a fresh slab per
    step made a 4096² product with 16 columns 3.5x slower on this project's CPU)."""
    elements = WIDENED_ELEMENTS if A.device.type == "cpu" else DEVICE_WIDENED_ELEMENTS
    rows = min(A.shape[1], max(1, elements // max(1, A.shape[0] * A.shape[-1])))
    buffer = torch.empty(A.shape[0], rows, A.shape[-1], dtype=torch.float64, device=A.device)
    for start in range(0, A.shape[1], rows):
        slab = buffer[:, : min(rows, A.shape[1] - start)]
        slab.copy_(A[:, start : start + rows])
        yield slab


def _lapack_tridiagonal_eigh(gram: np.ndarray):
    """Eigen-decomposition of one symmetric matrix in the factored form ``G = Q Z diag(lam) Z^T Q^T``:
    Householder tridiagonalisation (LAPACK ?sytrd) and divide-and-conquer on the tridiagonal (?stevd). Forming
    ``Q Z`` explicitly (?ormtr) is skipped: projections need only ``Z^T (Q^T y)`` for a few vectors y.

    gram: ``[s, s]`` Fortran-ordered, lower triangle read; overwritten in place by the reflectors defining Q.
    Returns ``(tau [s-1], lam [s] ascending, Z [s, s])`` as numpy arrays of gram's dtype.
    """
    from scipy.linalg import lapack

    sytrd, sytrd_lwork, stevd = lapack.get_lapack_funcs(("sytrd", "sytrd_lwork", "stevd"), (gram,))
    lwork, info = sytrd_lwork(gram.shape[0], lower=1)
    reflectors, diagonal, off_diagonal, tau, info = sytrd(gram, lower=1, lwork=int(lwork), overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"?sytrd failed with info={info}")
    if not np.shares_memory(reflectors, gram):
        gram[...] = reflectors
    lam, Z, info = stevd(diagonal, off_diagonal, compute_v=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"?stevd failed with info={info}")
    return tau, lam, Z


@dataclass
class BaseBasis:
    """All singular vectors of a stack of base matrices ``W0 [L, m, n]``, kept as the eigen-decomposition of
    the smaller side's Gram matrix (``s = min(m, n)``): ``W0 W0^T`` when ``m <= n`` (left side small), else
    ``W0^T W0``. The small side's basis X (the paper's x_i of that side) comes in one of three forms, its ``kind``:

    * ``"householder"``: ``X = Q Z`` in fp64, Q the LAPACK ``?sytrd`` reflectors (``reflectors``, ``tau``) and Z
      the tridiagonal problem's eigenvectors: what :func:`base_basis` builds on the CPU, never formed whole;
    * ``"explicit64"``: ``X = Z`` fp64 (``torch.linalg.eigh`` on a GPU; a tracker's small matrices);
    * ``"explicit32"``: ``X = Z`` fp32, from a base cache (or a tracker's large matrices): not orthonormal to fp64
      (about 1e-7), so answers computed in its coordinates are certified on the matrix itself.

    The other side's basis is recovered by one product, ``W0^T X / sigma``.

    sigma: ``[L, s]`` fp64, descending (sqrt of the Gram eigenvalues; the paper's base singular values).
    row_norms: ``[L, m]`` fp64, ``||w_0,i||²`` of W0's rows (DoRA's ΔM and ΔD), when known without reading W0 again.
    verified: False for a basis read from a cache whose top vectors were not yet checked against W0
    (:func:`answers_for`).
    """

    W0: torch.Tensor  # [L, m, n] as given (products with it are done in fp64, a slab at a time)
    sigma: torch.Tensor  # [L, s] fp64, descending
    Z: torch.Tensor  # [L, s, s], columns ordered by descending sigma
    kind: str
    reflectors: torch.Tensor | None = None  # [L, s, s] LAPACK ?sytrd output (lower, column-major): "householder"
    tau: torch.Tensor | None = None  # [L, s-1]: "householder"
    gram: torch.Tensor | None = None  # [L, s, s] fp64 small-side Gram matrix, kept for s <= DENSE_SVD_MAX (_dense_svd)
    row_norms: torch.Tensor | None = None
    verified: bool = True

    def __post_init__(self):
        expected = {"householder": (self.Z.dtype, True), "explicit64": (torch.float64, False),
                    "explicit32": (torch.float32, False)}.get(self.kind)
        if expected is None or (self.Z.dtype, self.reflectors is not None) != expected:
            raise ValueError(f"a {self.kind!r} basis cannot hold Z of {self.Z.dtype} with"
                             f"{'' if self.reflectors is not None else 'out'} reflectors")

    @property
    def small_side(self) -> str:
        return "left" if self.W0.shape[-2] <= self.W0.shape[-1] else "right"

    def select(self, rows: list[int]) -> BaseBasis:
        """The bases of the matrices ``rows`` of the stack (the same object when that is all of them)."""
        if rows == list(range(self.sigma.shape[0])):
            return self
        pick = (lambda t: None if t is None else t[rows])
        return BaseBasis(W0=self.W0[rows], sigma=self.sigma[rows], Z=self.Z[rows], kind=self.kind,
                         reflectors=pick(self.reflectors), tau=pick(self.tau), gram=pick(self.gram),
                         row_norms=pick(self.row_norms), verified=self.verified)

    def _reflect(self, Y: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``Q^T Y`` (``transpose``) or ``Q Y`` for ``Y [L, s, k]``; Q = I when there are no reflectors."""
        if self.reflectors is None:
            return Y
        reflectors, tau = self.reflectors.to(Y.dtype), self.tau.to(Y.dtype)
        tail = torch.ormqr(reflectors[:, 1:, :-1], tau, Y[:, 1:], left=True, transpose=transpose)
        return torch.cat([Y[:, :1], tail], dim=1)

    def _small_to_eigen(self, Y: torch.Tensor) -> torch.Tensor:
        """``X_small^T Y`` for ``Y [L, s, k]`` (in Y's dtype): coordinates of Y in the small side's basis."""
        return self.Z.to(Y.dtype).mT @ self._reflect(Y, transpose=True)

    def coordinates(self, Y: torch.Tensor) -> torch.Tensor:
        """``X^T Y`` ``[L, s, c]`` fp64 for small-side vectors ``Y [L, s, c]``: their coordinates in the small side's
        basis, row i for the base vector of the i-th largest σ (with an fp32 basis, one fp32 product: the basis's own
        precision)."""
        Y = Y.to(self.Z.device, torch.float64)
        if self.kind == "explicit32":  # as precise as the basis itself, in one fp32 product
            with _full_precision_fp32_matmul():
                return thin_matmul(self.Z.mT, Y.float()).double()
        return self._small_to_eigen(Y)

    def small_vectors(self, Y: torch.Tensor) -> torch.Tensor:
        """``X Y`` ``[L, s, c]`` fp64: small-side vectors from their coordinates ``Y [L, s, c]``."""
        Y = Y.to(self.Z.device, torch.float64)
        if self.kind == "explicit32":
            with _full_precision_fp32_matmul():
                return thin_matmul(self.Z, Y.float()).double()
        return self._reflect(self.Z @ Y, transpose=False)

    def project(self, Y: torch.Tensor, side: str) -> torch.Tensor:
        """Cosines ``X^T Y`` of unit vectors ``Y [L, d, k]`` against every base singular vector of ``side``.

        Returns ``[L, s, k]`` in Y's dtype, row i for the base vector of the i-th largest singular value.
        The small side is computed in the basis dtype. On the larger side the base vectors are
        ``W0^T x_i / sigma_i`` (reduced SVD): that side is computed in fp64, since dividing by a small sigma_i
        amplifies rounding, and a singular value of zero leaves its row undefined (set to 0).
        """
        if side == self.small_side:
            return self._small_to_eigen(Y.to(self.Z.dtype)).to(Y.dtype)
        image = matmul_fp64(self.W0 if self.small_side == "left" else self.W0.mT, Y)
        inverse_sigma = torch.where(self.sigma > 0, 1.0 / self.sigma, 0.0).double()
        return (self._small_to_eigen(image) * inverse_sigma.unsqueeze(-1)).to(Y.dtype)

    @functools.cached_property
    def small_basis_fp32(self) -> torch.Tensor:
        """The small side's basis explicitly, ``[L, s, s]`` fp32 (column i the i-th base vector), formed on first
        use and kept, so the matches of every side and checkpoint against this basis convert it once."""
        if self.reflectors is None:
            return self.Z.to(torch.float32)
        return self.top_vectors(self.small_side, self.sigma.shape[-1]).to(torch.float32)

    def top_vectors(self, side: str, count: int) -> torch.Tensor:
        """The first ``count`` base singular vectors of ``side`` explicitly, ``[L, d, count]`` fp64."""
        count = min(count, self.sigma.shape[-1])
        small = self._reflect(self.Z[..., :count], transpose=False).double()  # X_small @ (first count unit vectors)
        if side == self.small_side:
            return small
        other = matmul_fp64(self.W0.mT if self.small_side == "left" else self.W0, small)
        sigma = self.sigma[:, :count]
        return other * torch.where(sigma > 0, 1.0 / sigma, 0.0).unsqueeze(1)  # 0 where sigma_i = 0, as in project

    def checked_vectors(self) -> torch.Tensor:
        """The top :data:`CHECKED_VECTORS` small-side base vectors ``[L, s, c]`` fp64, which :meth:`answers` checks."""
        return self.top_vectors(self.small_side, CHECKED_VECTORS)

    def answers(self, image: torch.Tensor) -> torch.Tensor:
        """``[L]`` bool: whether this basis answers for its matrix W0, from ``image = M0 M0^T X_c`` (M0 W0 in the
        small side's orientation, X_c :meth:`checked_vectors`): the checked vectors are unit and
        ``||M0 M0^T x_i - σ_i² x_i|| <= CHECK_TOLERANCE σ_1²``. A basis of another matrix, or of this one in the other
        orientation (a square GPT-2 ``Conv1D`` weight), fails it."""
        X = self.checked_vectors()
        count = X.shape[-1]
        residual = (image.to(X.device) - X * self.sigma[:, None, :count] ** 2).norm(dim=1).amax(dim=-1)
        unit = (X.norm(dim=1) - 1).abs().amax(dim=-1) <= CHECK_TOLERANCE
        top = self.sigma[:, 0].clamp_min(torch.finfo(torch.float64).tiny) ** 2
        return unit & (residual <= CHECK_TOLERANCE * top)

    def verify(self, backend: str = "torch") -> torch.Tensor:
        """:meth:`answers` with its two thin products with W0 computed here: ``[L]`` bool."""
        W, _ = operand(self.W0, backend)
        transposed = self.small_side == "right"
        X = self.checked_vectors()
        back = product(W, product(W, X, transpose=not transposed, backend=backend), transpose=transposed,
                       backend=backend)
        return self.answers(back)

    def base_rows(self) -> torch.Tensor:
        """``||w_0,i||²`` ``[L, m]`` fp64: :attr:`row_norms`, or from the basis when the left side is the small one
        (``sum_j σ_j² x_j[i]²``), else one pass over W0; kept for the next call."""
        if self.row_norms is None:
            if self.small_side == "left" and self.reflectors is None:
                self.row_norms = (self.Z.double() ** 2) @ (self.sigma**2).unsqueeze(-1)
                self.row_norms = self.row_norms.squeeze(-1)
            else:
                self.row_norms = row_norms(self.W0)
        return self.row_norms


def row_norms(W: torch.Tensor) -> torch.Tensor:
    """``||w_i||²`` ``[L, m]`` fp64 of the rows of ``W [L, m, n]`` (any dtype), widened a slab of rows at a time."""
    return torch.cat([slab.square().sum(dim=-1) for slab in widened_rows(W)], dim=1)


def base_basis(W0: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> BaseBasis:
    """Exact (full) singular basis of both sides of ``W0 [L, m, n]`` from the smaller side's Gram matrix.

    The Gram matrix squares the condition number, so it is formed and decomposed in fp64 by default: on
    all-MiniLM-L6-v2's query matrices (sigma from 5.8 down to 0.0016) an fp32 Gram put max|cos| off by up to
    0.12 against fp64 SVD, fp64 by under 1e-9 (``benchmarks/measure_claims.py``). On the CPU the symmetric
    eigen-problem goes through LAPACK's tridiagonal route without forming the basis (4.2 s against 8.2 s for
    ``torch.linalg.eigh`` at 4096, same script): a ``"householder"`` basis; on other devices ``torch.linalg.eigh``
    gives an ``"explicit64"`` one. W0's row norms come with it (the Gram diagonal when the left side is small, one
    pass otherwise). Device memory at the peak, per matrix: the Gram matrix and ``eigh``'s eigenvectors, ``16 s²``
    bytes, plus the solver's workspace for one matrix (:mod:`lorafft.memory`).
    """
    small = W0 if W0.shape[-2] <= W0.shape[-1] else W0.mT
    gram = _gram_upper(small, dtype)
    L, s, _ = gram.shape
    rows = gram.diagonal(dim1=-2, dim2=-1).double().clone() if small is W0 else row_norms(W0)
    kept = None  # the Gram matrix itself, for the dense top-k of LoRA updates of small matrices (_dense_svd)
    if s <= DENSE_SVD_MAX and dtype == torch.float64:
        kept = gram.triu() + gram.triu(1).mT  # the upper triangle mirrored (LAPACK overwrites gram below)
    if gram.device.type == "cpu" and s > 1:
        lam = torch.empty(L, s, dtype=dtype)
        Z = torch.empty(L, s, s, dtype=dtype).mT  # column-major like LAPACK's, so the copy below is by columns
        tau = torch.empty(L, s - 1, dtype=dtype)
        for g, lam_g, Z_g, tau_g in zip(gram, lam, Z, tau):
            tau_lapack, lam_lapack, Z_lapack = _lapack_tridiagonal_eigh(g.numpy().T)
            tau_g.numpy()[:] = tau_lapack
            lam_g.numpy()[:] = lam_lapack
            Z_g.numpy()[:] = Z_lapack[:, ::-1]  # columns by descending sigma
        return BaseBasis(W0=W0, sigma=_sigma(lam), Z=Z, kind="householder", reflectors=gram.mT, tau=tau,
                         gram=kept, row_norms=rows)  # LAPACK overwrote the Gram matrix with the reflectors
    lam, Z = torch.linalg.eigh(gram, UPLO="U")
    del gram  # before the columns are reordered: one matrix's copy at a time, not the batch's
    for index in range(L):
        Z[index] = Z[index].flip(-1)
    return BaseBasis(W0=W0, sigma=_sigma(lam), Z=Z.to(dtype), kind="explicit64" if dtype == torch.float64 else
                     "explicit32", gram=kept, row_norms=rows)


def _sigma(lam: torch.Tensor) -> torch.Tensor:
    """Singular values ``[L, s]`` fp64, descending, from a Gram matrix's ascending eigenvalues ``lam [L, s]``."""
    return lam.flip(-1).double().clamp_min(0).sqrt()


METHODS = ("dense", "krylov", "update")


@dataclass
class TruncatedSVD:
    """Top-k singular triplets of a stack ``W [L, m, n]``: ``W v_j ≈ sigma_j u_j``.

    U: ``[L, m, k]``, S: ``[L, k]``, V: ``[L, n, k]`` (fp64). ``error_bound [L, k]``: a bound on the distance
    between each computed vector and the exact one (sign-aligned), hence on the error of any max|cos| computed
    from it; ``inf`` where the singular value is not separated from its neighbours (the vector is then not
    determined by the matrix, and no method can certify it). ``residual [L, k]``: ``||W v_j - sigma_j u_j||``.
    ``iterations``: Krylov iterations used (0 for a dense SVD; for the update path, its iterations in the base's
    coordinates). ``method``: which of :data:`METHODS` answered (:func:`lorafft.analysis.tuned_top` chooses).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    residual: torch.Tensor
    error_bound: torch.Tensor
    iterations: int
    method: str = "krylov"


def orthonormalize(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal columns spanning ``block [L, m, b]`` minus its projection on ``basis [L, m, D]`` (fp64;
    classical Gram–Schmidt and QR, twice; one Householder QR without a basis)."""
    for _ in range(1 if basis is None else 2):
        if basis is not None:
            block = block - basis @ (basis.mT @ block)
        block, _ = torch.linalg.qr(block)
    return block


def cholesky_orthonormalize(block: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`orthonormalize` by Cholesky QR: after each of the two Gram–Schmidt projections, the columns scaled to
    unit length, their ``b×b`` Gram matrix's Cholesky factor R and ``block R^-1`` (products and a triangular solve,
    which a GPU runs in a few launches, where Householder QR of a tall block is a sequence of small panel steps).
    Returns the block and ``[L]`` bool: where it is orthonormal, and orthogonal to ``basis``, to
    :data:`ORTHONORMAL_DEFECT`. A block near rank-deficient after the projection (its columns nearly dependent) makes
    Cholesky QR lose orthogonality or fail (False here): the caller reads the flags at its next host
    synchronisation, not here, and redoes such a block with :func:`orthonormalize`. A failed factorisation's NaN are
    returned as 0, so that the Rayleigh–Ritz step run before that read (whose ``eigh`` refuses NaN) completes."""
    for _ in range(2):
        block = block - basis @ (basis.mT @ block)
        norms = block.norm(dim=-2, keepdim=True)
        block = block / torch.where(norms > 0, norms, 1.0)
        factor, _ = torch.linalg.cholesky_ex(block.mT @ block, upper=True)
        block = torch.linalg.solve_triangular(factor, block, upper=True, left=False)
    eye = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)
    defect = torch.maximum((block.mT @ block - eye).abs().amax(dim=(-2, -1)),
                           (basis.mT @ block).abs().amax(dim=(-2, -1)))
    return torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0), defect <= ORTHONORMAL_DEFECT


def finished(bound: torch.Tensor, residual: torch.Tensor, previous: torch.Tensor | None, floor: torch.Tensor,
             tol: float) -> torch.Tensor:
    """The iterations' stopping rule, per matrix ``[L]`` bool: every vector's ``bound [L, k]`` is ``<= tol``, or
    its ``residual [L, k]`` is at the rounding floor of the products (``<= floor [L, 1]``) and stopped falling (less
    than halved since the ``previous`` iteration's residual): it is then as determined as the matrix makes it, and
    its bound says how well."""
    stalled = torch.zeros_like(bound, dtype=torch.bool) if previous is None else (
        (residual <= floor) & (residual > 0.5 * previous))
    return ((bound <= tol) | stalled).all(dim=-1)


def error_bounds(theta: torch.Tensor, residual: torch.Tensor, k: int) -> torch.Tensor:
    """Wedin-type bound ``sqrt(2) * rho_j / delta_j`` for the first k Ritz pairs.

    theta, residual: ``[L, D]`` Ritz values (descending) and their residual norms ``rho_i = ||W v_i - theta_i u_i||
    = ||W W^T u_i - theta_i² u_i|| / theta_i``. ``delta_j`` is the distance from theta_j to the other singular values
    of W, each of which lies within ``min(rho_i, sqrt(rho_i theta_i))`` of its Ritz value (``|σ² - theta_i²| <=
    rho_i theta_i`` gives both; the second keeps a Ritz value near zero, whose rho_i divides rounding by a tiny
    theta_i, from swallowing the spectrum); ``sqrt(2) sin(angle)`` bounds the distance between sign-aligned unit
    vectors.
    """
    radius = torch.minimum(residual, (residual * theta.clamp_min(0)).sqrt())
    distance = (theta[:, :k, None] - theta[:, None, :]).abs() - radius[:, None, :]
    distance.diagonal(dim1=1, dim2=2).fill_(math.inf)
    delta = distance.amin(dim=-1)
    bound = math.sqrt(2.0) * residual[:, :k] / delta
    return torch.where(delta > 0, bound.clamp(max=2.0), torch.full_like(bound, math.inf))


def _dense_svd(W: torch.Tensor, k: int, low_rank: LowRank | None = None,
               base_gram: torch.Tensor | None = None) -> TruncatedSVD:
    """Top-k triplets of ``W [L, m, n]`` (plus ``low_rank``) by dense fp64 LAPACK, for matrices too small (or k too
    large) for Krylov iteration to pay off (:func:`dense_is_cheaper`).

    From the fp64 Gram matrix of the smaller side, only its top ``q = k + 1`` eigenpairs (LAPACK ?syevr on the CPU:
    a quarter of a full SVD's time at 384²); the other side's vectors by one product, and the residual of the side
    that product does not fix (``W v - σ u`` or ``W^T u - σ v``) measured in fp64 against the matrix, so that the
    bound of :func:`error_bounds` is certified as the Krylov path's is. With a LoRA update and W's own Gram matrix
    (``base_gram [L, s, s]`` fp64, :attr:`BaseBasis.gram`), the tuned Gram matrix is that plus the update's
    low-rank terms (:func:`_gram_of_sum`) and the tuned matrix is never formed. When a top-k singular value is below
    what an fp64 Gram matrix resolves (``sqrt(eps) σ1``; rank below k) the product does not define its vectors:
    then a full fp64 SVD."""
    left = W.shape[-2] <= W.shape[-1]
    low_rank = None if low_rank is None else low_rank.to(W.device, torch.float64)
    factored = low_rank is not None and base_gram is not None
    dense = W.double() if low_rank is None or factored else W.double() + low_rank.dense()  # W alone when factored
    if factored:
        gram = _gram_of_sum(dense, low_rank, left, base_gram.to(W.device, torch.float64))
    else:
        small = dense if left else dense.mT  # [L, s, d]: the Gram side first
        gram = small @ small.mT

    def tuned(X: torch.Tensor, transpose: bool) -> torch.Tensor:
        """The tuned matrix (or its transpose) times ``X`` in fp64."""
        product = (dense.mT if transpose else dense) @ X
        return product + low_rank.times(X, transpose) if factored else product

    lam, X = _top_eigenpairs(gram, min(k + 1, gram.shape[-1]))  # descending; X [L, s, q]
    theta = lam.clamp_min(0).sqrt()
    keep = theta > theta[:, :1] * math.sqrt(torch.finfo(torch.float64).eps)  # what a fp64 Gram resolves
    if not bool(keep[:, :k].all()):
        return _full_svd(dense + low_rank.dense() if factored else dense, k)
    Y = tuned(X, left) * torch.where(keep, 1.0 / theta, 0.0).unsqueeze(1)  # [L, d, q]; 0 for a (k+1)-th σ of ~0
    residual = (tuned(Y, not left) - X * theta.unsqueeze(1)).norm(dim=1)  # the side the product does not fix
    U, V = (X, Y) if left else (Y, X)
    return TruncatedSVD(U[..., :k], theta[:, :k], V[..., :k], residual[:, :k], error_bounds(theta, residual, k), 0,
                        "dense")


def _gram_of_sum(W: torch.Tensor, low_rank: LowRank, left: bool, gram: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the smaller side of ``W + low_rank`` from W's own, ``gram [L, s, s]`` (all fp64):
    ``gram + F C F^T`` (:func:`update_factors`). One product of inner size 2r: ``O(s d r + s² r)``, not the
    ``O(s² d)`` of forming a Gram matrix."""
    F, C = update_factors(W, low_rank, left)
    return torch.baddbmm(gram, F, C @ F.mT)


def update_factors(W: torch.Tensor, low_rank: LowRank, left: bool,
                   image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms a LoRA update adds to the smaller side's Gram matrix: for ``left`` (``m <= n``),
    ``(W + s B A)(W + s B A)^T = W W^T + F C F^T`` with ``F = [W A^T, B]`` ``[L, s, 2r]`` and
    ``C = [[0, s I], [s I, s² A A^T]]`` ``[L, 2r, 2r]``; else the same with ``W^T`` for W, ``A^T`` for B and
    ``B^T`` for A. ``image``: ``W A^T`` (``W^T B``) when the caller has it (:func:`update_image`, one pass over W);
    else formed from W in fp64. All fp64."""
    first, second = (low_rank.B, low_rank.A) if left else (low_rank.A.mT, low_rank.B.mT)  # the small orientation
    L, r = first.shape[0], first.shape[-1]
    if image is None:
        image = (second @ (W.mT if left else W).double()).mT  # (A W^T)^T: BLAS streams W by rows
    F = torch.cat([image.to(first.device, torch.float64), first.double()], dim=-1)
    scale = low_rank.scale.double()[:, None, None]
    eye = torch.eye(r, dtype=torch.float64, device=first.device).expand(L, r, r)
    C = torch.cat([torch.cat([torch.zeros_like(eye), scale * eye], -1),
                   torch.cat([scale * eye, scale**2 * (second.double() @ second.double().mT)], -1)], -2)
    return F, C


def update_image(W: torch.Tensor, low_rank: LowRank, backend: str) -> torch.Tensor:
    """``W A^T [L, m, r]`` when the left side is the small one (``m <= n``), else ``W^T B [L, n, r]``, fp64: the
    one product with W0 that the update path (:mod:`lorafft.updating`) needs, in one pass over W. ``W A^T`` is
    computed in fp64 (W widened a slab at a time): DoRA's ΔM and ΔD reuse it, to fp64 accuracy."""
    if W.shape[-2] <= W.shape[-1]:
        return matmul_fp64(W, low_rank.A.to(W.device, torch.float64).mT)
    W, _ = operand(W, backend)
    return product(W, low_rank.B.to(W.device, torch.float64), transpose=True, backend=backend)


def _top_eigenpairs(gram: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``q`` largest eigenvalues ``[L, q]`` (descending) and eigenvectors ``[L, s, q]`` of symmetric fp64
    ``gram [L, s, s]``: SciPy's LAPACK ?syevr with an index range, per matrix, on the CPU; ``torch.linalg.eigh``
    (all of them) on other devices or when ``q = s``."""
    s = gram.shape[-1]
    if gram.device.type != "cpu" or q == s:
        lam, X = torch.linalg.eigh(gram)
        return lam.flip(-1)[:, :q], X.flip(-1)[..., :q]
    from scipy.linalg import eigh

    pairs = [eigh(g.numpy(), subset_by_index=[s - q, s - 1], driver="evr", check_finite=False) for g in gram]
    lam = torch.from_numpy(np.stack([values[::-1].copy() for values, _ in pairs]))
    return lam, torch.from_numpy(np.stack([vectors[:, ::-1].copy() for _, vectors in pairs]))


def _full_svd(dense: torch.Tensor, k: int) -> TruncatedSVD:
    """Top-k of fp64 ``dense [L, m, n]`` from one batched full LAPACK SVD, residuals at its backward error."""
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    residual = (S[:, :1] * torch.finfo(torch.float64).eps * math.sqrt(max(dense.shape[-2:]))).expand_as(S).clone()
    return TruncatedSVD(U[..., :k], S[:, :k], Vh.mT[..., :k], residual[:, :k], error_bounds(S, residual, k), 0,
                        "dense")


def _random_block(shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
    """Standard normal fp64 block ``[L, n, c]`` drawn on ``device``: from one generator for the whole stack, or from
    a list of one generator per matrix (:func:`lorafft.analysis.matrix_generators`: each matrix's draw then does not
    depend on which matrices share its batch). A generator on another device (a CPU generator for CUDA tensors)
    seeds a generator on ``device`` with one draw, so results are reproducible per device; on the CPU the values
    are ``torch.randn(..., generator=generator)``'s."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_random_block((1, *shape[1:]), g, device) for g in generator])
    if generator is not None and generator.device.type != device.type:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)


@dataclass
class _Ritz:
    """Rayleigh–Ritz on ``span(Q)`` for W: ``theta [L, D]`` descending, ``U_hat [L, D, D]`` (Ritz vectors in Q's
    coordinates), ``U = Q U_hat``, ``residual [L, D]`` ``||W v - theta u||`` (the side Rayleigh–Ritz does not make
    zero) and the rows ``B = Q^T W`` it came from."""

    theta: torch.Tensor
    U_hat: torch.Tensor
    U: torch.Tensor
    residual: torch.Tensor
    B: torch.Tensor

    @classmethod
    def of(cls, Q: torch.Tensor, B: torch.Tensor, P: torch.Tensor) -> _Ritz:
        """From ``Q [L, m, D]`` orthonormal, ``B = Q^T W [L, D, n]`` and ``P = W W^T Q [L, m, D]``: the SVD of B
        through the eigen-decomposition of ``B B^T [D, D]`` (fp64: the top Ritz values and vectors keep full
        accuracy; the D×D problem is cheaper than a thin SVD of B)."""
        lam, U_hat = torch.linalg.eigh(B @ B.mT)
        lam, U_hat = lam.flip(-1), U_hat.flip(-1)
        theta = lam.clamp_min(0).sqrt()
        inverse = torch.where(theta > theta[:, :1] * torch.finfo(torch.float64).eps, 1.0 / theta, 0.0)
        U = Q @ U_hat
        residual = ((P @ U_hat) * inverse.unsqueeze(1) - U * theta.unsqueeze(1)).norm(dim=1)
        return cls(theta, U_hat, U, residual, B)

    def top(self, k: int, iterations: int, method: str, transposed: bool = False) -> TruncatedSVD:
        """The top-k triplets with their residuals and bounds (W's, or Wᵀ's swapped back when ``transposed``)."""
        theta = self.theta[:, :k]
        inverse = torch.where(theta > self.theta[:, :1] * torch.finfo(torch.float64).eps, 1.0 / theta, 0.0)
        U, V = self.U[..., :k], (self.B.mT @ self.U_hat[..., :k]) * inverse[:, None, :]
        U, V = (V, U) if transposed else (U, V)
        return TruncatedSVD(U, theta, V, self.residual[:, :k], error_bounds(self.theta, self.residual, k), iterations,
                            method)


@dataclass
class Certified:
    """:func:`certify`'s answer: ``svd`` (method ``"update"``); ``checked``, ``M0 M0^T`` times the checked vectors
    (the product that rode in its passes), or None; and ``mix``, the certified small-side vectors as combinations of
    the vectors given."""

    svd: TruncatedSVD
    checked: torch.Tensor | None
    mix: torch.Tensor  # [L, q, k]: the top-k Ritz vectors are ``vectors @ mix`` (their coordinates follow the same way)


def certify(W: torch.Tensor, vectors: torch.Tensor, k: int, *, backend: str, low_rank: LowRank | None = None,
            transposed: bool = False, checked: torch.Tensor | None = None) -> Certified:
    """The top-k singular triplets of ``W + low_rank`` in ``span(vectors)``, with their measured residuals and
    bounds: one Rayleigh–Ritz step, two passes over W (what certifies an answer found elsewhere, such as in the
    base's coordinates: :mod:`lorafft.updating`). Write M for W, or for Wᵀ when ``transposed``.

    Args:
        W: ``[L, m, n]`` as :func:`truncated_svd` takes it (no FP8 scale: the update path is for LoRA updates).
        vectors: ``[L, d, q]`` approximate left singular vectors of M (W's left ones, or with ``transposed`` its
            right ones); the triplets come back as W's.
        k: triplets returned (q >= k; the others' Ritz values bound the gaps).
        backend: the products with W (:func:`resolve_backend`).
        low_rank: the LoRA update, kept factored (``s·B(A X)`` added to each product).
        checked: ``[L, d, c]`` vectors multiplied by ``M0 M0^T`` (W alone, without the update) in the same two
            passes: a cached base basis checked against W0 (:meth:`BaseBasis.answers`).
    """
    q = vectors.shape[-1]
    W, _ = operand(W, backend)
    Q, R = torch.linalg.qr(vectors.to(W.device, torch.float64))
    low_rank = None if low_rank is None else low_rank.to(W.device, torch.float64)
    block = Q if checked is None else torch.cat([Q, checked.to(W.device, torch.float64)], dim=-1)

    def times(X: torch.Tensor, transpose: bool) -> torch.Tensor:
        """(M^T or M) X, the update added to the first q columns only."""
        result = product(W, X, transpose=transpose != transposed, backend=backend)
        if low_rank is not None:
            result[..., :q] += low_rank.times(X[..., :q], transpose != transposed)
        return result

    rows = times(block, True)  # M^T [Q, checked]
    image = times(rows, False)  # M M^T [Q, checked] (M0 M0^T for the checked columns)
    ritz = _Ritz.of(Q, rows[..., :q].mT, image[..., :q])
    mix = torch.linalg.solve_triangular(R, ritz.U_hat[..., :k], upper=True)  # vectors R^-1 U_hat = Q U_hat
    return Certified(ritz.top(k, 0, "update", transposed), None if checked is None else image[..., q:], mix)


def truncated_svd(
    W: torch.Tensor,
    k: int,
    *,
    start: torch.Tensor | None = None,
    block_size: int | None = None,
    tol: float = 1e-5,
    max_iters: int = 40,
    generator=None,
    backend: str | None = None,
    low_rank: LowRank | None = None,
    scale: Scale | None = None,
    base_gram: torch.Tensor | None = None,
) -> TruncatedSVD:
    """Top-k singular triplets of ``W [L, m, n]`` (of ``W + low_rank`` when given) by block Krylov iteration with
    a certified stopping rule.

    Algorithm: block Krylov subspace iteration with full re-orthogonalisation and Rayleigh–Ritz on the span of
    every block kept so far (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
    approximate SVD"; Halko, Martinsson & Tropp 2011 for the randomized start). Left-space blocks
    ``K_0 = orth([start, W Omega])``, ``K_{j+1} = orth((I - QQ^T) W W^T K_j)``. Each iteration costs two
    products with W (``W^T K_j`` and ``W (W^T K_j)``); the Rayleigh–Ritz matrix ``Q^T W`` and the residuals
    ``W v - sigma u`` are assembled from those products without touching W again. ``orth`` after the start is
    Cholesky QR (:func:`cholesky_orthonormalize`: products, not Householder panels), checked with the stopping
    decision; a block it could not make orthonormal is redone by Householder QR before its Ritz values are used.

    Stopping rule: after each iteration, the residual ``||W v_j - sigma_j u_j||`` of every Ritz pair is turned into
    the bound of :func:`error_bounds` (``W^T u - sigma v`` is zero by construction after Rayleigh–Ritz, so it
    certifies nothing). A vector is finished when its bound is ``<= tol``, or when its residual is already small
    (``<= sqrt(eps) sigma_1``, eps of the products' precision: fp32 or fp64) and stopped falling (less than halved
    by the last iteration): it sits at the rounding floor of the products with W, and its bound says how well W
    determines it. Iteration stops when all k are finished, or after ``max_iters``. When the Krylov space would
    outgrow ``min(m, n)`` first, a dense fp64 SVD is cheaper and exact, and is used instead.

    Args:
        W: ``[L, m, n]`` fp32 or fp64, or fp16/bf16 as stored: the Triton backend reads those as they are (fp32
            accumulation), the torch backend multiplies in fp32 (one upcast copy). Everything else is fp64.
        k: number of triplets.
        start: optional left-space vectors ``[L, m, c]`` that should lie near the answer (the base matrix's top
            left singular vectors, a LoRA adapter's B columns): with them a synthetic 4096² fine-tune certifies
            in 7 iterations (``benchmarks/results/claims.json``).
        block_size: columns per block, default :func:`krylov_block`; at least a quarter of them random.
        tol: target error bound per vector (the max|cos| error it allows).
        max_iters: safety cap on iterations.
        generator: for the random start (reproducible results): one for the stack, or one per matrix.
        backend: the products with W: "torch", "triton" (:mod:`lorafft.kernels.sketch`) or "auto" (see
            :func:`resolve_backend`).
        low_rank: a LoRA update ``s·B·A`` to add to W, kept factored: each product with the sum is W's product
            plus two thin ones, so the tuned matrix of a LoRA fine-tune is never formed (W stays the base as stored).
        scale: W's fp8 dequantisation scale as stored (the matrix is ``W · scale``; a :class:`~lorafft.scales.Scale`:
            per tensor, per output channel or per ``block × block`` tile). The Triton kernel reads W and its scale as
            they are; the torch backend (and the dense path) dequantises W once in fp32.

    Small matrices (:func:`dense_is_cheaper`) go to the dense fp64 top-k (:func:`_dense_svd`) instead; ``base_gram``
    (:attr:`BaseBasis.gram` of W, fp64 ``[L, s, s]``) lets that path add a ``low_rank`` update to W's Gram matrix
    instead of forming the tuned one.

    Host synchronisations on CUDA, per iteration: two, both needed by the algorithm as it stands: the error check
    inside ``torch.linalg.eigh`` (of the fp64 Rayleigh–Ritz matrix) and the stopping decision (which reads the
    newest block's orthonormality flags in the same copy). Nothing else waits
    for the device: the random start is drawn there and the low-rank factors are moved there once, before the loop
    (``tests/test_linalg.py`` counts them on a GPU).
    """
    L, m, n = W.shape
    k = min(k, m, n)
    b = block_size or krylov_block(k)
    if dense_is_cheaper(m, n, b):
        return _dense_svd(dequantized(W, scale), k, low_rank, None if scale is not None else base_gram)
    backend = resolve_backend(W.device, backend, W.dtype)
    W, scale = operand(W, backend, scale)
    # Factors moved and converted once, not in every product: a CPU-held scale or factor would otherwise cost a
    # blocking host-to-device copy per product on CUDA.
    low_rank = None if low_rank is None else low_rank.to(W.device, torch.float64)
    n_random = b - (0 if start is None else min(start.shape[-1], b - max(1, b // 4)))
    omega = _random_block((L, n, n_random), generator, W.device)
    first = product(W, omega, transpose=False, backend=backend, low_rank=low_rank, scale=scale)
    if start is not None:
        first = torch.cat([start[..., : b - n_random].to(W.device, torch.float64), first], dim=-1)
    precision = torch.float64 if W.dtype == torch.float64 else torch.float32  # the products' precision
    small_residual = math.sqrt(torch.finfo(precision).eps)
    previous = None

    blocks = [orthonormalize(first, None)]  # K_j, [L, m, b] fp64
    rows = []  # (W^T K_j)^T, the blocks of rows of Q^T W
    images = []  # W W^T K_j
    orthonormal = None  # [L] bool: whether the newest block's Cholesky QR held (read with the stopping decision)
    iteration = 1
    while True:
        WtK = product(W, blocks[-1], transpose=True, backend=backend, low_rank=low_rank, scale=scale)  # [L, n, b]
        rows.append(WtK.mT)
        images.append(product(W, WtK, transpose=False, backend=backend, low_rank=low_rank, scale=scale))
        Q = torch.cat(blocks, -1)
        ritz = _Ritz.of(Q, torch.cat(rows, -2), torch.cat(images, -1))
        bound = error_bounds(ritz.theta, ritz.residual, k)
        done = finished(bound, ritz.residual[:, :k], previous, ritz.theta[:, :1] * small_residual, tol)
        stop, redo = _decisions(done, orthonormal)  # the iteration's one host synchronisation besides eigh's
        if redo:  # the newest block lost orthogonality: Householder QR instead, and its products again
            del rows[-1], images[-1], blocks[-1]
            blocks.append(orthonormalize(images[-1], torch.cat(blocks, -1)))
            orthonormal = None
            continue
        if stop or iteration == max_iters:
            return ritz.top(k, iteration, "krylov")
        if Q.shape[-1] + b > min(m, n):
            return _dense_svd(dequantized(W, scale), k, low_rank, None if scale is not None else base_gram)
        previous = ritz.residual[:, :k]
        block, orthonormal = cholesky_orthonormalize(images[-1], Q)
        blocks.append(block)
        iteration += 1


def _decisions(done: torch.Tensor, orthonormal: torch.Tensor | None) -> tuple[bool, bool]:
    """``(every matrix finished, the newest block must be redone)`` from ``done [L]`` and the newest block's
    :func:`cholesky_orthonormalize` flags ``[L]`` (None for a Householder block): one read from the device."""
    if orthonormal is None:
        return bool(done.all()), False
    stop, kept = torch.stack([done.all(), orthonormal.all()]).tolist()
    return stop and kept, not kept


@dataclass
class CosineMatch:
    """Per tuned vector: ``max_cos [L, k]`` = max_i |<y_j, x_i>|, ``argmax [L, k]`` (index i, 0-based by
    descending base singular value), ``intruders [L, k, E]`` bool: y_j is an intruder at eps_e (max_cos < eps_e)."""

    max_cos: torch.Tensor
    argmax: torch.Tensor
    intruders: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``[L, E]`` int64: the number of intruders at each eps_e."""
        return self.intruders.sum(dim=-2)


def match(basis: BaseBasis, vectors: torch.Tensor, side: str, eps, backend: str) -> CosineMatch:
    """max |cos| of unit vectors ``vectors [L, d, k]`` over every base singular vector of ``side``.

    With the Triton backend (the GPU path) and the small side: one fp32 ``bmm`` of the explicit basis
    (:attr:`BaseBasis.small_basis_fp32`, formed once per basis) with the vectors, at full fp32 precision, then the
    reduction. That product reads the s×s basis once; the s×k cosines it writes are k/s of that (0.1% at
    s = 8192, k = 10), so fusing the reduction into a kernel cannot gain more (``benchmarks/results/static_sm90.md``).
    Otherwise, and always on the larger side (which divides by sigma_i) or for fp64 weights (which go to torch
    everywhere): :meth:`BaseBasis.project` in fp64. Ties go to the smallest index; a NaN cosine raises ValueError.
    """
    if backend == "triton" and side == basis.small_side and basis.W0.dtype != torch.float64:
        with _full_precision_fp32_matmul():
            cosines = basis.small_basis_fp32.mT @ vectors.to(torch.float32)
    else:
        cosines = basis.project(vectors, side)
    result = max_abs_cos(cosines, eps)
    if bool(result.max_cos.isnan().any()):
        raise ValueError("max|cos| is NaN: the weights or the tuned vectors are not finite")
    return result


def max_abs_cos(cosines: torch.Tensor, eps) -> CosineMatch:
    """Reduce a cosine matrix ``[L, r, k]`` (base vectors × tuned vectors) to max |cos|, argmax (the smallest index
    among equal maxima, as ``torch.max`` documents) and the intruders at each ε."""
    max_cos, argmax = cosines.abs().max(dim=-2)
    thresholds = torch.as_tensor(list(eps), dtype=max_cos.dtype, device=max_cos.device)
    return CosineMatch(max_cos=max_cos, argmax=argmax, intruders=max_cos.unsqueeze(-1) < thresholds)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """All singular values of ``W [L, m, n]``, ``[L, min(m, n)]`` fp64 descending, from the eigenvalues of the
    smaller side's fp64 Gram matrix (no vectors: LAPACK's tridiagonal reduction and a root-free QR)."""
    small = W if W.shape[-2] <= W.shape[-1] else W.mT
    return _sigma(torch.linalg.eigvalsh(_gram_upper(small, torch.float64), UPLO="U"))


def low_rank_singular_values(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of ``scaling * B @ A`` for ``B [L, m, r]``, ``A [L, r, n]`` without forming the product:
    with ``B = Q_B R_B`` and ``A^T = Q_A R_A``, they are those of the r×r core ``R_B R_A^T``. ``[L, r]`` fp64."""
    _, R_B = torch.linalg.qr(B.double())
    _, R_A = torch.linalg.qr(A.double().mT)
    return torch.linalg.svdvals(R_B @ R_A.mT) * abs(scaling)
