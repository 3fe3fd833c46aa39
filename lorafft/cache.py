"""Base-spectrum cache: the expensive part of a scan (every base singular vector) computed once, reused by every
scan of a fine-tune of that base.

Layout of a cache directory: ``lorafft-base-cache.json`` (the index: format version, ``hub`` ``{"id", "revision"}``
when ``lorafft cache build`` read the base as a Hub id, and per base tensor name its entry file, shape,
analysed-side layout and fingerprint) and one safetensors file per matrix holding ``basis``
(the smaller side's singular vectors as columns, ``[s, s]`` fp32, ordered by descending singular value) and
``sigma`` (``[s]`` fp64). Only the smaller side is stored; the other is one product with W0 away.

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

from lorafft import linalg, loading, pairing
from lorafft.errors import InputError
from lorafft.io import hub
from lorafft.io.jsonfile import read_json_object
from lorafft.io.writer import write_json, write_safetensors
from lorafft.options import DEFAULT_MAX_BATCH_BYTES, patterns

INDEX = "lorafft-base-cache.json"
FORMAT_VERSION = 1
_SAMPLES = 1 << 18


def fingerprint(W0: torch.Tensor) -> str:
    """Hex BLAKE2b digest of ``W0``'s shape, dtype and a strided sample of its elements (as stored)."""
    flat = W0.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLES)].contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(W0.shape)}|{W0.dtype}".encode())
    digest.update(sample.cpu().view(torch.uint8).numpy().tobytes())  # a live model's weight may be on a GPU
    return digest.hexdigest()


def _checked_entries(entries, index_path: str) -> dict[str, dict]:
    """The index's entries, each ``{"file": a file name in the cache directory, "shape": [out, in], "fingerprint":
    str}``; InputError naming the index for anything else."""
    if not isinstance(entries, dict):
        raise InputError(index_path, "'entries' is not an object")
    for name, entry in entries.items():
        fine = (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("fingerprint"),
                str) and os.path.basename(entry["file"]) == entry["file"] and entry["file"] not in ("", ".", "..")
                and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry["shape"]))
        if not fine:
            raise InputError(index_path, f"entry '{name}' is not {{file, shape [out, in], fingerprint}}")
    return entries


def _entry_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors"


class BaseCache:
    """A cache directory, opened for reading (and writing with ``writable=True``: created at the first entry)."""

    def __init__(self, directory, *, writable: bool = False):
        self.directory = os.fspath(directory)
        self.index_path = os.path.join(self.directory, INDEX)
        self.entries: dict[str, dict] = {}
        self.hub: dict | None = None  # {"id", "revision"} of the base, when built from a Hub id
        if os.path.isfile(self.index_path):
            index = read_json_object(self.index_path, what="base-cache index")
            if index.get("format_version") != FORMAT_VERSION:
                raise InputError(self.index_path, f"not a lorafft base cache of format version {FORMAT_VERSION}")
            self.entries = _checked_entries(index.get("entries", {}), self.index_path)
            self.hub = index.get("hub")
        elif not writable:
            raise InputError(self.directory, f"no base cache here (no {INDEX}); build one with 'lorafft cache build'")

    def lookup(self, name: str, W0_stored: torch.Tensor,
               shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(basis [s, s] fp32, sigma [s] fp64)`` for base tensor ``name`` analysed as ``shape``, or None if not
        cached (or cached in the other orientation, e.g. a GPT-2 Conv1D weight scanned with and without an adapter).

        ``W0_stored`` is the base tensor as stored in its checkpoint; a cache entry with another fingerprint is
        an InputError (the cache belongs to another model or revision).
        """
        entry = self.entries.get(name)
        if entry is None or tuple(entry["shape"]) != tuple(shape):
            return None
        if entry["fingerprint"] != fingerprint(W0_stored):
            raise InputError(self.index_path, f"entry '{name}' was built from another tensor (fingerprint "
                                              f"differs): the cache belongs to another base model or revision")
        path = os.path.join(self.directory, entry["file"])
        try:
            tensors = load_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable entry file is the same bad input
            raise InputError(path, f"unreadable base-cache entry: {e}") from None
        s = min(shape)
        basis, sigma = tensors.get("basis"), tensors.get("sigma")
        if basis is None or sigma is None or tuple(basis.shape) != (s, s) or tuple(sigma.shape) != (s,):
            raise InputError(path, f"base-cache entry for '{name}' does not hold basis [{s}, {s}] and sigma [{s}]")
        return basis, sigma

    def store(self, name: str, W0_stored: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor,
              shape: tuple[int, int]) -> None:
        """Write one entry (atomically) and the index: ``basis [s, s]`` stored fp32, ``sigma [s]`` fp64, for the
        base tensor ``name`` analysed as ``shape`` (``[out, in]``). InputError when the cache holds ``name`` built
        from another tensor: a cache holds one base model."""
        digest = fingerprint(W0_stored)
        if name in self.entries and self.entries[name]["fingerprint"] != digest:
            raise InputError(self.index_path, f"entry '{name}' was built from another tensor (fingerprint differs): "
                                              f"the cache belongs to another base model or revision; write the "
                                              f"bases into a new directory")
        os.makedirs(self.directory, exist_ok=True)
        file = _entry_file(name)
        write_safetensors(os.path.join(self.directory, file), {"basis": basis.float(), "sigma": sigma.double()},
                          metadata={"name": name})
        self.entries[name] = {"file": file, "shape": list(shape), "fingerprint": digest}
        self.write_index()

    def write_index(self) -> None:
        """Write the index (atomically): format version, ``hub`` when set, entries."""
        index = {"format_version": FORMAT_VERSION, **({"hub": self.hub} if self.hub else {}), "entries": self.entries}
        write_json(self.index_path, index, indent=1)


def cached_basis(W0: torch.Tensor, bases: list[torch.Tensor], sigmas: list[torch.Tensor]) -> linalg.BaseBasis:
    """A :class:`~lorafft.linalg.BaseBasis` for ``W0 [L, m, n]`` from cached explicit small-side bases
    ``[s, s]`` fp32 (``BaseBasis.project`` works in fp64 on the larger side, where it divides by sigma_i)."""
    sigma, Z = torch.stack(sigmas).double().to(W0.device), torch.stack(bases).to(W0.device)
    return linalg.BaseBasis(W0=W0, sigma=sigma, Z=Z, reflectors=None, tau=None)


def batch_basis(W0: torch.Tensor, stored: list[torch.Tensor], names: list[str], reader: BaseCache | None = None,
                writer: BaseCache | None = None) -> linalg.BaseBasis:
    """The base basis of a batch ``W0 [L, m, n]`` (analysed orientation) of the base tensors ``names`` (``stored``
    as their checkpoint holds them): read from ``reader`` when every matrix is there in this orientation, else
    computed (:func:`lorafft.linalg.base_basis`) and stored in ``writer`` when given."""
    shape = tuple(W0.shape[1:])
    if reader is not None:
        found = [reader.lookup(name, tensor, shape) for name, tensor in zip(names, stored)]
        if all(entry is not None for entry in found):
            return cached_basis(W0, [basis for basis, _ in found], [sigma for _, sigma in found])
    basis = linalg.base_basis(W0)
    if writer is not None:
        for index, (name, tensor) in enumerate(zip(names, stored)):
            writer.store(name, tensor, basis.small_basis_fp32[index].cpu(), basis.sigma[index].cpu(), shape)
    return basis


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
                 if len(checkpoint.shape(name)) == 2 and 0 not in checkpoint.shape(name) and scope.admits(name)]
        if not pairs:
            raise InputError(checkpoint.path, "no 2-D weight matrices in scope")
        writer = BaseCache(directory, writable=True)
        if "hub" in located.record:
            writer.hub = located.record["hub"]["base"]
        batches = pairing.shape_batches(pairs, max_batch_bytes, copies=1)
        loader = loading.BatchLoader(checkpoint, [], [], device=device)
        with tqdm(total=len(batches), unit="batch", disable=not progress, desc="lorafft cache") as bar:
            for position, loaded in loader.batches(batches):
                batch_basis(loaded.W0, loaded.stored, [pair.name for pair in batches[position]], writer, writer)
                bar.update(1)
        writer.write_index()  # the hub record also when every entry was there already
    return writer
