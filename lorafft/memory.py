"""How many matrices of one shape a batch may hold: the memory every buffer of a batch takes at its peak.

One function (:func:`batch_peak`) predicts the bytes a batch of ``L`` same-shape matrices holds at its peak on the
device that analyses it, and :func:`batch_size` the largest ``L`` within a budget; the scan, ``cache build``, the
intervention and the tracker all cut their batches with it (:func:`lorafft.pairing.shape_batches`). Counted, per
matrix (``s = min(m, n)``, ``d = max(m, n)``):

* **inputs, twice**: the batch analysed and the one the reader thread prefetches (:mod:`lorafft.loading`): W0 and
  every full fine-tune as held (fp32, or 16-bit / FP8 as stored for the Triton kernels), a LoRA adapter's factors
  and B columns, a cached basis ``4 s²`` with its σ and row norms;
* **the base basis** of the analysed batch when it is computed: the fp64 Gram matrix and the eigenvectors,
  ``16 s²``; on the CPU LAPACK keeps its reflectors in the Gram matrix; on a GPU ``eigh``'s output, and the fp32 copy
  of the basis the match multiplies with (``4 s²``); the Gram matrix of ``s <= 512`` is kept (``8 s²``);
* **the tuned top-k**: the fp64 Krylov blocks ``Q``, ``Q^T W`` and ``W W^T Q`` of up to :data:`ITERATIONS` + 1
  blocks (``(3 m + n) · D · 8``, ``D`` columns), an fp32 copy of 16-bit weights when torch multiplies them;

and once per batch: the eigen-solver's workspace for one matrix when the basis is built (``?syevd``: ``1 + 6 s +
2 s²`` doubles, on either device), the slabs widened to fp64 (``_gram_upper``: ``L s 2048`` doubles; up to
:data:`lorafft.linalg.DEVICE_WIDENED_ELEMENTS` twice for ΔM and ΔD, counted on a CPU too, where the slabs are
smaller). Host memory on a GPU scan adds the pinned copies of both batches' inputs. Buffers smaller
than one of these (the update path's ``O(s r)`` work, the max |cos|, the rows) are left out: the prediction is
compared with the allocator's peak in ``benchmarks/gpu_check.py`` and with the peak RSS in
``benchmarks/whole_model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafft.linalg import DENSE_SVD_MAX, DEVICE_WIDENED_ELEMENTS, SLAB_COLUMNS, krylov_block

ITERATIONS = 10  # Krylov iterations the blocks are counted for (a synthetic 4096² fine-tune certifies in 7)


@dataclass(frozen=True)
class Plan:
    """What a batch holds besides its shape: where it is analysed (``device`` "cpu" or "cuda"), the bytes per
    element W0 is held in (``base_itemsize``), one entry per tuned source, ``("full", itemsize)`` or
    ``("lora", rank)``, whether bases come from a cache (``cached``), ``k`` and whether torch (not the Triton
    kernels) multiplies (``torch_products``: 16-bit weights are then copied to fp32)."""

    device: str = "cpu"
    base_itemsize: int = 4
    sources: tuple[tuple[str, int], ...] = field(default_factory=lambda: (("full", 4),))
    cached: bool = False
    k: int = 10
    torch_products: bool = True


def per_matrix(shape: tuple[int, int], plan: Plan) -> tuple[int, int]:
    """``(bytes that scale with L on the analysing device, of which inputs)`` for one ``[m, n]`` matrix."""
    m, n = shape
    s = min(m, n)
    inputs = m * n * plan.base_itemsize
    tuned_dense = 0
    for kind, size in plan.sources:
        if kind == "full":
            inputs += m * n * size
            tuned_dense = max(tuned_dense, size)
        else:
            inputs += size * (m + n) * 4 + m * size * 4  # factors and B columns, fp32
    if plan.cached:
        inputs += 4 * s * s + 8 * s + 8 * m
    basis = 0 if plan.cached else 16 * s * s + (4 * s * s if plan.device != "cpu" else 0) + (
        8 * s * s if s <= DENSE_SVD_MAX else 0)
    depth = krylov_block(plan.k) * (ITERATIONS + 1)
    krylov = (3 * m + n) * depth * 8
    upcast = m * n * 4 if plan.torch_products and max(tuned_dense, plan.base_itemsize) < 4 else 0
    return 2 * inputs + basis + krylov + upcast, inputs


def per_batch(shape: tuple[int, int], L: int, plan: Plan) -> int:
    """Bytes held once per batch of ``L`` ``[m, n]`` matrices: one eigen-solve's workspace (when the basis is built),
    the fp64 slabs of the Gram matrix and of ΔM, ΔD."""
    m, n = shape
    s = min(m, n)
    workspace = 0 if plan.cached else 8 * (1 + 6 * s + 2 * s * s)
    gram_slab = L * s * min(SLAB_COLUMNS, max(m, n)) * 8
    return workspace + gram_slab + 2 * min(DEVICE_WIDENED_ELEMENTS, max(1, L) * m * n) * 8


def batch_peak(shape: tuple[int, int], L: int, plan: Plan) -> int:
    """Predicted peak bytes on the analysing device of a batch of ``L`` ``[m, n]`` matrices (module docstring)."""
    scaling, _ = per_matrix(shape, plan)
    return L * scaling + per_batch(shape, L, plan)


def host_peak(shape: tuple[int, int], L: int, plan: Plan) -> int:
    """Predicted peak host bytes for a batch of ``L`` ``[m, n]`` matrices: :func:`batch_peak` on the CPU; on a GPU the
    batch's inputs as read and their pinned copies, for both batches in flight."""
    return batch_peak(shape, L, plan) if plan.device == "cpu" else 2 * 2 * L * per_matrix(shape, plan)[1]


def batch_size(shape: tuple[int, int], budget: int, plan: Plan) -> int:
    """The largest ``L`` whose :func:`batch_peak` stays within ``budget`` bytes; at least 1 (one matrix per batch
    is the least a scan can do: its peak is then what it is)."""
    scaling, _ = per_matrix(shape, plan)
    L = max(1, int((budget - per_batch(shape, 1, plan)) // max(1, scaling)))  # the peak is nearly linear in L
    while batch_peak(shape, L + 1, plan) <= budget:
        L += 1
    while L > 1 and batch_peak(shape, L, plan) > budget:
        L -= 1
    return L
