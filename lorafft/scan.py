"""``scan``: checkpoints in, the paper's intruder dimensions out.

Data flow (DESIGN.md): io (one tensor at a time) -> pairing (base name <-> tuned name or adapter module, scope,
groups of one shape) -> analysis (batched linalg per group) -> report (one row per matrix and side).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import platform
import queue
import threading
import warnings
from dataclasses import dataclass

import torch

from lorafft import adapters, analysis, distributed, io, linalg, pairing
from lorafft.cache import BaseCache, cached_basis
from lorafft.errors import InputError
from lorafft.journal import Journal, row_key
from lorafft.report import MatrixRow, Report, eps_key

DEFAULT_MAX_BATCH_BYTES = 1 << 30  # fp32 weights (base + tuned) held at once per batch; the basis adds ~4x


@dataclass
class Pair:
    """One matrix to analyse: the base tensor name, where the tuned matrix comes from, and its analysed shape
    ``[out, in]`` (PEFT ``fan_in_fan_out`` weights, GPT-2 Conv1D, are stored ``[in, out]`` and transposed;
    embeddings are analysed as stored, whether the tuned side is an adapter or a full fine-tune)."""

    name: str
    tuned_name: str
    shape: tuple[int, int]
    module: adapters.LoraModule | None = None

    @property
    def transposed(self) -> bool:
        return self.module is not None and self.module.fan_in_fan_out and not self.module.embedding


def _describe(source) -> str:
    return io.STATE_DICT if isinstance(source, dict) else os.fspath(source)


def find_pairs(base: io.Checkpoint, tuned, scope: pairing.Scope, *, strict: bool = False):
    """Pairs in scope and the skipped names with reasons. ``tuned`` is a Checkpoint or an io.Adapter.

    Raises InputError when nothing pairs, or (``strict``) when a paired name has a different shape.
    """
    base_index = pairing.NameIndex(base.names())
    pairs, skipped = [], []
    if isinstance(tuned, io.Adapter):
        for module in adapters.lora_modules(tuned, base_index, base.shape):
            if scope.admits(module.base_name):
                shape = tuple(base.shape(module.base_name))
                pair = Pair(module.base_name, module.base_name, shape, module)
                pair.shape = shape[::-1] if pair.transposed else shape
                pairs.append(pair)
    else:
        tuned_index = pairing.NameIndex(tuned.names())
        for name in base.names():
            tuned_name = tuned_index.resolve(name)
            if tuned_name is None or len(base.shape(name)) != 2 or not scope.admits(name):
                continue
            if tuple(base.shape(name)) != tuple(tuned.shape(tuned_name)):
                problem = f"tensor '{tuned_name}' has shape {list(tuned.shape(tuned_name))} but base '{name}' has {list(base.shape(name))}"
                if strict:
                    raise InputError(tuned.file_of(tuned_name), problem)
                warnings.warn(f"{tuned.file_of(tuned_name)}: {problem}; skipped", stacklevel=2)
                skipped.append({"name": name, "reason": problem})
                continue
            pairs.append(Pair(name, tuned_name, tuple(base.shape(name))))
    if not pairs:
        raise InputError(tuned.path, f"no 2-D weight matrices in scope in common with the base checkpoint {base.path}")
    return pairs, skipped


def shape_batches(pairs: list[Pair], max_batch_bytes: int, copies: int = 2):
    """Same-shape groups cut so that a batch's fp32 stacks (``copies`` per matrix: the base and each tuned
    checkpoint) fit ``max_batch_bytes``."""
    for shape, group in pairing.group_by_shape(pairs, lambda p: p.shape).items():
        per_matrix = copies * 4 * shape[0] * shape[1]
        size = max(1, max_batch_bytes // per_matrix)
        for start in range(0, len(group), size):
            yield group[start : start + size]


def load_pair(base: io.Checkpoint, tuned, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W0, Wt)`` of one pair, fp32, in the analysed orientation ``[out, in]``; ``tuned`` a Checkpoint or Adapter."""
    W0 = _oriented(base.get(pair.name), pair)
    return W0, _load_tuned(tuned, pair, W0)


NATIVE_DTYPES = (torch.float16, torch.bfloat16)  # read as stored by the Triton kernels


def _analysed_dtype(stored: torch.Tensor, native: bool) -> torch.dtype:
    """fp32, or the stored fp16/bf16 when ``native`` (the Triton backend: half the memory and transfer)."""
    return stored.dtype if native and stored.dtype in NATIVE_DTYPES else torch.float32


def _oriented(stored: torch.Tensor, pair: Pair, *, native: bool = False) -> torch.Tensor:
    """A stored base tensor in the analysed orientation ``[out, in]``, fp32 (see :func:`_analysed_dtype`)."""
    W0 = stored.to(_analysed_dtype(stored, native))
    return (W0.T if pair.transposed else W0).contiguous()


def _base_basis(W0: torch.Tensor, stored: list, batch: list[Pair], reader, writer) -> linalg.BaseBasis:
    """The batch's base basis: from the cache ``reader`` when every matrix is there in this orientation, else
    computed (and written to ``writer`` when given)."""
    if reader is not None:
        found = [reader.lookup(pair.name, tensor, tuple(W0.shape[1:])) for pair, tensor in zip(batch, stored)]
        if all(entry is not None for entry in found):
            return cached_basis(W0, [basis for basis, _ in found], [sigma for _, sigma in found])
    basis = linalg.base_basis(W0)
    if writer is not None:
        explicit = basis.top_vectors(basis.small_side, basis.sigma.shape[-1])
        for index, (pair, tensor) in enumerate(zip(batch, stored)):
            writer.store(pair.name, tensor, explicit[index].cpu(), basis.sigma[index].cpu(), tuple(W0.shape[1:]))
    return basis


def _load_tuned(tuned, pair: Pair, W0: torch.Tensor, *, native: bool = False) -> torch.Tensor:
    """Wt in the analysed orientation, from a checkpoint (fp32, or as stored: :func:`_analysed_dtype`) or merged in
    fp32 from an adapter module onto ``W0`` (which is already in the analysed orientation)."""
    if pair.module is None:
        stored = tuned.get(pair.tuned_name)
        Wt = stored.to(_analysed_dtype(stored, native))
        return (Wt.T if pair.transposed else Wt).contiguous()
    stored = W0.T if pair.transposed else W0
    Wt = adapters.merged_weight(pair.module, stored)
    return (Wt.T if pair.transposed else Wt).contiguous()


def adapter_update(batch: list[Pair]) -> linalg.LowRank | None:
    """The batch's LoRA updates kept factored, ``ΔW = s·B·A`` in the analysed orientation ``[out, in]``, when every
    module is a plain LoRA module (no DoRA magnitude, no embedding) of one rank; None otherwise (the tuned weights
    are then merged, as PEFT merges them). The factors' shapes were checked against the base when pairing."""
    modules = [p.module for p in batch]
    if any(m is None or m.embedding or m.magnitude is not None for m in modules):
        return None
    if len({m.lora_A.shape[0] for m in modules}) != 1:
        return None
    return linalg.LowRank(B=torch.stack([m.lora_B for m in modules]), A=torch.stack([m.lora_A for m in modules]),
                          scale=torch.tensor([m.scaling for m in modules], dtype=torch.float64))


def adapter_start(batch: list[Pair]) -> torch.Tensor | None:
    """LoRA B columns ``[L, out, r]`` as extra start vectors for the tuned SVD, when every module in the batch is a
    non-embedding adapter module of one rank (B spans the output space, where intruders appear)."""
    modules = [p.module for p in batch]
    if any(m is None or m.embedding for m in modules) or len({m.lora_B.shape for m in modules}) != 1:
        return None
    return torch.stack([m.lora_B.float() for m in modules])


def _versions() -> dict:
    import numpy
    import safetensors

    from lorafft import __version__

    return {
        "lorafft": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def scan(
    base,
    tuned,
    *,
    k: int = 10,
    eps=analysis.DEFAULT_EPS,
    side: str = "left",
    include=(),
    exclude=(),
    embeddings: bool = False,
    strict: bool = False,
    split_fused: bool = False,
    backend: str | None = None,
    device=None,
    delta_ranks: bool = False,
    base_cache=None,
    write_base_cache=None,
    journal=None,
    resume: bool = False,
    out=None,
    tol: float = 1e-5,
    seed: int = 0,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    progress: bool = False,
) -> Report:
    """Intruder analysis of every weight matrix a base and a fine-tuned checkpoint share.

    Args:
        base: Hugging Face checkpoint directory, ``.safetensors``/``.bin`` file, shard index, or ``{name: tensor}``.
        tuned: the same kinds, or a PEFT LoRA adapter directory (merged the way PEFT merges it); or a list of them
            (checkpoints along one training run: the base basis is computed once, rows carry ``checkpoint``).
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
            at a time; with the Triton backend fp16/bf16 weights are moved and read as stored.
        seed: seeds the random start blocks (results are reproducible).
        max_batch_bytes: cap on the fp32 base + tuned weights analysed together.
        progress: show a progress bar (tqdm) on stderr.

    Under ``torchrun`` (WORLD_SIZE > 1) the batches are spread over the ranks (:mod:`lorafft.distributed`): rank 0
    returns the whole report (and writes ``out``), the other ranks return None; journals get a ``.rankN`` suffix.

    Returns a :class:`~lorafft.report.Report`. Raises :class:`~lorafft.errors.InputError` on bad input.
    """
    sides = ("left", "right") if side == "both" else (side,)
    if any(s not in ("left", "right") for s in sides):
        raise ValueError(f"side must be 'left', 'right' or 'both', got {side!r}")
    eps = (float(eps),) if isinstance(eps, (int, float)) else tuple(sorted({float(e) for e in eps}))
    tuned_list = list(tuned) if isinstance(tuned, (list, tuple)) else [tuned]
    if not tuned_list:
        raise ValueError("scan needs at least one tuned checkpoint")
    if resume and journal is None:
        raise ValueError("resume needs the journal of the scan to finish")
    device = distributed.local_device() if device is None else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    if split_fused and any(io.is_adapter(source) for source in tuned_list):
        warnings.warn("split_fused ignored: a PEFT adapter is merged onto whole fused projections, so they are "
                      "analysed whole", stacklevel=2)
        split_fused = False
    scope = pairing.Scope(tuple(include), tuple(exclude), embeddings)
    reader = None if base_cache is None else BaseCache(base_cache)
    writer = None if write_base_cache is None else BaseCache(write_base_cache, writable=True)
    with contextlib.ExitStack() as stack:
        base_checkpoint = stack.enter_context(_open(base, role="base", split_fused=split_fused))
        sources, pairs_by_source, skipped = [], [], []
        for source in tuned_list:
            opened = open_tuned(source, split_fused=split_fused)
            stack.enter_context(opened.tensors if isinstance(opened, io.Adapter) else opened)
            pairs, skipped_here = find_pairs(base_checkpoint, opened, scope, strict=strict)
            sources.append(opened)
            pairs_by_source.append({pair.name: pair for pair in pairs})
            skipped.extend(dict(entry, checkpoint=len(sources) - 1) for entry in skipped_here)
        first = pairs_by_source[0]
        for index, pairs in enumerate(pairs_by_source[1:], start=1):
            if pairs.keys() != first.keys():
                different = sorted(pairs.keys() ^ first.keys())[0]
                raise InputError(_describe(tuned_list[index]), f"has another set of matrices than {_describe(tuned_list[0])} ('{different}' is in one only)")
        inputs = {"base": _describe(base), "tuned": [_describe(t) for t in tuned_list],
                  "tuned_kind": ["lora" if isinstance(source, io.Adapter) else "full" for source in sources]}
        options = {"k": k, "eps": list(eps), "side": side, "include": list(include), "exclude": list(exclude),
                   "embeddings": embeddings, "strict": strict, "split_fused": split_fused, "delta_ranks": delta_ranks,
                   "tol": tol, "seed": seed,
                   "base_cache": None if base_cache is None else os.fspath(base_cache),
                   "max_batch_bytes": max_batch_bytes}
        rank, size = distributed.world()
        batches = list(shape_batches(list(first.values()), max_batch_bytes, copies=1 + len(sources)))
        owners = distributed.assign([_cost(batch) * len(sources) for batch in batches], size)
        if journal is not None and size > 1:
            journal = f"{os.fspath(journal)}.rank{rank}"
        record = None if journal is None else Journal(journal, {"inputs": inputs, "options": options}, resume=resume)
        settings = dict(k=k, eps=eps, sides=sides, tol=tol, seed=seed, delta_ranks=delta_ranks, backend=backend,
                        device=device)
        try:
            mine = [index for index, owner in enumerate(owners) if owner == rank]
            rows_by_batch = _scan_rows(base_checkpoint, sources, pairs_by_source, settings, record, reader, writer,
                                       batches, mine, progress=progress and rank == 0)
        except BaseException as error:
            if record is not None:  # bad input leaves no partial output; a crash or interrupt keeps it to resume
                record.close(remove=isinstance(error, InputError) and not resume)
            raise
    gathered = distributed.gather(rows_by_batch, rank, size)
    report = None
    if gathered is not None:
        rows = [row for index in sorted(gathered) for row in gathered[index]]
        report = Report(eps=eps, rows=rows, inputs=inputs, options=options, versions=_versions(), skipped=skipped,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if out is not None:
            report.save(out)
    distributed.barrier(size)  # the report is on disk before any rank drops its journal
    if record is not None:
        record.close(remove=out is not None)
    return report


def _cost(batch: list[Pair]) -> float:
    """Relative cost of a batch: Gram product and eigen-decomposition, ~ max(m, n) min(m, n)^2 per matrix."""
    return float(sum(max(p.shape) * min(p.shape) ** 2 for p in batch))


class _ShardReleaser:
    """Reads tensors of one checkpoint in a planned order and releases each shard right after the last tensor the
    plan reads from it, so a scan holds only the shards it still needs."""

    def __init__(self, checkpoint: io.Checkpoint, names: list[str]):
        self.checkpoint = checkpoint
        self.remaining = collections.Counter(checkpoint.file_of(name) for name in names)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.get(name)
        file = self.checkpoint.file_of(name)
        self.remaining[file] -= 1
        if self.remaining[file] == 0:
            self.checkpoint.release(file)
        return tensor


def _stack(matrices: list[torch.Tensor]) -> torch.Tensor:
    """``[L, m, n]`` from L matrices; a view, not a copy, when L = 1 (the usual case for big matrices)."""
    return matrices[0].unsqueeze(0) if len(matrices) == 1 else torch.stack(matrices)


def _prefetched(load, items: list):
    """Yield ``(item, load(item))`` while one reader thread loads the next item: reading the next batch overlaps the
    analysis of this one. The reader starts on the next item only once the consumer has taken the previous one, so
    at most two loaded items exist at a time (the one analysed and the one being read)."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)
    stop = threading.Event()

    def read() -> None:
        for item in items:
            try:
                entry = (item, load(item), None)
            except BaseException as error:  # handed to the consumer, which raises it
                entry = (item, None, error)
            handoff.put(entry)  # never blocks: the consumer has taken the previous item
            failed = entry[2] is not None
            del entry
            while not taken.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if failed or stop.is_set():
                return

    thread = threading.Thread(target=read, name="lorafft-reader", daemon=True)
    thread.start()
    try:
        for _ in items:
            item, value, error = handoff.get()
            taken.release()
            if error is not None:
                raise error
            yield item, value
            del value
    finally:
        stop.set()
        thread.join()


def _scan_rows(base: io.Checkpoint, sources: list, pairs_by_source: list[dict], settings: dict, record, reader,
               writer, batches: list[list[Pair]], mine: list[int], *, progress: bool) -> dict[int, list[MatrixRow]]:
    """``{batch index: rows}`` for the batches ``mine``, rows in canonical order (checkpoint, matrix, side): rows
    already in the journal ``record`` are taken from it, the others computed and appended to it. ``settings``: k,
    eps, sides, tol, seed, delta_ranks, backend, device. Batches are read ahead by one reader thread
    (:func:`_prefetched`) on the host, then moved to the device."""
    from tqdm.auto import tqdm

    sides, rows_by_batch = settings["sides"], {}
    keys = {index: [(pair.name, checkpoint, side) for checkpoint in range(len(sources)) for pair in batches[index]
                    for side in sides] for index in mine}
    journaled = {index for index in mine if record is not None and all(key in record.rows for key in keys[index])}
    for index in sorted(journaled):
        rows_by_batch[index] = [record.rows[key] for key in keys[index]]
    to_compute = [index for index in mine if index not in journaled]
    base_reader = _ShardReleaser(base, [pair.name for index in to_compute for pair in batches[index]])
    tuned_readers = [source if isinstance(source, io.Adapter) else
                     _ShardReleaser(source, [pairs[pair.name].tuned_name for index in to_compute for pair in batches[index]])
                     for source, pairs in zip(sources, pairs_by_source)]

    device = settings["device"]
    native = linalg.resolve_backend(device, settings["backend"]) == "triton"

    def load(batch_index: int):
        batch = batches[batch_index]
        stored = [base_reader.get(pair.name) for pair in batch]
        W0 = _stack([_oriented(tensor, pair, native=native) for tensor, pair in zip(stored, batch)])
        tuned = []  # per checkpoint: the tuned stack, or a LoRA update kept factored (linalg.LowRank)
        for source, pairs in zip(tuned_readers, pairs_by_source):
            here = [pairs[pair.name] for pair in batch]
            update = adapter_update(here)
            tuned.append(update if update is not None else
                         _stack([_load_tuned(source, pair, w0, native=native) for pair, w0 in zip(here, W0)]))
        return stored, W0, tuned

    total = sum(len(batches[index]) for index in to_compute) * len(sources)
    with tqdm(total=total, unit="matrix", disable=not progress, desc="lorafft scan") as bar:
        for batch_index, (stored, W0, tuned) in _prefetched(load, to_compute):
            batch, rows = batches[batch_index], rows_by_batch.setdefault(batch_index, [])
            # one random stream per batch, so that a resumed (or distributed) scan draws exactly what one run draws
            generator = torch.Generator().manual_seed(settings["seed"] + 7919 * batch_index)
            W0, tuned = W0.to(device), [entry.to(device) for entry in tuned]
            basis = _base_basis(W0, stored, batch, reader, writer)
            del stored
            for checkpoint, (entry, pairs) in enumerate(zip(tuned, pairs_by_source)):
                here = [pairs[pair.name] for pair in batch]
                Wt, update = (None, entry) if isinstance(entry, linalg.LowRank) else (entry, None)
                results = analysis.analyze(W0, Wt, lora=update, k=settings["k"], eps=settings["eps"], sides=sides,
                                           start=adapter_start(here), tol=settings["tol"], generator=generator,
                                           basis=basis, backend=settings["backend"])
                ranks = _delta_ranks(here, W0, Wt) if settings["delta_ranks"] else None
                for row in _rows(here, results, checkpoint, ranks):
                    if record is not None and row_key(row) not in record.rows:
                        record.append(row)
                    rows.append(row)
                bar.update(len(batch))
            del tuned, W0, basis  # before the next batch arrives: at most two batches in memory
    return rows_by_batch


def build_base_cache(base, directory, *, include=(), exclude=(), embeddings: bool = False, split_fused: bool = False,
                     max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, progress: bool = False) -> BaseCache:
    """Compute and store the basis of every 2-D base weight in scope (as stored, ``[out, in]``) in ``directory``:
    ``lorafft cache build``. Entries already there with the right fingerprint are kept. ``split_fused``: the parts
    of fused projections, as ``scan(..., split_fused=True)`` reads them. Returns the cache."""
    writer = BaseCache(directory, writable=True)
    scope = pairing.Scope(tuple(include), tuple(exclude), embeddings)
    with _open(base, role="base", split_fused=split_fused) as checkpoint:
        pairs = [Pair(name, name, tuple(checkpoint.shape(name))) for name in checkpoint.names()
                 if len(checkpoint.shape(name)) == 2 and scope.admits(name)]
        if not pairs:
            raise InputError(checkpoint.path, "no 2-D weight matrices in scope")
        from tqdm.auto import tqdm

        for batch in tqdm(list(shape_batches(pairs, max_batch_bytes, copies=1)), unit="batch", disable=not progress, desc="lorafft cache"):
            stored = [checkpoint.get(pair.name) for pair in batch]
            W0 = _stack([_oriented(tensor, pair) for tensor, pair in zip(stored, batch)])
            _base_basis(W0, stored, batch, writer, writer)
    return writer


def open_tuned(source, *, split_fused: bool = False) -> io.Checkpoint | io.Adapter:
    """A tuned input opened: a PEFT adapter directory as an io.Adapter, anything else as a Checkpoint (its fused
    projections split when ``split_fused``)."""
    return io.open_adapter(source) if io.is_adapter(source) else _open(source, role="tuned", split_fused=split_fused)


def _open(source, role: str, *, split_fused: bool = False) -> io.Checkpoint:
    if not isinstance(source, dict) and io.is_adapter(source) and role == "base":
        raise InputError(source, "the base must be a model checkpoint, not a PEFT adapter")
    return io.open_checkpoint(source, split_fused=split_fused)


def _delta_ranks(batch: list[Pair], W0: torch.Tensor, Wt: torch.Tensor | None) -> list[tuple[float, float]]:
    """(effective rank, stable rank) of ΔW per matrix: from the LoRA factors when ΔW = s·B·A (Wt is then None
    when the whole batch is kept factored), else from the dense difference."""
    sigmas = []
    for index, pair in enumerate(batch):
        module = pair.module
        if module is not None and module.magnitude is None:
            sigma = linalg.low_rank_singular_values(module.lora_B[None], module.lora_A[None], module.scaling)
        else:
            sigma = linalg.singular_values((Wt[index].float() - W0[index].float())[None])
        sigmas.append(sigma)
    return [(float(analysis.effective_rank(s)[0]), float(analysis.stable_rank(s)[0])) for s in sigmas]


def _rows(batch: list[Pair], results: dict[str, analysis.SideAnalysis], checkpoint: int, ranks) -> list[MatrixRow]:
    rows = []
    for index, pair in enumerate(batch):
        layer, module = pairing.layer_and_module(pair.name)
        effective, stable = (None, None) if ranks is None else ranks[index]
        for side, result in results.items():
            rows.append(
                MatrixRow(
                    name=pair.name,
                    tuned_name=pair.tuned_name,
                    checkpoint=checkpoint,
                    layer=layer,
                    module=module,
                    shape=pair.shape,
                    side=side,
                    k=result.max_cos.shape[-1],
                    singular_values=result.singular_values[index].tolist(),
                    base_singular_values=result.base_singular_values[index].tolist(),
                    max_cos=result.max_cos[index].tolist(),
                    argmax=result.argmax[index].tolist(),
                    error_bound=result.error_bound[index].tolist(),
                    near_threshold=result.near_threshold[index].tolist(),
                    counts={eps_key(e): int(c) for e, c in zip(result.eps, result.counts[index].tolist())},
                    random_floor=result.random_floor,
                    random_reference=result.random_reference,
                    delta_effective_rank=effective,
                    delta_stable_rank=stable,
                    iterations=result.iterations,
                )
            )
    return rows
