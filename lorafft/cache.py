"""Base-spectrum cache: the expensive part of a scan (every base singular vector) computed once, reused by every
scan of a fine-tune of that base.

Layout of a cache directory: ``lorafft-base-cache.json`` (the index: format version, ``hub`` ``{"id", "revision"}``
when ``lorafft cache build`` read the base as a Hub id, and a list of entries) and one safetensors file per entry
holding ``basis`` (the smaller side's singular vectors as columns, ``[s, s]`` fp32, ordered by descending singular
value) and ``sigma`` (``[s]`` fp64). Only the smaller side is stored; the other is one product with W0 away.

An entry is bound to exactly what it answers for: the base tensor's ``name``, the ``orientation`` it was analysed in
(``"stored"``, or ``"transposed"`` for a PEFT ``fan_in_fan_out`` module, whose ``[in, out]`` weight is analysed as
``[out, in]``), the analysed ``shape``, the ``side`` its basis spans, the stored ``dtype`` and a ``fingerprint`` of the
stored tensor. A lookup matches all of them or misses (a square GPT-2 ``c_proj`` analysed both ways has two entries);
an entry of that name and orientation built from another tensor is an InputError (the cache belongs to another
model or revision). Entry file names are the name made file-safe and cut to 80 characters, plus a hash of name and
orientation: unique and bounded. Every basis read is checked against the matrix it answers for (its top base vectors
must be singular vectors of W0 with the cached σ: :func:`cached_basis`), so a cache that lies is an error, not rows.

Writers (``cache build``, ``scan --write-base-cache``, concurrently or not) merge their entries into the index under
a lock (:class:`lorafft.io.writer.FileLock`), so no one's entries are lost.

Precision, measured against fp64 SVD (max|cos| of LoRA-tuned top-10 vectors, all-MiniLM-L6-v2 384×384 and
384×1536, synthetic 1024×2752; ``benchmarks/measure_claims.py``): an fp32 basis is off by at most 1.3e-8, fp16 by
up to 7.2e-5, bf16 by up to 1.1e-3. fp32 keeps the cache exact; a Llama-70B's bases then take about 108 GB.

Fingerprint: BLAKE2b of the tensor's shape, dtype and 2^18 evenly strided elements (cheap enough to check on every
scan). It refuses a cache built from another model or another revision; it cannot see an edit that touches none
of the sampled elements.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch
from safetensors.torch import load_file

from lorafft import linalg, loading, memory, pairing
from lorafft.errors import InputError
from lorafft.io import hub
from lorafft.io.checkpoint import all_finite
from lorafft.io.jsonfile import read_json_object
from lorafft.io.writer import FileLock, write_json, write_safetensors
from lorafft.options import CACHE_INDEX as INDEX
from lorafft.options import DEFAULT_MAX_BATCH_BYTES, patterns

FORMAT_VERSION = 2
ORIENTATIONS = ("stored", "transposed")
_SAMPLES = 1 << 18
_FIELDS = {"name": str, "orientation": str, "shape": list, "side": str, "dtype": str, "fingerprint": str, "file": str}


def fingerprint(W0: torch.Tensor) -> str:
    """Hex BLAKE2b digest of ``W0``'s shape, dtype and a strided sample of its elements (as stored)."""
    flat = W0.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLES)].contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(W0.shape)}|{W0.dtype}".encode())
    digest.update(sample.cpu().view(torch.uint8).numpy().tobytes())  # a live model's weight may be on a GPU
    return digest.hexdigest()


def entry_key(pair: pairing.Pair) -> tuple[str, str]:
    """``(base tensor name, orientation)``: what one cache entry answers for."""
    return pair.name, "transposed" if pair.transposed else "stored"


def entry_file(name: str, orientation: str) -> str:
    """The entry's file name: file-safe, at most 80 characters of the name, and a hash of the whole key, so that two
    names that read alike (``blk/q.weight``, ``blk_q.weight``) never share a file."""
    digest = hashlib.blake2b(f"{name}\0{orientation}".encode(errors="surrogatepass"), digest_size=8).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:80]}-{digest}.safetensors"


def _small_side(shape) -> str:
    return "left" if shape[0] <= shape[1] else "right"


def _checked_entries(index: dict, index_path: str) -> dict[tuple[str, str], dict]:
    """The index's entries by :func:`entry_key`, each checked to hold :data:`_FIELDS` as ``cache build`` writes them
    (a file name in the cache directory, the file name of its key); InputError naming the index otherwise."""
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        older = " (an older lorafft's, which did not bind entries to an orientation): rebuild it" if version == 1 else ""
        raise InputError(index_path, f"not a lorafft base cache of format version {FORMAT_VERSION}{older}")
    entries = index.get("entries", [])
    if not isinstance(entries, list):
        raise InputError(index_path, "'entries' is not a list")
    checked = {}
    for number, entry in enumerate(entries):
        fine = (isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in _FIELDS.items())
                and entry["orientation"] in ORIENTATIONS and len(entry["shape"]) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry["shape"])
                and entry["side"] == _small_side(entry["shape"])
                and entry["file"] == entry_file(entry["name"], entry["orientation"]))
        if not fine:
            raise InputError(index_path, f"entry {number} is not {{name, orientation, shape [out, in], side, dtype, "
                                         f"fingerprint, file}} as lorafft cache build writes it")
        checked[(entry["name"], entry["orientation"])] = entry
    return checked


class BaseCache:
    """A cache directory, opened for reading (and writing with ``writable=True``: created at the first entry)."""

    def __init__(self, directory, *, writable: bool = False):
        self.directory = os.fspath(directory)
        self.index_path = os.path.join(self.directory, INDEX)
        self.entries: dict[tuple[str, str], dict] = {}
        self.hub: dict | None = None  # {"id", "revision"} of the base, when built from a Hub id
        if os.path.isfile(self.index_path):
            self._read_index()
        elif not writable:
            raise InputError(self.directory, f"no base cache here (no {INDEX}); build one with 'lorafft cache build'")

    def _read_index(self) -> None:
        index = read_json_object(self.index_path, what="base-cache index")
        self.entries = _checked_entries(index, self.index_path)
        self.hub = index.get("hub", self.hub)

    @property
    def names(self) -> set[str]:
        """The base tensor names the cache holds (in any orientation)."""
        return {name for name, _ in self.entries}

    def entry_path(self, pair: pairing.Pair) -> str:
        """The entry file that answers (or would answer) for the base matrix of ``pair``."""
        return os.path.join(self.directory, entry_file(*entry_key(pair)))

    def lookup(self, pair: pairing.Pair, W0_stored: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``{"basis": [s, s] fp32, "sigma": [s] fp64, "row_norms": [m] fp64}`` for the base matrix of ``pair`` (name,
        orientation, analysed shape ``[m, n]``), or None when the cache has no entry for exactly that.

        ``W0_stored`` is the base tensor as its checkpoint stores it: an entry of this name and orientation built
        from another tensor (fingerprint, dtype) is an InputError (the cache belongs to another model or revision).
        """
        if self._entry(pair, W0_stored) is None:
            return None
        path = self.entry_path(pair)
        try:  # mapped, not copied: the finite check below reads every page here, in the loader's thread
            tensors = load_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable entry file is the same bad input
            raise InputError(path, f"unreadable base-cache entry: {e}") from None
        m, s = pair.shape[0], min(pair.shape)
        shapes = {"basis": (s, s), "sigma": (s,), "row_norms": (m,)}
        if any(tuple(getattr(tensors.get(key), "shape", ())) != shape for key, shape in shapes.items()):
            raise InputError(path, f"base-cache entry for '{pair.name}' does not hold basis [{s}, {s}], sigma [{s}] "
                                   f"and row_norms [{m}]")
        if not all(all_finite(tensors[key]) for key in shapes):
            raise InputError(path, f"base-cache entry for '{pair.name}' holds NaN or Inf: rebuild it")
        return tensors

    def _entry(self, pair: pairing.Pair, W0_stored: torch.Tensor) -> dict | None:
        """The index entry answering for the base matrix of ``pair``, or None; InputError for one of this name and
        orientation built from another tensor (fingerprint, dtype or shape differ)."""
        entry = self.entries.get(entry_key(pair))
        if entry is not None and (entry["fingerprint"] != fingerprint(W0_stored) or entry["dtype"] !=
                                  str(W0_stored.dtype) or tuple(entry["shape"]) != tuple(pair.shape)):
            raise _other_model(self.index_path, pair.name)
        return entry

    def holds(self, pairs: list[pairing.Pair], stored: list[torch.Tensor]) -> bool:
        """Whether every matrix of ``pairs`` has its entry (no file read); InputError for one built from another
        tensor."""
        return all(self._entry(pair, tensor) is not None for pair, tensor in zip(pairs, stored))

    def read(self, pairs: list[pairing.Pair],
             stored: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A batch's cached bases stacked, ``(basis [L, s, s] fp32, sigma [L, s] fp64, row norms [L, m] fp64)``, when
        every matrix of ``pairs`` is cached in its orientation; else None (the batch computes its bases). What the
        loader's reader thread calls (:class:`lorafft.loading.BatchLoader`)."""
        found = [self.lookup(pair, tensor) for pair, tensor in zip(pairs, stored)]
        if any(entry is None for entry in found):
            return None
        return tuple(loading.stack([entry[key] for entry in found]) for key in ("basis", "sigma", "row_norms"))

    def store(self, pairs: list[pairing.Pair], stored: list[torch.Tensor], basis: linalg.BaseBasis) -> None:
        """Write one entry per matrix of a batch (each file atomically) and merge them into the index: the small
        side's basis ``[s, s]`` stored fp32, ``sigma [s]`` and W0's row norms ``[m]`` fp64, for the base matrices of
        ``pairs`` (analysed orientation and shape; ``stored``: the tensors as their checkpoint holds them).
        InputError when the cache holds one of them built from another tensor: a cache holds one base model."""
        os.makedirs(self.directory, exist_ok=True)
        new = {}
        for pair, tensor, small_basis, values, rows in zip(pairs, stored, basis.small_basis_fp32, basis.sigma,
                                                          basis.base_rows()):
            name, orientation = key = entry_key(pair)
            entry = {"name": name, "orientation": orientation, "shape": list(pair.shape),
                     "side": _small_side(pair.shape), "dtype": str(tensor.dtype), "fingerprint": fingerprint(tensor),
                     "file": entry_file(name, orientation)}
            known = self.entries.get(key)
            if known is not None and known["fingerprint"] != entry["fingerprint"]:
                raise _other_model(self.index_path, name)
            write_safetensors(os.path.join(self.directory, entry["file"]),
                              {"basis": small_basis.float().cpu(), "sigma": values.double().cpu(),
                               "row_norms": rows.double().cpu()},
                              metadata={"name": name, "orientation": orientation})
            new[key] = entry
        self.write_index(new)

    def write_index(self, new: dict[tuple[str, str], dict] | None = None) -> None:
        """Merge ``new`` entries into the index on disk and write it (atomically, under the cache's lock, so that
        concurrent writers keep each other's entries): format version, ``hub`` when set, entries."""
        os.makedirs(self.directory, exist_ok=True)
        with FileLock(self.index_path, "base cache", wait=True):
            mine = {**self.entries, **(new or {})}
            if os.path.isfile(self.index_path):
                self._read_index()
            for key, entry in mine.items():
                known = self.entries.get(key)
                if known is not None and known["fingerprint"] != entry["fingerprint"]:
                    raise _other_model(self.index_path, key[0])
            self.entries.update(mine)
            index = {"format_version": FORMAT_VERSION, **({"hub": self.hub} if self.hub else {}),
                     "entries": list(self.entries.values())}
            write_json(self.index_path, index, indent=1)


def _other_model(index_path: str, name: str) -> InputError:
    return InputError(index_path, f"entry '{name}' was built from another tensor (fingerprint differs): the cache "
                                  f"belongs to another base model or revision; write the bases into a new directory")


def cached_basis(W0: torch.Tensor, cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> linalg.BaseBasis:
    """An ``"explicit32"`` :class:`~lorafft.linalg.BaseBasis` for ``W0 [L, m, n]`` from a batch's cached bases
    (:meth:`BaseCache.read`: ``basis [L, s, s]`` fp32, ``sigma``, row norms), not yet verified against W0: the
    analysis checks its top vectors before using it (:meth:`lorafft.linalg.BaseBasis.answers`)."""
    basis, sigma, rows = (t.to(W0.device) for t in cached)
    return linalg.BaseBasis(W0=W0, sigma=sigma.double(), Z=basis.float(), kind="explicit32", row_norms=rows.double(),
                            verified=False)


def build_base_cache(base, directory, *, revision: str | None = None, include=(), exclude=(),
                     embeddings: bool = False, split_fused: bool = False,
                     max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, device: torch.device | str = "cpu",
                     progress: bool = False) -> BaseCache:
    """Compute and store the basis of every 2-D base weight in scope (as stored, ``[out, in]``) in ``directory``:
    ``lorafft cache build``. ``base``: a path, a state dict or a Hub id (``revision``: its branch, tag or commit;
    :func:`lorafft.io.hub.locate`), an id recorded as the index's ``hub``. Entries already there with the right
    fingerprint are kept; one built from another tensor is an InputError (a cache holds one base: build into a new
    directory). ``split_fused``: the parts of fused projections, as ``scan(..., split_fused=True)`` reads
    them. ``device``: where the bases are computed (on CUDA the fp64 Gram and ``torch.linalg.eigh`` run on the GPU);
    entries are stored from the host either way (sigma fp64, the small-side basis fp32). Returns the cache."""
    from tqdm.auto import tqdm

    scope = pairing.Scope(patterns(include, "include"), patterns(exclude, "exclude"), embeddings)
    located = hub.locate_inputs(base, [], revision=revision)
    with loading.open_base(located.base, split_fused=split_fused) as checkpoint:
        pairs = [pairing.Pair(name, name, tuple(checkpoint.shape(name))) for name in checkpoint.names()
                 if len(checkpoint.shape(name)) == 2 and 0 not in checkpoint.shape(name) and scope.admits(name)
                 and pairing.not_a_weight(checkpoint.dtype(name)) is None]
        if not pairs:
            raise InputError(checkpoint.path, "no 2-D weight matrices in scope")
        writer = BaseCache(directory, writable=True)
        if "hub" in located.record:
            writer.hub = located.record["hub"]["base"]
        device = torch.device(device)
        plan = memory.Plan(device=device.type, base_itemsize=2 if device.type == "cuda" else 4, sources=(), k=0)
        batches = pairing.shape_batches(pairs, lambda shape: memory.batch_size(shape, max_batch_bytes, plan))
        loader = loading.BatchLoader(checkpoint, [], [], device=device, native=device.type == "cuda")
        with tqdm(total=len(batches), unit="batch", disable=not progress, desc="lorafft cache") as bar:
            for position, loaded in loader.batches(batches):
                batch = batches[position]
                if not writer.holds(batch, loaded.stored):
                    writer.store(batch, loaded.stored, linalg.base_basis(loaded.W0))
                bar.update(1)
        writer.write_index()  # the hub record also when every entry was there already
    return writer
