"""The one loader: batches of pairs read from checkpoints into ``(W0, Wt | LowRank)`` stacks on a device.

Every consumer of weights (scan, intervene, ``lorafft cache build``, the similarity and trajectory figures) reads
through :class:`BatchLoader`, so orientation, merging of adapters, dtypes, read-ahead and the release of shards
are decided here and nowhere else:

* orientation: the analysed ``[out, in]`` (PEFT ``fan_in_fan_out`` weights are transposed, :class:`Pair`);
* a PEFT LoRA adapter's update is kept factored as :class:`~lorafft.linalg.LowRank` (``ΔW = s·B·A``) when every
  module of a batch is a plain LoRA module of one rank, else merged the way PEFT merges it (DoRA, embeddings);
* dtypes: fp32, or fp16/bf16 as stored when the kernels read them natively (``native``); with ``native`` a full
  fine-tune's FP8 weights stay float8 as stored beside their scales (:attr:`LoadedBatch.scales`), which the sketch
  kernel applies. The base stays fp32: its basis needs it dequantised (fp64 Gram), and so do the larger side's
  projections and the magnitude/direction rows, so a LoRA adapter's Krylov products use that fp32 copy (a second,
  float8 copy of W0 would add device memory to save reads of a matrix that must be resident anyway);
* one reader thread prefetches the next batch while the device works on this one (at most two in memory), and
  each shard is released right after the last tensor read from it. The same thread reads the batch's cached base
  bases when a base cache has them (``read_bases``). On CUDA it also pins the batch in host memory and copies it
  on a dedicated stream (``non_blocking``), so the next batch's transfer overlaps this batch's compute; the
  consumer's stream waits for the copy's event before using it. Its work is timed as the ``read`` and
  ``to_device`` stages of an active :class:`lorafft.profiling.Profile`.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lorafft import adapters, io, linalg, profiling
from lorafft.errors import InputError
from lorafft.io import fp8
from lorafft.pairing import Pair
from lorafft.scales import Scale

NATIVE_DTYPES = (torch.float16, torch.bfloat16)  # read as stored by the Triton kernels


def describe(source) -> str:
    """How an input is named in reports and messages: its path, or ``<state dict>``."""
    return io.STATE_DICT if isinstance(source, dict) else os.fspath(source)


def open_base(source, *, split_fused: bool = False) -> io.Checkpoint:
    """The base checkpoint opened (a PEFT adapter is refused: it has no base weights)."""
    if not isinstance(source, dict) and io.is_adapter(source):
        raise InputError(source, "the base must be a model checkpoint, not a PEFT adapter")
    return io.open_checkpoint(source, split_fused=split_fused)


def open_tuned(source, *, split_fused: bool = False) -> io.Checkpoint | io.Adapter:
    """A tuned input opened: a PEFT adapter directory as an io.Adapter, anything else as a Checkpoint (its fused
    projections split when ``split_fused``)."""
    return io.open_adapter(source) if io.is_adapter(source) else io.open_checkpoint(source, split_fused=split_fused)


def _analysed_dtype(stored: torch.Tensor, native: bool) -> torch.dtype:
    """fp32, or the stored fp16/bf16 when ``native`` (the Triton backend: half the memory and transfer)."""
    return stored.dtype if native and stored.dtype in NATIVE_DTYPES else torch.float32


def oriented(stored: torch.Tensor, pair: Pair, *, native: bool = False) -> torch.Tensor:
    """A stored tensor in the analysed orientation ``[out, in]``: fp32 (or fp16/bf16 as stored when ``native``)."""
    W = stored.to(_analysed_dtype(stored, native))
    return (W.T if pair.transposed else W).contiguous()


def merged(pair: Pair, W0: torch.Tensor) -> torch.Tensor:
    """The tuned matrix of an adapter pair merged onto ``W0`` (analysed orientation) as PEFT merges it, fp32."""
    stored = W0.T if pair.transposed else W0
    Wt = adapters.merged_weight(pair.adapter, stored)
    return (Wt.T if pair.transposed else Wt).contiguous()


def adapter_update(pairs: list[Pair]) -> linalg.LowRank | None:
    """The pairs' LoRA updates kept factored, ``ΔW = s·B·A`` in the analysed orientation ``[out, in]``, when every
    module is a plain LoRA module (no DoRA magnitude, no embedding) of one rank; None otherwise (the tuned weights
    are then merged, as PEFT merges them). The factors' shapes were checked against the base when pairing."""
    modules = [pair.adapter for pair in pairs]
    if any(m is None or m.embedding or m.magnitude is not None for m in modules):
        return None
    if len({m.lora_A.shape[0] for m in modules}) != 1:
        return None
    return linalg.LowRank(B=torch.stack([m.lora_B for m in modules]), A=torch.stack([m.lora_A for m in modules]),
                          scale=torch.tensor([m.scaling for m in modules], dtype=torch.float64))


def adapter_columns(pairs: list[Pair]) -> torch.Tensor | None:
    """LoRA B columns ``[L, out, r]`` fp32 (B spans the output space, where intruders appear), when every pair is a
    non-embedding adapter module of one rank; else None. Extra start vectors for the tuned SVD."""
    modules = [pair.adapter for pair in pairs]
    if any(m is None or m.embedding for m in modules) or len({m.lora_B.shape for m in modules}) != 1:
        return None
    return torch.stack([m.lora_B.float() for m in modules])


def stack(matrices: list[torch.Tensor]) -> torch.Tensor:
    """``[L, m, n]`` from L matrices; a view, not a copy, when L = 1 (the usual case for big matrices)."""
    return matrices[0].unsqueeze(0) if len(matrices) == 1 else torch.stack(matrices)


@dataclass
class LoadedBatch:
    """One batch of same-shape matrices, ``L`` of them, ready for the linear algebra.

    batch: the ``L`` base matrices' pairs (their names, orientations and shapes).
    pairs: per tuned source, its pairs among the batch's (all ``L`` unless sources adapt different matrices).
    rows: per tuned source, the positions of its pairs in the batch (``W0[rows]`` is what it is compared with).
    stored: the ``L`` base tensors as stored (dtype and orientation of the file: cache fingerprints).
    W0: ``[L, m, n]`` base stack in the analysed orientation, on the device.
    tuned: per tuned source, ``Wt [L', m, n]`` (L' = len(rows)) or its update kept factored
        (:class:`~lorafft.linalg.LowRank`); None for a source with no matrix in this batch.
    cached: the batch's base bases read from a base cache, ``(basis [L, s, s] fp32, sigma [L, s] fp64, row norms
        [L, m] fp64)``, or None (not all cached, or no cache).
    columns: per tuned source, the adapter's B columns ``[L', m, r]`` (:func:`adapter_columns`) or None.
    scales: per tuned source, the dequantisation scale of ``Wt`` kept float8 as stored (``native`` only; a
        :class:`~lorafft.scales.Scale` with the format's block side: ``Wt · scale`` is the matrix,
        :func:`lorafft.linalg.truncated_svd`'s ``scale``); None when ``Wt`` is the matrix itself.
    """

    batch: list[Pair]
    pairs: list[list[Pair]]
    rows: list[list[int]]
    stored: list[torch.Tensor]
    W0: torch.Tensor
    tuned: list[torch.Tensor | linalg.LowRank | None]
    columns: list[torch.Tensor | None]
    scales: list[Scale | None]
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def select(self, positions: list[int]) -> LoadedBatch:
        """The batch restricted to the matrices at ``positions`` (an out-of-memory retry splits a batch in two)."""
        pairs, rows, tuned, columns, scales = [], [], [], [], []
        for source_pairs, source_rows, entry, column, scale in zip(self.pairs, self.rows, self.tuned, self.columns,
                                                                    self.scales):
            keep = [index for index, row in enumerate(source_rows) if row in positions]
            pairs.append([source_pairs[index] for index in keep])
            rows.append([positions.index(source_rows[index]) for index in keep])
            tuned.append(None if not keep else entry.select(keep) if isinstance(entry, linalg.LowRank)
                         else entry[keep])
            columns.append(None if column is None or not keep else column[keep])
            scales.append(None if scale is None or not keep else scale.select(keep))
        cached = None if self.cached is None else tuple(t[positions] for t in self.cached)
        return LoadedBatch(batch=[self.batch[p] for p in positions], pairs=pairs, rows=rows,
                           stored=[self.stored[p] for p in positions], W0=self.W0[positions], tuned=tuned,
                           columns=columns, scales=scales, cached=cached)


def dense_or_update(entry: torch.Tensor | linalg.LowRank) -> tuple[torch.Tensor | None, linalg.LowRank | None]:
    """A :attr:`LoadedBatch.tuned` entry as :func:`lorafft.analysis.analyze` takes it: ``(Wt, None)`` for a dense
    stack, ``(None, update)`` for a LoRA update kept factored."""
    return (None, entry) if isinstance(entry, linalg.LowRank) else (entry, None)


def native_stack(read: list[tuple[torch.Tensor, torch.Tensor | None]],
                 pairs: list[Pair]) -> tuple[torch.Tensor, Scale | None]:
    """``(Wt [L, m, n], scale | None)`` from a full fine-tune's tensors read as stored (``Checkpoint.get_stored``;
    never transposed: only adapter pairs are) for the Triton kernels: float8 weights as stored with their scales
    stacked (``[L]``, ``[L, m]`` or ``[L, mb, nb]``, tiles of :data:`lorafft.io.fp8.FP8_BLOCK`) when every one has
    a scale of one layout; otherwise each dequantised (fp32) for this batch, and fp16/bf16 as stored."""
    scales = [scale for _, scale in read]
    if all(scale is not None for scale in scales) and len({scale.shape for scale in scales}) == 1:
        return stack([tensor for tensor, _ in read]), Scale(stack(scales), fp8.FP8_BLOCK)
    return stack([oriented(tensor if scale is None else fp8.dequantize(tensor, scale, fp8.layout_scheme(scale)), pair,
                           native=True) for (tensor, scale), pair in zip(read, pairs)]), None


class _ShardReleaser:
    """Reads tensors of one checkpoint in a planned order and releases each shard right after the last tensor the
    plan reads from it, so a scan holds only the shards it still needs."""

    def __init__(self, checkpoint: io.Checkpoint, names: list[str]):
        self.checkpoint = checkpoint
        self.remaining = collections.Counter(checkpoint.file_of(name) for name in names)

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, self.checkpoint.get)

    def get_stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._read(name, self.checkpoint.get_stored)

    def _read(self, name: str, read):
        tensor = read(name)
        file = self.checkpoint.file_of(name)
        self.remaining[file] -= 1
        if self.remaining[file] == 0:
            self.checkpoint.release(file)
        return tensor


class BatchLoader:
    """Loads batches of pairs of one base and any number of tuned sources (none: base only, for a base cache).

    Args:
        base: the opened base checkpoint.
        sources: the opened tuned inputs (Checkpoints or io.Adapters).
        pairs_by_source: per source, ``{base name: Pair}`` of the matrices it changes (a batch may name others).
        device: where loaded stacks go.
        native: keep fp16/bf16 weights as stored (the Triton kernels read them), else fp32.
        factored: keep LoRA updates factored (:func:`adapter_update`); False merges every adapter module.
        fp8_stored: with ``native``, keep a full fine-tune's FP8 weights float8 as stored and hand their scales in
            :attr:`LoadedBatch.scales` (the consumer passes them on as ``scale=``); else they are dequantised.
    """

    def __init__(self, base: io.Checkpoint, sources: list, pairs_by_source: list[dict[str, Pair]], *,
                 device: torch.device | str = "cpu", native: bool = False, factored: bool = True,
                 fp8_stored: bool = False, read_bases=None):
        self.base, self.sources, self.pairs_by_source = base, sources, pairs_by_source
        self.device, self.native, self.factored = torch.device(device), native, factored
        self.fp8_stored = native and fp8_stored
        self.read_bases = read_bases  # (pairs, stored tensors) -> LoadedBatch.cached or None, in the reader thread
        self.profile = profiling.current()

    def batches(self, batches: list[list[Pair]]) -> Iterator[tuple[int, LoadedBatch]]:
        """``(position, LoadedBatch)`` for each batch in order, read ahead by one thread, on the device."""
        names = [pair.name for batch in batches for pair in batch]
        base = _ShardReleaser(self.base, names)
        tuned = [source if isinstance(source, io.Adapter) else
                 _ShardReleaser(source, [pairs[name].tuned_name for name in names])
                 for source, pairs in zip(self.sources, self.pairs_by_source)]

        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def load(position: int):
            with profiling.stage("read", profile=self.profile):
                loaded = self._load(batches[position], base, tuned)
                if self.read_bases is not None:
                    loaded.cached = self.read_bases(batches[position], loaded.stored)
            if stream is None:
                return loaded
            with profiling.stage("to_device", profile=self.profile):
                return self._sent(loaded, stream)

        for position, loaded in prefetched(load, list(range(len(batches)))):
            with profiling.stage("to_device", self.device if stream is not None else None, profile=self.profile):
                moved = _mapped(loaded, lambda t: t.to(self.device)) if stream is None else self._arrived(*loaded)
            yield position, moved

    def _load(self, batch: list[Pair], base: _ShardReleaser, tuned: list) -> LoadedBatch:
        stored = [base.get(pair.name) for pair in batch]
        W0 = stack([oriented(tensor, pair, native=self.native) for tensor, pair in zip(stored, batch)])
        loaded = LoadedBatch(batch=batch, pairs=[], rows=[], stored=stored, W0=W0, tuned=[], columns=[], scales=[])
        for source, pairs in zip(tuned, self.pairs_by_source):
            rows = [index for index, pair in enumerate(batch) if _same_matrix(pairs.get(pair.name), pair)]
            here = [pairs[batch[index].name] for index in rows]
            update = adapter_update(here) if self.factored and here else None
            scale = None
            if update is None and here and self.fp8_stored and all(pair.adapter is None for pair in here):
                update, scale = native_stack([source.get_stored(pair.tuned_name) for pair in here], here)
            elif update is None and here:
                update = stack([merged(pair, W0[index]) if pair.adapter is not None
                                else oriented(source.get(pair.tuned_name), pair, native=self.native)
                                for pair, index in zip(here, rows)])
            loaded.pairs.append(here)
            loaded.rows.append(rows)
            loaded.tuned.append(update)
            loaded.columns.append(adapter_columns(here) if here else None)
            loaded.scales.append(scale)
        return loaded

    def _sent(self, loaded: LoadedBatch, stream: torch.cuda.Stream) -> tuple[LoadedBatch, torch.cuda.Event]:
        """In the reader thread: the batch pinned in host memory and copied to the device on ``stream`` without
        blocking, and the event that marks the copies done. (The pinned buffers may be dropped at once: torch's
        host allocator keeps them until the copies that read them have finished.)"""
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            moved = _mapped(loaded, lambda t: t.pin_memory().to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(stream)
        return moved, event

    def _arrived(self, moved: LoadedBatch, event: torch.cuda.Event) -> LoadedBatch:
        """In the consumer: the current stream waits for the copies, and each copied tensor is marked as used on
        it, so the allocator does not hand its memory back to the copy stream while the analysis still reads it."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)

        def used_here(tensor: torch.Tensor) -> torch.Tensor:
            tensor.record_stream(current)
            return tensor

        return _mapped(moved, used_here)


def _mapped(loaded: LoadedBatch, move) -> LoadedBatch:
    """``loaded`` with ``move`` applied to every tensor the analysis reads (W0, tuned stacks or factors, columns,
    scales, cached bases); ``stored`` stays on the host (cache fingerprints)."""
    def each(entry):
        if isinstance(entry, linalg.LowRank):
            return linalg.LowRank(B=move(entry.B), A=move(entry.A), scale=move(entry.scale))
        if isinstance(entry, Scale):
            return Scale(move(entry.values), entry.block)
        return None if entry is None else move(entry)

    return LoadedBatch(batch=loaded.batch, pairs=loaded.pairs, rows=loaded.rows, stored=loaded.stored,
                       W0=move(loaded.W0),
                       tuned=[each(entry) for entry in loaded.tuned], columns=[each(c) for c in loaded.columns],
                       scales=[each(scale) for scale in loaded.scales],
                       cached=None if loaded.cached is None else tuple(move(t) for t in loaded.cached))


def _same_matrix(pair: Pair | None, reference: Pair) -> bool:
    """True when a source's ``pair`` compares the batch's base matrix ``reference`` in the same orientation."""
    return pair is not None and pair.shape == reference.shape and pair.transposed == reference.transposed


def prefetched(load, items: list):
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
