"""Safetensors files: every rule of the format checked on the header before any data is read, then a lazy shard.

Layout (the safetensors README): a u64 little-endian header length N, N bytes of UTF-8 JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``__metadata__`` of strings), then
the data bytes. :func:`read_header` enforces, each with its own message: the file is long enough for the length
field and for the header; the header is at most 100 MB, valid JSON (:mod:`lorafft.io.jsonfile`'s limits) and an
object; each entry has a known dtype, a shape of non-negative integers and ``0 <= begin <= end`` offsets whose span
is exactly dtype size × elements and lies inside the file; the spans tile the data bytes without gap or overlap.
Only then does the safetensors library (``safe_open``) see the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection

import torch
from safetensors import SafetensorError, safe_open

from lorafft.errors import InputError
from lorafft.io.jsonfile import HEADER_BYTES, is_int, parse_json

DTYPES = {
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

Meta = tuple[torch.dtype, tuple[int, ...]]  # (stored dtype, shape) of one tensor


def read_header(path: str) -> dict[str, Meta]:
    """Validate a safetensors file's header against the file (module docstring).

    Returns:
        ``{name: (dtype, shape)}`` for every tensor, ``__metadata__`` left out.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InputError(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > HEADER_BYTES:
                raise InputError(path, f"truncated or corrupt header: header length {n} exceeds the 100 MB limit")
            if 8 + n > size:
                raise InputError(path, f"truncated or corrupt header: header length {n} "
                                       f"but only {size - 8} bytes follow")
            raw = f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    header = parse_json(raw, path, max_bytes=HEADER_BYTES, what="header")
    if not isinstance(header, dict):
        raise InputError(path, f"header is not a JSON object (got {type(header).__name__})")
    metas: dict[str, Meta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise InputError(path, "__metadata__ must map strings to strings")
            continue
        metas[name], span = _entry(path, name, entry, data_size=size - 8 - n)
        spans.append((*span, name))
    _check_tiling(path, spans, data_size=size - 8 - n)
    return metas


def _entry(path: str, name: str, entry, data_size: int) -> tuple[Meta, tuple[int, int]]:
    """One header entry checked: ``((dtype, shape), (begin, end))``."""
    if not isinstance(entry, dict):
        raise InputError(path, f"tensor '{name}': header entry is not a JSON object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise InputError(path, f"tensor '{name}': header entry has no {', '.join(missing)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise InputError(path, f"tensor '{name}': unknown dtype {dtype_name!r}")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise InputError(path, f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise InputError(path, f"tensor '{name}': data_offsets must be [begin, end] integers with "
                               f"0 <= begin <= end, got {offsets!r}")
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise InputError(path, f"tensor '{name}': {end - begin} bytes for {dtype_name} {shape} (needs {needed})")
    if end > data_size:
        raise InputError(path, f"truncated: tensor '{name}' ends at byte {end} but the file has {data_size} data bytes")
    return (dtype, tuple(shape)), (begin, end)


def _check_tiling(path: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' ``(begin, end, name)`` byte spans cover the data bytes exactly once."""
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise InputError(path, f"tensors '{previous}' and '{name}' overlap (data bytes {begin}..{covered})")
        if begin > covered:
            raise InputError(path, f"data bytes {covered}..{begin} (before tensor '{name}') belong to no tensor")
        covered, previous = end, name
    if covered != data_size:
        raise InputError(path, f"the last {data_size - covered} data bytes belong to no tensor")


class SafetensorsShard:
    """A .safetensors file (a :class:`lorafft.io.shard.Shard`): header validated when constructed, data mapped by
    ``safe_open`` on the first read and unmapped by :meth:`release`."""

    def __init__(self, path: str):
        self.path = path
        self._metas = read_header(path)
        self._handle = None
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(path, "the safetensors library opens only paths that are valid UTF-8, and this one is "
                                   "not (a file or directory name in another encoding): rename it") from None

    def names(self) -> Collection[str]:
        return self._metas.keys()

    def meta(self, name: str) -> Meta:
        return self._metas[name]

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, CPU, stored dtype."""
        return self._read(lambda handle: handle.get_tensor(name))

    def part(self, name: str, index: int | slice) -> torch.Tensor:
        """``tensor(name)[index]`` (one expert, or a range of rows), reading only that part's bytes."""
        return self._read(lambda handle: handle.get_slice(name)[index])

    def release(self) -> None:
        self._handle = None  # safe_open unmaps when dropped

    def _read(self, read: Callable) -> torch.Tensor:
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return read(self._handle)
        except (OSError, SafetensorError) as e:
            raise InputError(self.path, f"cannot read safetensors data: {e}") from e
