"""The scan's options: validated once, before any file is read, and recorded in the report and the journal.

Every check here is torch-free, so the command line can run them before it imports torch. Each raises
:class:`~lorafft.errors.InputError` naming the option (or the file) and the problem in one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

from lorafft.errors import InputError

SIDES = ("left", "right")
SIDE_CHOICES = (*SIDES, "both")
DEFAULT_K = 10  # the paper's k: top singular vectors examined per matrix
DEFAULT_EPS = (0.5,)  # the paper's ε
DEFAULT_TOL = 1e-5  # the certified error bound of each max|cos|
DEFAULT_MAX_BATCH_BYTES = 4 << 30  # the memory one batch may hold at its peak on the CPU (lorafft.memory)
REPORT_SUFFIXES = (".json", ".csv")
CACHE_INDEX = "lorafft-base-cache.json"  # a base cache directory's index (lorafft.cache)
CACHE_FILE_SUFFIXES = (".safetensors",)  # and its entry files
LOCK_PREFIX = ".lorafft-lock-"  # lorafft.io.writer.FileLock's files
WHICH = ("top", "all")  # the intervention's choices: the highest-ranked intruder of each matrix, or every one
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a plausible repo id; huggingface_hub validates it further
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")  # a missing file of these names is not an id


def eps_key(eps: float) -> str:
    """The string form of a threshold used as a key in reports: 0.5 -> "0.5"."""
    return f"{float(eps):g}"


def positive_int(value, what: str = "k") -> int:
    """``value`` as an int >= 1 (bools and fractions refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(what, f"must be a positive integer, got {value!r}")
    return value


def seed(value, what: str = "seed") -> int:
    """An integer in [0, 2^62): the random start blocks' seed (each batch's stream adds its position to it, and torch
    seeds are 64-bit)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise InputError(what, f"must be an integer in [0, 2^62), got {value!r}")
    return value


def thresholds(eps) -> tuple[float, ...]:
    """ε as a sorted tuple of distinct floats, each finite in (0, 1]: a number or an iterable of numbers."""
    values = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    if not values:
        raise InputError("eps", "needs at least one threshold")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise InputError("eps", f"each threshold must be a number in (0, 1] (a max |cos|), got {value!r}")
    return tuple(sorted({float(value) for value in values}))


def side(value: str) -> tuple[str, ...]:
    """The sides a ``side`` option names: ``"left"``, ``"right"`` or ``"both"`` -> a tuple of ``SIDES``."""
    if value not in SIDE_CHOICES:
        raise InputError("side", f"must be 'left', 'right' or 'both', got {value!r}")
    return SIDES if value == "both" else (value,)


def patterns(values, what: str) -> tuple[str, ...]:
    """Regular expressions (``re.search`` in tensor names), each compiled now so a bad one fails before any work."""
    values = (values,) if isinstance(values, str) else tuple(values)
    for pattern in values:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise InputError(what, f"{pattern!r} is not a regular expression: {e}") from None
    return values


def positive_number(value, what: str) -> float:
    """A finite number > 0 (a tolerance, a byte budget)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(what, f"must be a finite number > 0, got {value!r}")
    return value


def gigabytes(value, what: str) -> int:
    """A finite number of GB (GiB) > 0, as bytes (at least one)."""
    positive_number(value, what)
    if value * 2**30 < 1:
        raise InputError(what, f"must be at least one byte (2^-30 GB), got {value!r} GB")
    return int(value * 2**30)


def scale_factor(value, what: str = "lambda") -> float:
    """A finite number >= 0 (the intervention's λ: the factor applied to each intruder's singular value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(what, f"must be a finite number >= 0 (the factor applied to each intruder's singular "
                               f"value), got {value!r}")
    return float(value)


def output_file(path, suffixes: tuple[str, ...] = REPORT_SUFFIXES) -> str:
    """A file lorafft may write: its directory exists and is writable, it is not a directory (nor a FIFO, device or
    socket), and its suffix is one the writer knows. Returns the path as a string."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(path, "is a directory; name a file to write")
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(path, "exists and is not a regular file (a FIFO, device or socket): name a file to write")
    if suffixes and not path.lower().endswith(suffixes):
        raise InputError(path, f"unknown output format: the name must end in {' or '.join(suffixes)}")
    _writable_parent(path)
    return path


def output_directory(path) -> str:
    """A directory lorafft may create or fill: not an existing file, its parent exists and is writable."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(path, "exists and is not a directory")
    if not os.path.isdir(path):
        _writable_parent(path)
    elif not os.access(path, os.W_OK):
        raise InputError(path, "directory is not writable")
    return path


def not_an_input(path, inputs, what: str) -> None:
    """InputError when writing ``path`` (``what``: "the report", ...) would overwrite an existing file of one of the
    ``inputs``: an input file itself, or a file inside an input directory (its ``config.json``, a shard)."""
    if path is None or not os.path.lexists(path):
        return
    target = os.path.realpath(path)
    for source in inputs:
        if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
            continue  # a state dict
        real = os.path.realpath(source)
        if target == real or (os.path.isdir(real) and target.startswith(real + os.sep)):
            raise InputError(path, f"is a file of the input {os.fspath(source)}: {what} would overwrite it")


def separate_outputs(outputs: dict[str, object], inputs, caches=()) -> None:
    """InputError when writing the ``outputs`` (``{what: path or None}``: "--out", "--journal", ...) could destroy
    something: two of them are one file, or one is an existing file of an input (:func:`not_an_input`), or one is a
    file a base cache directory among ``caches`` holds or will hold (its index, entries, lock)."""
    named = {what: os.path.realpath(os.fspath(path)) for what, path in outputs.items() if path is not None}
    seen = {}
    for what, real in named.items():
        if real in seen:
            raise InputError(outputs[what], f"is named by both {seen[real]} and {what}: one would overwrite or "
                                            f"remove the other")
        seen[real] = what
        not_an_input(outputs[what], inputs, f"the {what.lstrip('-')} file")
        for cache in caches:
            if cache is None or os.path.dirname(real) != os.path.realpath(os.fspath(cache)):
                continue
            name = os.path.basename(real)
            if name == CACHE_INDEX or name.endswith(CACHE_FILE_SUFFIXES) or name.startswith(LOCK_PREFIX):
                raise InputError(outputs[what], f"is a file of the base cache {os.fspath(cache)}: {what} would "
                                                f"overwrite it")


def looks_like_hub_id(name: str) -> bool:
    """True for a name that may be a Hub repo id: ``name`` or ``org/name``, not a path or a weights file name."""
    return HUB_ID.fullmatch(name) is not None and not name.endswith(WEIGHT_SUFFIXES)


def input_path(path) -> str:
    """A checkpoint or adapter input: an existing path, or a name shaped like a Hub id (resolved later, from the Hub
    cache or a download); InputError for a missing local path."""
    path = os.fspath(path)
    if not os.path.lexists(path) and not looks_like_hub_id(path):
        raise InputError(path, "no such file or directory")
    return path


def report_file(path) -> str:
    """A report to read: an existing file, not a directory, and not the CSV table a scan writes (only the JSON report
    holds everything a figure needs)."""
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
        raise InputError(path, "is a CSV table, not a report: figures and pages are drawn from the JSON report "
                               "('lorafft scan ... --out FILE.json')")
    if not os.path.exists(path):
        raise InputError(path, "no such file")
    if os.path.isdir(path):
        raise InputError(path, "is a directory, not a report file")
    return path


def _writable_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(path, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(path, f"directory {parent} is not writable")


@dataclass(frozen=True)
class ScanOptions:
    """What a scan computes (not how or where: device, backend, journal and output are arguments of the run).

    Constructing one validates and normalises every field (see the module's checkers); :meth:`record` is the dict
    a report and a journal store, so two scans with equal records compute equal rows.
    """

    k: int = DEFAULT_K
    eps: tuple[float, ...] = DEFAULT_EPS
    side: str = "left"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    strict: bool = False
    split_fused: bool = False
    delta_ranks: bool = False
    tol: float = DEFAULT_TOL
    seed: int = 0
    base_cache: str | None = None
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES

    def __post_init__(self):
        normalised = {
            "k": positive_int(self.k),
            "eps": thresholds(self.eps),
            "include": patterns(self.include, "include"),
            "exclude": patterns(self.exclude, "exclude"),
            "tol": positive_number(self.tol, "tol"),
            "max_batch_bytes": int(positive_number(self.max_batch_bytes, "max_batch_bytes")),
            "base_cache": None if self.base_cache is None else os.fspath(self.base_cache),
        }
        side(self.side)
        seed(self.seed)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def sides(self) -> tuple[str, ...]:
        """The analysed sides, ``("left",)``, ``("right",)`` or ``("left", "right")``."""
        return side(self.side)

    def replace(self, **changes) -> ScanOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """The options as the report's ``options`` and the journal's header store them (JSON types)."""
        record = dataclasses.asdict(self)
        for name in ("eps", "include", "exclude"):
            record[name] = list(record[name])
        return record
