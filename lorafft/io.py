"""Reading checkpoints: the only code that knows about files, shards and dtypes.

:func:`open_checkpoint` turns a Hugging Face checkpoint directory, a single ``.safetensors``/``.bin``/``.pt``/``.pth``
file, a shard index ``.json`` or an in-memory ``{name: tensor}`` dict into a :class:`Checkpoint`, which hands out one
tensor at a time (CPU, stored dtype). :func:`open_adapter` does the same for a PEFT adapter directory.

Every file is untrusted: each problem with one is raised as :class:`~lorafft.errors.InputError` naming that file.
Safetensors headers are validated here (:func:`_read_safetensors_header`) before the safetensors library sees the
file, and ``.bin`` files are only ever unpickled with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from lorafft.errors import InputError

STATE_DICT = "<state dict>"  # the path named in messages about an in-memory state dict

# Files looked for in a checkpoint directory, in this order.
_LAYOUT = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_FINITE_CHECK_CHUNK = 1 << 24  # elements per torch.isfinite call, bounding its temporary bool tensor

_Meta = tuple[torch.dtype, tuple[int, ...]]  # (stored dtype, shape) of one tensor


# ---------------------------------------------------------------------------------------------------------------
# Validation of untrusted input


def _read_safetensors_header(path: str) -> dict[str, _Meta]:
    """Validate a safetensors file's header against the file and return ``{name: (dtype, shape)}``.

    Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data bytes. Each tensor's
    ``data_offsets`` are relative to the data start; together they must tile the data exactly, without overlap.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InputError(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER_BYTES:
                raise InputError(path, f"truncated or corrupt header: header length {n} exceeds the 100 MB limit")
            if 8 + n > size:
                raise InputError(path, f"truncated or corrupt header: header length {n} "
                                       f"but only {size - 8} bytes follow")
            raw = f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise InputError(path, f"header is not a JSON object (got {type(header).__name__})")

    data_size = size - 8 - n
    metas: dict[str, _Meta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise InputError(path, "__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict):
            raise InputError(path, f"tensor '{name}': header entry is not a JSON object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise InputError(path, f"tensor '{name}': header entry has no {', '.join(missing)}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise InputError(path, f"tensor '{name}': unknown dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise InputError(path, f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise InputError(path, f"tensor '{name}': data_offsets must be [begin, end] integers with "
                                   f"0 <= begin <= end, got {offsets!r}")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        begin, end = offsets
        needed = math.prod(shape) * dtype.itemsize
        if end - begin != needed:
            raise InputError(path, f"tensor '{name}': {end - begin} bytes for {dtype_name} {shape} (needs {needed})")
        if end > data_size:
            raise InputError(path, f"truncated: tensor '{name}' ends at byte {end} "
                                   f"but the file has {data_size} data bytes")
        metas[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))

    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise InputError(path, f"tensors '{previous}' and '{name}' overlap (data bytes {begin}..{covered})")
        if begin > covered:
            raise InputError(path, f"data bytes {covered}..{begin} (before tensor '{name}') belong to no tensor")
        covered, previous = end, name
    if covered != data_size:
        raise InputError(path, f"the last {data_size - covered} data bytes belong to no tensor")
    return metas


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_torch(path: str) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` file (zip format memory-mapped, legacy format read whole) as ``{name: tensor}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt or hostile files make torch raise many different types
        raise InputError(path, f"cannot read PyTorch checkpoint: {_short_reason(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _check_tensors(path, obj)


def _short_reason(e: Exception) -> str:
    """The first sentence of torch's (often multi-paragraph) error message."""
    text, prefix = str(e), ""
    if "WeightsUnpickler error:" in text:
        text, prefix = text.split("WeightsUnpickler error:", 1)[1], "refused by the weights_only unpickler: "
    first = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0]
    return prefix + (first or type(e).__name__)[:200]


def _check_tensors(path: str, obj) -> dict[str, torch.Tensor]:
    """``obj`` itself if it maps strings to tensors, else InputError."""
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InputError(path, f"tensor name {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise InputError(path, f"'{name}' is not a tensor (got {type(value).__name__})")
    return dict(obj)


def read_json_object(path) -> dict:
    """Parse a JSON file that must hold an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _all_finite(t: torch.Tensor) -> bool:
    """False if a floating-point tensor holds NaN or Inf; checked in chunks to bound temporary memory."""
    if not t.is_floating_point():
        return True
    for chunk in t.reshape(-1).split(_FINITE_CHECK_CHUNK):
        if chunk.element_size() == 1:  # fp8 has no isfinite kernel; both formats fit fp16 exactly
            chunk = chunk.to(torch.float16)
        if not torch.isfinite(chunk).all():
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Shards: one file's tensors. Opening a shard is cheap; its data is mapped on first use and dropped by release().


class _SafetensorsShard:
    """A .safetensors file: header validated when constructed, data mapped by safe_open on the first tensor()."""

    def __init__(self, path: str):
        self.path = path
        self._metas = _read_safetensors_header(path)
        self._handle = None

    def names(self) -> Collection[str]:
        return self._metas.keys()

    def meta(self, name: str) -> _Meta:
        return self._metas[name]

    def tensor(self, name: str) -> torch.Tensor:
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return self._handle.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise InputError(self.path, f"cannot read safetensors data: {e}") from e

    def release(self) -> None:
        self._handle = None  # safe_open unmaps when dropped


class _TensorsShard:
    """A ``torch.save`` file or an in-memory state dict: ``load()`` gives ``{name: tensor}``, called on first use."""

    def __init__(self, path: str, load: Callable[[], dict[str, torch.Tensor]]):
        self.path = path
        self._load = load
        self._tensors: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._load()
        return self._tensors

    def names(self) -> Collection[str]:
        return self._loaded().keys()

    def meta(self, name: str) -> _Meta:
        t = self._loaded()[name]
        return t.dtype, tuple(t.shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._loaded()[name].detach().cpu()

    def release(self) -> None:
        self._tensors = None


_Shard = _SafetensorsShard | _TensorsShard


def _open_shard(file: str) -> _Shard:
    if file.endswith(".safetensors"):
        return _SafetensorsShard(file)
    if file.endswith(_TORCH_SUFFIXES):
        return _TensorsShard(file, lambda: _load_torch(file))
    raise InputError(file, "unsupported file type (expected .safetensors, .bin, .pt, .pth or an index .json)")


# ---------------------------------------------------------------------------------------------------------------
# Public API


class Checkpoint:
    """Named tensors of one checkpoint, read one at a time on the CPU in their stored dtype.

    Built by :func:`open_checkpoint`. Holds a map tensor name -> shard; a shard's data is mapped when one of its
    tensors is first touched and stays mapped until :meth:`release` or :meth:`close`.
    """

    def __init__(self, path: str, shard_of: dict[str, _Shard], index: str | None = None):
        self.path = path  # what messages name: the directory or file given, or "<state dict>"
        self._shard_of = shard_of
        self._shards = {shard.path: shard for shard in shard_of.values()}
        self._index = index  # the index file the name -> shard map came from, if any

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._shard_of)

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages); touches no data."""
        return self._shard(name, check=False).path

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, without reading its data."""
        return self._shard(name).meta(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor ``name``, without reading its data."""
        return self._shard(name).meta(name)[0]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: CPU, stored dtype. InputError if a floating-point tensor holds NaN or Inf."""
        shard = self._shard(name)
        tensor = shard.tensor(name)
        if not _all_finite(tensor):
            raise InputError(shard.path, f"tensor '{name}' contains NaN or Inf")
        return tensor

    def release(self, file: str) -> None:
        """Unmap one shard's data (it is mapped again if one of its tensors is touched later)."""
        self._shards[file].release()

    def close(self) -> None:
        """Unmap every shard."""
        for shard in self._shards.values():
            shard.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _shard(self, name: str, check: bool = True) -> _Shard:
        """The shard holding ``name``; with ``check``, InputError if an index listed it but the shard lacks it."""
        try:
            shard = self._shard_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None
        if check and name not in shard.names():
            raise _missing_from_shard(shard, name, self._index)
        return shard


def _missing_from_shard(shard: _Shard, name: str, index: str) -> InputError:
    return InputError(shard.path, f"tensor '{name}' listed in {os.path.basename(index)} is not in this shard")


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> Checkpoint:
    """Open a checkpoint directory, a single weights file, a shard index ``.json``, or a ``{name: tensor}`` dict.

    A directory is searched for ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` and ``pytorch_model.bin``, in that order; the first found is used.
    """
    if isinstance(source, Mapping):
        tensors = _check_tensors(STATE_DICT, source)
        shard = _TensorsShard(STATE_DICT, lambda: tensors)
        return Checkpoint(STATE_DICT, dict.fromkeys(tensors, shard))
    path = _existing(source)
    if not os.path.isdir(path):
        return _open_file(path, path)
    for candidate in _LAYOUT:
        file = os.path.join(path, candidate)
        if os.path.isfile(file):
            return _open_file(path, file)
    raise InputError(path, "no checkpoint found "
                           "(looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])")


@dataclass
class Adapter:
    """A PEFT adapter directory: its parsed ``adapter_config.json`` (uninterpreted) and its tensors."""

    path: str
    config: dict
    tensors: Checkpoint


def is_adapter(source) -> bool:
    """True if ``source`` is a directory containing ``adapter_config.json``."""
    return not isinstance(source, Mapping) and os.path.isfile(os.path.join(os.fspath(source), _ADAPTER_CONFIG))


def open_adapter(source: str | os.PathLike) -> Adapter:
    """Open a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)."""
    path = _existing(source)
    if not is_adapter(path):
        raise InputError(path, f"not a PEFT adapter directory (no {_ADAPTER_CONFIG})")
    config = read_json_object(os.path.join(path, _ADAPTER_CONFIG))
    for candidate in _ADAPTER_WEIGHTS:
        file = os.path.join(path, candidate)
        if os.path.isfile(file):
            return Adapter(path, config, _open_file(path, file))
    raise InputError(path, "no adapter_model.safetensors or adapter_model.bin")


def _existing(source: str | os.PathLike) -> str:
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(path, "no such file or directory")
    return path


def _open_file(path: str, file: str) -> Checkpoint:
    """A Checkpoint (named ``path``) from one weights file or a shard index ``.json``."""
    if file.endswith(".json"):
        return _open_index(path, file)
    shard = _open_shard(file)
    return Checkpoint(path, dict.fromkeys(shard.names(), shard))


def _open_index(path: str, index: str) -> Checkpoint:
    """A Checkpoint from a shard index (``{"weight_map": {tensor name: shard file name}}``, shards beside it)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(index, "no 'weight_map' object in the index")
    shards: dict[str, _Shard] = {}
    for name, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or os.path.basename(shard_name) != shard_name:
            raise InputError(index, f"weight_map entry for '{name}' is not a file name: {shard_name!r}")
        if shard_name not in shards:
            file = os.path.join(os.path.dirname(index), shard_name)
            if not os.path.isfile(file):
                raise InputError(index, f"shard '{shard_name}' named in the index does not exist")
            shards[shard_name] = _open_shard(file)
    for name, shard_name in weight_map.items():  # safetensors headers are already read: check them now
        shard = shards[shard_name]
        if isinstance(shard, _SafetensorsShard) and name not in shard.names():
            raise _missing_from_shard(shard, name, index)
    return Checkpoint(path, {name: shards[shard_name] for name, shard_name in weight_map.items()}, index=index)
