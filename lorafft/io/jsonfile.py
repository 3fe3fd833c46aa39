"""Untrusted JSON: the one parser of every JSON document lorafft is given, with size and nesting limits.

Python's :mod:`json` has neither limit: an array nested 100000 deep exhausts the interpreter's recursion limit
(``RecursionError``) and a "config" of many gigabytes is read whole. Here a document is at most ``max_bytes`` long
(one limit per kind below), nested at most :data:`MAX_DEPTH` levels, with no key twice in one object (a
safetensors header naming a tensor twice is refused, not read as its last entry), and each problem is one
:class:`~lorafft.errors.InputError` naming the file. Values are the callers' to check (Python's ``NaN`` and
``Infinity`` literals parse, as :mod:`json` parses them, and are refused where a finite number is needed).
"""

from __future__ import annotations

import json
import os
import stat

from lorafft.errors import InputError

MAX_DEPTH = 64  # a safetensors header is 3 deep, a config or index 2-4, a report row 4
HEADER_BYTES = 100_000_000  # a safetensors header: the safetensors library's own limit
INDEX_BYTES = 100_000_000  # a shard index: a weight_map of a million tensors is about 100 MB
CONFIG_BYTES = 10_000_000  # config.json, adapter_config.json: kilobytes in practice
JOURNAL_LINE_BYTES = 10_000_000  # one journal record: a header or one report row
DOCUMENT_BYTES = 1_000_000_000  # anything else (a report, a base-cache index)


def is_int(value) -> bool:
    """True for a JSON integer (a Python ``int`` that is not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json(raw: bytes | str, source, *, max_bytes: int, what: str = ""):
    """Parse one JSON document from ``source`` (a path, named in messages).

    Args:
        raw: the document, as bytes (decoded as UTF-8) or text.
        source: the file it came from.
        max_bytes: the largest document accepted (in UTF-8 bytes, or characters for text).
        what: what the document is, to start messages (``"header"`` -> "header is not valid JSON: ...").

    Returns:
        The parsed value (any JSON type: callers check the type they need).
    """
    said = f"{what} is " if what else ""
    if len(raw) > max_bytes:
        raise InputError(source, f"{said}too large: {len(raw)} bytes, more than the {max_bytes} lorafft reads")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise InputError(source, f"{said}not valid JSON: {_one_line(e)}") from None
    except RecursionError:
        raise InputError(source, f"{said}nested more than {MAX_DEPTH} levels deep") from None
    if _deeper_than(value, MAX_DEPTH):
        raise InputError(source, f"{said}nested more than {MAX_DEPTH} levels deep")
    return value


def read_json_object(path, *, max_bytes: int = DOCUMENT_BYTES, what: str = "") -> dict:
    """Read and parse a JSON file that must hold an object (:func:`parse_json`'s limits); its size is checked
    before it is read."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(path, "is not a regular file (a directory, FIFO, device or socket)")
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise InputError(path, f"too large for a JSON file lorafft reads: {size} bytes, more than "
                                       f"{max_bytes}")
            raw = handle.read()
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    value = parse_json(raw, path, max_bytes=max_bytes, what=what)
    if not isinstance(value, dict):
        raise InputError(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (Python's json keeps the last of repeated keys, silently: a safetensors
    header naming one tensor twice would then describe a tensor that is not where the reader looks)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {repeated!r} appears twice in one object (which one is meant is ambiguous)")
    return value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def _deeper_than(value, limit: int) -> bool:
    """True if ``value`` nests lists and objects more than ``limit`` levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
