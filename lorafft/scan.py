"""``scan``: checkpoints in, the paper's intruder dimensions out (orchestration only).

Data flow (docs/DESIGN.md): :mod:`lorafft.io` opens the inputs, :mod:`lorafft.pairing` pairs base and tuned
matrices and cuts same-shape batches as large as :mod:`lorafft.memory` allows, :mod:`lorafft.loading` reads them onto
the device (with their cached bases), :class:`lorafft.recipe.Recipe` turns each batch into rows, journaled as they
finish (:mod:`lorafft.journal`), and :mod:`lorafft.report` makes the report.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field

import torch

from lorafft import distributed, io, linalg, loading, memory, pairing, profiling
from lorafft import options as options_module
from lorafft.cache import BaseCache
from lorafft.errors import InputError
from lorafft.io import fp8, hub
from lorafft.journal import Journal, fingerprints, read_header, row_key
from lorafft.options import ScanOptions
from lorafft.recipe import Recipe, split_on_out_of_memory
from lorafft.report import MatrixRow, Report, timestamp, versions


def scan(
    base=None,
    tuned=None,
    *,
    options: ScanOptions | None = None,
    revision: str | None = None,
    k: int | None = None,
    eps=None,
    side: str | None = None,
    include=None,
    exclude=None,
    embeddings: bool | None = None,
    strict: bool | None = None,
    split_fused: bool | None = None,
    backend: str | None = None,
    device=None,
    delta_ranks: bool | None = None,
    base_cache=None,
    write_base_cache=None,
    journal=None,
    resume: bool = False,
    out=None,
    tol: float | None = None,
    seed: int | None = None,
    max_batch_bytes: int | None = None,
    progress: bool | None = None,
    profile: bool = False,
) -> Report | None:
    """Intruder analysis of every weight matrix a base and a fine-tuned checkpoint share.

    Args:
        options: a :class:`lorafft.options.ScanOptions` with every setting of what is computed; the keyword
            arguments below (k, eps, side, include, exclude, embeddings, strict, split_fused, delta_ranks, tol, seed,
            base_cache, max_batch_bytes) override it when given (default: ``ScanOptions()``'s values).
        base: Hugging Face checkpoint directory, ``.safetensors``/``.bin`` file, shard index, ``{name: tensor}``, or
            a Hugging Face Hub id (``org/name``; a local path of that name wins; :mod:`lorafft.io.hub`). None: the
            base every PEFT adapter in ``tuned`` names (``base_model_name_or_path`` in its ``adapter_config.json``,
            a path or a Hub id; ``inputs.base_from`` in the report says so).
        tuned: the same kinds, or a PEFT LoRA adapter directory (merged the way PEFT merges it); or a list of them
            (checkpoints along one training run: the base basis is computed once, rows carry ``checkpoint``).
        revision: branch, tag or commit of every input given as a Hub id (default: the repository's default branch;
            for the base an adapter names, the revision its ``adapter_config.json`` records). The report's
            ``inputs.base``/``tuned`` are the local paths read (the Hub cache's snapshot folders for ids), and
            ``inputs.hub`` records each id and its commit.
        k: tuned singular vectors per matrix (the paper: 10).
        eps: thresholds ε; a vector is an intruder at ε when its max |cos| < ε (the paper: 0.5; 0.5..0.9 sweeps).
        side: "left" (output space, the paper's choice), "right" or "both".
        include, exclude: regexes searched in base tensor names; embeddings: also embeddings and ``lm_head``.
        strict: a paired name with a different shape is an error instead of a warning.
        split_fused: analyse fused projections as their parts (``qkv_proj`` / ``query_key_value`` as q, k, v;
            ``gate_up_proj`` as gate, up; named ``<fused>.<part>.weight``), laid out as each checkpoint directory's
            ``config.json`` says (:mod:`lorafft.io`: Phi-3, GPT-NeoX, BLOOM, Falcon); by default they are analysed
            whole. Not with a PEFT adapter, which is merged onto the whole fused weight: then ignored, with a warning.
        delta_ranks: also the effective and stable rank of ΔW = Wt - W0 (from the r×r core for LoRA modules; a
            Gram eigenvalue decomposition of ΔW otherwise, which adds about half a base basis per matrix).
        base_cache: a directory from ``lorafft cache build`` (or ``write_base_cache``): base bases found there are
            read instead of computed; an entry built from another tensor is an InputError.
        write_base_cache: a directory to store every base basis this scan computes (created if needed).
        journal: a file where every finished row is appended and fsync'd at once (``lorafft.journal``), so that
            ``resume=True`` after a crash or ``kill -9`` finishes only the remaining matrices, with a report
            identical to an uninterrupted run's. Random start blocks are drawn per batch for that reason.
        resume: continue the scan recorded in ``journal`` (refused if it was made with other inputs or options).
        out: write the report here, atomically (``.csv`` or JSON); a journal is removed only once this is written.
        tol: target error bound of each max|cos| (the truncated SVD iterates until it certifies this).
        backend: "torch", "triton" or "auto" (default; ``$LORAFFT_BACKEND`` overrides): see
            :func:`lorafft.linalg.resolve_backend`. It changes how, not what, is computed, so it is not an option
            of the report.
        device: where the analysis runs: "cpu", "cuda", "cuda:1", ...; default the GPU when CUDA is available
            (under torchrun, ``cuda:$LOCAL_RANK``), else the CPU. Tensors are read on the host and moved one batch
            at a time; with the Triton backend fp16/bf16 weights, and a full fine-tune's FP8 weights with their
            scales, are moved and read as stored.
        seed: seeds the random start blocks (results are reproducible).
        max_batch_bytes: cap on the memory one batch holds at its peak, as :mod:`lorafft.memory` predicts it (both
            batches in flight, the basis, the Krylov blocks, workspace). Default ``options.DEFAULT_MAX_BATCH_BYTES``,
            except on a CUDA device of a single-process scan, where it is :data:`BUDGET_FRACTION` of the device's
            free memory, so that a large GPU takes many layers' same-shape matrices at once (a resumed scan reuses
            its journal's value); the report's ``options`` records it. If the device still runs out of memory, the
            batch is analysed in halves (same rows, one warning).
        progress: show a progress bar (``tqdm.auto``) on stderr. None (default): where a person is watching, that is
            when stderr is a terminal or in a Jupyter notebook (:func:`someone_watching`), not in logs or tests.
        profile: time each stage (:mod:`lorafft.profiling`: reading, copying, base bases, tuned top-k, max |cos|,
            ΔM and ΔD, writing) and keep the seconds in the report's ``profile`` (on a GPU each stage synchronises
            the device, which slows the scan a little).

    Under ``torchrun`` (WORLD_SIZE > 1) the batches are spread over the ranks (:mod:`lorafft.distributed`): rank 0
    returns the whole report (and writes ``out``), the other ranks return None; journals get a ``.rankN`` suffix.

    Returns a :class:`~lorafft.report.Report` (None on ranks other than 0). Raises
    :class:`~lorafft.errors.InputError` on bad input or options, before any matrix is read.
    """
    given = dict(k=k, eps=eps, side=side, include=include, exclude=exclude, embeddings=embeddings, strict=strict,
                 split_fused=split_fused, delta_ranks=delta_ranks, tol=tol, seed=seed, base_cache=base_cache,
                 max_batch_bytes=max_batch_bytes)
    settings = (options or ScanOptions()).replace(**{name: value for name, value in given.items() if value is not None})
    budget_given = max_batch_bytes is not None or (options is not None and options.max_batch_bytes !=
                                                   ScanOptions().max_batch_bytes)
    tuned_list = list(tuned) if isinstance(tuned, (list, tuple)) else [] if tuned is None else [tuned]
    if not tuned_list:
        raise InputError("tuned", "scan needs at least one tuned checkpoint")
    if resume and journal is None:
        raise InputError("resume", "needs the journal of the scan to finish (give journal=, or out= for OUT.journal)")
    out = None if out is None else options_module.output_file(out)
    journal = None if journal is None else options_module.output_file(journal, suffixes=None)
    device = distributed.local_device() if device is None else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", f"{device} requested but CUDA is not available")
    located = hub.locate_inputs(base, tuned_list, revision=revision)
    base, tuned_list = located.base, located.tuned
    options_module.separate_outputs({"the report (out)": out, "the journal": journal}, [base, *tuned_list],
                                    caches=(settings.base_cache, write_base_cache))
    if write_base_cache is not None:
        options_module.not_an_input(write_base_cache, [base, *tuned_list], "the base cache written")
    if settings.split_fused and any(io.is_adapter(source) for source in tuned_list):
        warnings.warn("split_fused ignored: a PEFT adapter is merged onto whole fused projections, so they are "
                      "analysed whole", stacklevel=2)
        settings = settings.replace(split_fused=False)
    cache_in = None if settings.base_cache is None else BaseCache(settings.base_cache)
    cache_out = None if write_base_cache is None else BaseCache(write_base_cache, writable=True)
    if cache_out is not None and "base" in located.record.get("hub", {}):
        cache_out.hub = located.record["hub"]["base"]  # recorded as lorafft cache build records it
    rank, size = distributed.world()
    recorder = profiling.Profile() if profile else None
    with contextlib.ExitStack() as stack, profiling.active(recorder):
        inputs = _Inputs.open(base, tuned_list, settings, stack, located.record)
        native = linalg.resolve_backend(device, backend) == "triton"
        plan = inputs.plan(device, native, settings.k, cache_in is not None)
        if not budget_given and device.type == "cuda" and size == 1:  # ranks must cut the same batches
            budget = (_recorded_budget(journal) if resume else None) or int(
                BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0])
            settings = settings.replace(max_batch_bytes=budget)
        batches = pairing.shape_batches(inputs.matrices,
                                        lambda shape: memory.batch_size(shape, settings.max_batch_bytes, plan))
        if recorder is not None:
            recorder.plan(device, len(batches), max((memory.batch_peak(tuple(batch[0].shape), len(batch), plan)
                                                     for batch in batches), default=0))
        owners = distributed.assign([_cost(batch) * len(inputs.sources) for batch in batches], size)
        if journal is not None and size > 1:
            journal = f"{journal}.rank{rank}"
        header = {"inputs": inputs.record, "options": settings.record(),
                  "fingerprints": fingerprints([base, *tuned_list])}
        record = None if journal is None else Journal(journal, header, resume=resume)
        run = _Run(Recipe(settings, backend, cache_in, cache_out), device, native, record)
        try:
            mine = [index for index, owner in enumerate(owners) if owner == rank]
            rows_by_batch = run.rows(inputs, batches, mine, progress=(someone_watching() if progress is None else progress)
                                       and rank == 0)
        except BaseException as error:
            if record is not None:  # bad input leaves no partial output; a crash, interrupt or full disk keeps the
                record.close(remove=not record.rows or (isinstance(error, InputError) and not resume))  # rows
            raise
        try:
            report = _report(distributed.gather(rows_by_batch, rank, size), inputs, settings, out, recorder)
        except BaseException:
            if record is not None:  # the report could not be written (a full disk): its rows stay for --resume
                record.close(remove=False)
            raise
    distributed.barrier(size)  # the report is on disk before any rank drops its journal
    if record is not None:
        record.close(remove=out is not None, finished=True)
    return report


def someone_watching() -> bool:
    """Whether a progress bar would be seen: stderr is a terminal, or this runs in a Jupyter kernel (where
    ``tqdm.auto`` draws a widget); not when stderr goes to a log file or a test's capture."""
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _report(gathered: dict[int, list[MatrixRow]] | None, inputs: _Inputs, settings: ScanOptions, out,
            recorder: profiling.Profile | None) -> Report | None:
    """The report of every batch's rows (None on ranks other than 0), written to ``out`` when given, with the
    stages' seconds when profiled."""
    if gathered is None:
        return None
    rows = [row for index in sorted(gathered) for row in gathered[index]]
    report = Report(eps=settings.eps, rows=rows, inputs=inputs.record, options=settings.record(), versions=versions(),
                    skipped=inputs.skipped, created=timestamp())
    if out is not None:
        with profiling.stage("write"):
            report.save(out)
    if recorder is not None:
        report.profile = recorder.finish()
        if out is not None:
            report.save(out)
    return report


@dataclass
class _Inputs:
    """The opened base and tuned inputs, their pairs (per source, ``{base name: Pair}``), and what was skipped.

    Sources may change different sets of matrices (adapters of one base on other modules): :attr:`matrices` is
    their union, each base matrix once (per orientation), so its basis is computed once for all of them.
    """

    base: io.Checkpoint
    sources: list
    pairs_by_source: list[dict[str, pairing.Pair]]
    skipped: list[dict]
    record: dict = field(default_factory=dict)

    @property
    def matrices(self) -> list[pairing.Pair]:
        """Every base matrix some source changes, in the order the sources list them."""
        union = {}
        for pairs in self.pairs_by_source:
            for pair in pairs.values():
                union.setdefault((pair.name, pair.transposed), pair)
        return list(union.values())

    @classmethod
    def open(cls, base, tuned_list: list, settings: ScanOptions, stack: contextlib.ExitStack,
             found: dict) -> _Inputs:
        """Open every (located) input, closed with ``stack``, and pair it; ``found`` is how they were located
        (:attr:`lorafft.io.hub.Located.record`), added to the report's ``inputs``."""
        scope = pairing.Scope(settings.include, settings.exclude, settings.embeddings)
        base_checkpoint = stack.enter_context(loading.open_base(base, split_fused=settings.split_fused))
        inputs = cls(base_checkpoint, [], [], [])
        for source in tuned_list:
            opened = loading.open_tuned(source, split_fused=settings.split_fused)
            stack.enter_context(opened.tensors if isinstance(opened, io.Adapter) else opened)
            pairs, skipped = pairing.find_pairs(base_checkpoint, opened, scope, strict=settings.strict)
            inputs.sources.append(opened)
            inputs.pairs_by_source.append({pair.name: pair for pair in pairs})
            inputs.skipped.extend(dict(entry, checkpoint=len(inputs.sources) - 1) for entry in skipped)
        inputs.record = {"base": loading.describe(base), "tuned": [loading.describe(t) for t in tuned_list],
                         "tuned_kind": ["lora" if isinstance(s, io.Adapter) else "full" for s in inputs.sources],
                         **found}
        return inputs

    def plan(self, device: torch.device, native: bool, k: int, cached: bool) -> memory.Plan:
        """What a batch of these inputs holds (:class:`lorafft.memory.Plan`): W0 and full fine-tunes as the loader
        keeps them (16-bit as stored for the Triton kernels, else fp32), adapters by their largest rank."""
        def held(dtype: torch.dtype) -> int:
            return dtype.itemsize if native and dtype in loading.NATIVE_DTYPES + fp8.FP8_DTYPES else 4

        sample = next(iter(self.matrices), None)
        base_size = 4 if sample is None else held(self.base.dtype(sample.name))
        sources = []
        for source, pairs in zip(self.sources, self.pairs_by_source):
            if isinstance(source, io.Adapter):
                ranks = [pair.adapter.lora_A.shape[0] for pair in pairs.values() if pair.adapter is not None]
                sources.append(("lora", max(ranks, default=1)))
            else:
                pair = next(iter(pairs.values()), None)
                sources.append(("full", 4 if pair is None else held(source.dtype(pair.tuned_name))))
        return memory.Plan(device=device.type, base_itemsize=base_size, sources=tuple(sources), cached=cached, k=k,
                           torch_products=not native)


BUDGET_FRACTION = 0.8  # of the device's free memory, the rest left to torch's allocator and the kernels


def _recorded_budget(journal) -> int | None:
    """The ``max_batch_bytes`` a journal's scan used, so that a resumed scan cuts the same batches whatever memory
    is free now; None when there is none to read (the journal then judges the resume as always)."""
    try:
        recorded = read_header(journal).get("options")
    except (OSError, InputError):
        return None
    value = recorded.get("max_batch_bytes") if isinstance(recorded, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def _cost(batch: list[pairing.Pair]) -> float:
    """Relative cost of a batch: Gram product and eigen-decomposition, ~ max(m, n) min(m, n)^2 per matrix."""
    return float(sum(max(p.shape) * min(p.shape) ** 2 for p in batch))


@dataclass
class _Run:
    """How one scan computes its rows: the recipe, the device (``native``: weights kept as stored for the kernels),
    and the journal."""

    recipe: Recipe
    device: torch.device
    native: bool
    record: Journal | None

    def rows(self, inputs: _Inputs, batches: list[list[pairing.Pair]], mine: list[int], *,
             progress: bool) -> dict[int, list[MatrixRow]]:
        """``{batch index: rows}`` for the batches ``mine``, rows in canonical order (checkpoint, matrix, side):
        rows already in the journal are taken from it, the others computed and appended to it."""
        from tqdm.auto import tqdm

        sides, rows_by_batch = self.recipe.options.sides, {}
        to_compute = []
        for index in mine:
            keys = [(pair.name, c, side) for c, pairs in enumerate(inputs.pairs_by_source)
                    for pair in batches[index] if pair.name in pairs for side in sides]
            if self.record is not None and all(key in self.record.rows for key in keys):
                rows_by_batch[index] = [self.record.rows[key] for key in keys]
            else:
                to_compute.append(index)
        loader = loading.BatchLoader(inputs.base, inputs.sources, inputs.pairs_by_source, device=self.device,
                                     native=self.native, fp8_stored=True, read_bases=self.recipe.read_bases())
        total = sum(pair.name in pairs for index in to_compute for pairs in inputs.pairs_by_source
                    for pair in batches[index])
        warned = [False]
        with tqdm(total=total, unit="matrix", disable=not progress, desc="lorafft scan") as bar:
            for position, loaded in loader.batches([batches[index] for index in to_compute]):
                index = to_compute[position]
                rows_by_batch[index] = self._journaled(split_on_out_of_memory(self.recipe.rows, loaded, warned))
                bar.update(sum(len(loaded_pairs) for loaded_pairs in loaded.pairs))
                del loaded  # before the next batch arrives: at most two batches in memory
        return dict(sorted(rows_by_batch.items()))

    def _journaled(self, by_source: list[list[MatrixRow]]) -> list[MatrixRow]:
        """A batch's rows in canonical order, each appended to the journal (once)."""
        rows = [row for source_rows in by_source for row in source_rows]
        if self.record is not None:
            with profiling.stage("write"):
                for row in rows:
                    if row_key(row) not in self.record.rows:
                        self.record.append(row)
        return rows
