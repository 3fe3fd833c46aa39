"""The per-batch recipe: one loaded batch of same-shape matrices turned into report rows, the one sequence that
scan, intervene, tracking and the figures run.

For a batch (:class:`lorafft.loading.LoadedBatch`): the base basis (the one the loader read from a base cache, or
computed and stored in the cache being written), then for every tuned source :func:`lorafft.analysis.analyze`
(which alone chooses the dense, Krylov or update path, :func:`lorafft.analysis.tuned_top`), the ΔW ranks when asked,
and the rows (:func:`lorafft.report.matrix_rows`). Each matrix's random Krylov start comes from its own stream
(:func:`lorafft.analysis.matrix_generators`), so a batch split in two after an out-of-memory error gives the same
rows. Every setting comes from one :class:`lorafft.options.ScanOptions`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lorafft import analysis, linalg, loading, profiling
from lorafft.cache import BaseCache, cached_basis
from lorafft.errors import InputError, WrongBasis
from lorafft.options import ScanOptions
from lorafft.report import MatrixRow, matrix_rows


@dataclass
class Recipe:
    """How batches become rows: the scan's ``options``, the ``backend`` of the products, the base cache read
    (``cache_in``) and the one written (``cache_out``)."""

    options: ScanOptions
    backend: str | None = None
    cache_in: BaseCache | None = None
    cache_out: BaseCache | None = None

    def read_bases(self):
        """What the loader's reader thread calls to read a batch's cached bases (None without a base cache)."""
        return None if self.cache_in is None else self.cache_in.read

    def basis(self, loaded: loading.LoadedBatch) -> linalg.BaseBasis:
        """The batch's base basis: the cached one the loader read, else computed (and stored in ``cache_out``)."""
        if loaded.cached is not None:
            return cached_basis(loaded.W0, loaded.cached)
        with profiling.stage("base_basis", loaded.W0.device):
            basis = linalg.base_basis(loaded.W0)
        if self.cache_out is not None:
            with profiling.stage("write"):
                self.cache_out.store(loaded.batch, loaded.stored, basis)
        return basis

    def analyse(self, loaded: loading.LoadedBatch, source: int, basis: linalg.BaseBasis, *,
                sides: tuple[str, ...] | None = None, start: torch.Tensor | None = None,
                previous: torch.Tensor | None = None, tol: float | None = None) -> dict[str, analysis.SideAnalysis]:
        """:func:`lorafft.analysis.analyze` of tuned source ``source`` of the batch against ``basis`` (restricted to
        the matrices that source changes), started from ``start`` (before the adapter's B columns) or, for a LoRA
        update, from ``previous`` coordinates (a tracker)."""
        pairs, positions = loaded.pairs[source], loaded.rows[source]
        whole = len(positions) == loaded.W0.shape[0]
        W0 = loaded.W0 if whole else loaded.W0[positions]
        Wt, update = loading.dense_or_update(loaded.tuned[source])
        extra = [e for e in (start, loaded.columns[source]) if e is not None]
        settings = self.options
        try:
            return analysis.analyze(W0, Wt, lora=update, k=settings.k, eps=settings.eps,
                                    sides=sides or settings.sides,
                                    start=torch.cat([e.to(W0.device, torch.float64) for e in extra], -1) if extra
                                    else None, tol=settings.tol if tol is None else tol,
                                    generator=analysis.matrix_generators(settings.seed, [p.name for p in pairs]),
                                    basis=basis if whole else basis.select(positions), backend=self.backend,
                                    scale=loaded.scales[source], previous=previous)
        except WrongBasis as wrong:
            pair = pairs[wrong.rows[0]]
            raise InputError(self.cache_in.entry_path(pair) if self.cache_in else pair.name,
                             f"does not hold the singular vectors of '{pair.name}' as analysed {list(pair.shape)}: "
                             f"the cache is damaged; rebuild it") from None

    def rows(self, loaded: loading.LoadedBatch) -> list[list[MatrixRow]]:
        """Per tuned source, the rows of the batch's matrices it changes (``[]`` for one that changes none): matrix
        by matrix in batch order, a row per side."""
        basis = self.basis(loaded)
        rows = []
        for source, pairs in enumerate(loaded.pairs):
            if not pairs:
                rows.append([])
                continue
            results = self.analyse(loaded, source, basis)
            ranks = None
            if self.options.delta_ranks:
                Wt, _ = loading.dense_or_update(loaded.tuned[source])
                W0 = loaded.W0[loaded.rows[source]]
                Wt = None if Wt is None else linalg.dequantized(Wt, loaded.scales[source])
                ranks = analysis.delta_ranks(W0, Wt, [pair.adapter for pair in pairs])
            rows.append(matrix_rows(pairs, results, source, ranks))
        return rows


def split_on_out_of_memory(run, loaded: loading.LoadedBatch, warned: list[bool]):
    """``run(loaded)``, or, when the device runs out of memory, ``run`` of each half of the batch (recursively, down to
    one matrix), the parts' results concatenated per source: the same rows, since every matrix draws its own random
    start. One warning per scan (``warned``, a one-element list the caller keeps)."""
    try:
        return run(loaded)
    except torch.OutOfMemoryError:
        size = loaded.W0.shape[0]
        if size == 1:
            raise
    torch.cuda.empty_cache()
    if not warned[0]:
        warned[0] = True
        warnings.warn(f"the device ran out of memory on a batch of {size} {list(loaded.W0.shape[1:])} matrices: "
                      f"analysing it in halves (same rows; set --max-batch-bytes lower to avoid the retry)",
                      stacklevel=2)
    halves = [split_on_out_of_memory(run, loaded.select(part), warned)
              for part in (list(range(size // 2)), list(range(size // 2, size)))]
    return [first + second for first, second in zip(*halves)]
