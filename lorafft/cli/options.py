"""Argument checks and the option definitions that several commands share; torch-free, run before any work.

The checks are plain functions raising :class:`~lorafft.errors.InputError` (``<argument or path>: <problem>``, one
line), so the library can call them too; :func:`argument` turns one into an argparse ``type=``.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import re

from lorafft.errors import InputError

REPORT_SUFFIXES = (".json", ".csv")  # the formats Report.save writes
HTML_SUFFIXES = (".html", ".htm")


def integer(value, name: str, minimum: int = 1) -> int:
    """``value`` (an int or its decimal text) as an int ``>= minimum``; InputError(name, ...) otherwise."""
    try:
        if isinstance(value, str):
            number = int(value)
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            number = int(value)
        else:
            raise ValueError
    except ValueError:
        raise InputError(name, f"must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise InputError(name, f"must be an integer >= {minimum}, got {number}")
    return number


def real(value, name: str, *, minimum: float, maximum: float = math.inf, open_minimum: bool = False) -> float:
    """``value`` (a real number or its text) as a finite float in ``[minimum, maximum]`` (``(minimum, maximum]`` with
    ``open_minimum``); InputError(name, ...) otherwise (NaN and ±inf included)."""
    interval = f"{'(' if open_minimum else '['}{minimum:g}, {maximum:g}{']' if math.isfinite(maximum) else ')'}"
    try:
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise InputError(name, f"must be a number in {interval}, got {value!r}") from None
    low_ok = number > minimum if open_minimum else number >= minimum
    if not (math.isfinite(number) and low_ok and number <= maximum):
        raise InputError(name, f"must be a finite number in {interval}, got {value!r}")
    return number


def threshold(value, name: str = "--eps") -> float:
    """An intruder threshold ε: finite, in (0, 1] (max |cos| lies in [0, 1])."""
    return real(value, name, minimum=0.0, maximum=1.0, open_minimum=True)


def regex(pattern: str, name: str = "--include") -> str:
    """``pattern`` after checking that it compiles (returned as text: reports and journals record it)."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise InputError(name, f"not a regular expression: {pattern!r} ({error})") from None
    return pattern


def _writable_directory(directory: str, path: str) -> None:
    if not os.path.isdir(directory):
        raise InputError(path, f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(path, f"directory {directory} is not writable")


def output_file(path: str, suffixes: tuple[str, ...] | None = REPORT_SUFFIXES) -> str:
    """A file to be written: not a directory, in an existing writable directory, and (unless ``suffixes`` is None)
    ending in one of ``suffixes`` (case-insensitive)."""
    path = str(path)
    if os.path.isdir(path):
        raise InputError(path, "is a directory; name a file")
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise InputError(path, f"unknown output format; the file name must end in {' or '.join(suffixes)}")
    _writable_directory(os.path.dirname(os.path.abspath(path)), path)
    return path


def output_directory(path: str) -> str:
    """A directory to be written into: an existing writable one, or a new one whose parent exists and is writable."""
    path = str(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(path, "exists and is not a directory")
    _writable_directory(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), path)
    return path


def device(value: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; for CUDA, that it is available (the only check here that imports torch)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise InputError("--device", f"not a device: {value!r} (try cpu, cuda or cuda:0)")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device", f"{value}: CUDA is not available on this machine")
    return value


def argument(check, *args, **kwargs):
    """An argparse ``type=`` calling ``check(text, *args, **kwargs)``: its InputError becomes argparse's one-line
    usage error (exit 2)."""
    def parse(text: str):
        try:
            return check(text, *args, **kwargs)
        except InputError as error:
            raise argparse.ArgumentTypeError(error.problem) from None
    parse.__name__ = check.__name__
    return parse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``lorafft: error: ... (see 'lorafft CMD --help')``, as
    the CLI prints an InputError; exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see '{self.prog} --help')\n")


# --- option definitions shared by several commands ---------------------------------------------------------------

SPLIT_FUSED_HELP = (
    "analyse fused projections as their parts: qkv_proj and query_key_value as .q, .k, .v, gate_up_proj as .gate, "
    ".up (Phi-3, GPT-NeoX, BLOOM, Falcon; the layout is read from each checkpoint directory's config.json, so BASE "
    "and TUNED must be directories). Default: analysed whole. PEFT adapters are always merged onto the whole fused "
    "weight")


def add_scope(parser: argparse.ArgumentParser, *, split_fused: bool = True) -> None:
    """``--include``, ``--exclude``, ``--embeddings`` (and ``--split-fused``): which matrices are analysed."""
    group = parser.add_argument_group("which matrices")
    group.add_argument("--include", nargs="+", default=[], metavar="REGEX", type=argument(regex, "--include"),
                       help="only tensors whose name matches one")
    group.add_argument("--exclude", nargs="+", default=[], metavar="REGEX", type=argument(regex, "--exclude"),
                       help="skip tensors whose name matches one")
    group.add_argument("--embeddings", action="store_true",
                       help="also analyse embeddings and lm_head (left out by default)")
    if split_fused:
        group.add_argument("--split-fused", action="store_true", help=SPLIT_FUSED_HELP)


def add_analysis(parser: argparse.ArgumentParser, *, several_eps: bool) -> None:
    """``--k`` and ``--eps`` (one threshold, or with ``several_eps`` a list of them): what counts as an intruder."""
    group = parser.add_argument_group("intruders")
    group.add_argument("--k", type=argument(integer, "--k"), default=10,
                       help="top singular vectors of the fine-tune examined per matrix (default: 10, as the paper)")
    if several_eps:
        group.add_argument("--eps", type=argument(threshold), nargs="+", default=[0.5], metavar="EPS",
                           help="thresholds in (0, 1]: a vector is an intruder when its max |cos| < EPS (default: "
                                "0.5; the paper's sweep: 0.5 0.6 0.7 0.8 0.9)")
    else:
        group.add_argument("--eps", type=argument(threshold), default=0.5, metavar="EPS",
                           help="intruder threshold in (0, 1]: max |cos| < EPS (default: 0.5, as the paper)")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
