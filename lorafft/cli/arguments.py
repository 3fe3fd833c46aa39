"""The argument definitions that several commands share, and the argparse side of their checks; torch-free.

The checks themselves are :mod:`lorafft.options`' (the library runs them again), raising
:class:`~lorafft.errors.InputError` (``<argument or path>: <problem>``, one line); :func:`checked` turns one into an
argparse ``type=``, so a bad value is refused while parsing, before any work.
"""

from __future__ import annotations

import argparse
import re

from lorafft import options
from lorafft.errors import InputError

HTML_SUFFIXES = (".html", ".htm")


def threshold(value: float, name: str = "--eps") -> float:
    """One intruder threshold ε, finite in (0, 1] (:func:`lorafft.options.thresholds`)."""
    return options.thresholds(value)[0]


def regex(pattern: str, name: str) -> str:
    """One tensor-name pattern, compiled now (:func:`lorafft.options.patterns`)."""
    return options.patterns(pattern, name)[0]


def device(value: str, name: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; for CUDA, that it is available (the only check here that imports torch)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise InputError(name, f"not a device: {value!r} (try cpu, cuda or cuda:0)")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(name, f"{value}: CUDA is not available on this machine")
    return value


def inputs_exist(paths) -> None:
    """Every checkpoint or adapter input is an existing path or shaped like a Hub id
    (:func:`lorafft.options.input_path`): a missing local file is refused here, before torch is imported."""
    for path in paths:
        if path is not None:
            options.input_path(path)


def checked(convert, check, name: str):
    """An argparse ``type=``: ``check(convert(text), name)``. A ValueError of ``convert`` (``int``, ``float``) and the
    InputError of ``check`` become argparse's one-line usage error (exit 2)."""
    def parse(text: str):
        value = convert(text)
        try:
            return check(value, name)
        except InputError as error:
            raise argparse.ArgumentTypeError(error.problem) from None
    parse.__name__ = convert.__name__  # argparse: "invalid int value: '2.5'"
    return parse


class Gathered(argparse.Action):
    """A ``nargs="+"`` option whose repeats add up (``--eps 0.5 --eps 0.7`` is ``--eps 0.5 0.7``, not the last one
    alone); its default stands only when the option is absent."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, ([] if current is self.default else list(current)) + list(values))


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
    group.add_argument("--include", nargs="+", default=[], metavar="REGEX", type=checked(str, regex, "--include"),
                       action=Gathered, help="only tensors whose name matches one (repeats add up)")
    group.add_argument("--exclude", nargs="+", default=[], metavar="REGEX", type=checked(str, regex, "--exclude"),
                       action=Gathered, help="skip tensors whose name matches one (repeats add up)")
    group.add_argument("--embeddings", action="store_true",
                       help="also analyse embeddings and lm_head (left out by default)")
    if split_fused:
        group.add_argument("--split-fused", action="store_true", help=SPLIT_FUSED_HELP)


def add_analysis(parser: argparse.ArgumentParser, *, several_eps: bool) -> None:
    """``--k`` and ``--eps`` (one threshold, or with ``several_eps`` a list of them): what counts as an intruder."""
    group = parser.add_argument_group("intruders")
    group.add_argument("--k", type=checked(int, options.positive_int, "--k"), default=10,
                       help="top singular vectors of the fine-tune examined per matrix (default: 10, as the paper)")
    if several_eps:
        group.add_argument("--eps", type=checked(float, threshold, "--eps"), nargs="+", default=[0.5],
                           metavar="EPS", action=Gathered,
                           help="thresholds in (0, 1]: a vector is an intruder when its max |cos| < EPS (default: "
                                "0.5; the paper's sweep: 0.5 0.6 0.7 0.8 0.9)")
    else:
        group.add_argument("--eps", type=checked(float, threshold, "--eps"), default=0.5, metavar="EPS",
                           help="intruder threshold in (0, 1]: max |cos| < EPS (default: 0.5, as the paper)")


def add_device(group, *, default: str = "the GPU when CUDA is available, else the CPU") -> None:
    """``--device``: where the linear algebra runs (checked before torch does any work)."""
    group.add_argument("--device", type=checked(str, device, "--device"), metavar="DEVICE",
                       help=f"cpu, cuda or cuda:N (default: {default})")


def add_compute(group) -> None:
    """``--base-cache``, ``--device`` and ``--backend``: where the bases come from, where and how products run."""
    group.add_argument("--base-cache", metavar="DIR", help="read base bases from this cache ('lorafft cache build')")
    add_device(group)
    group.add_argument("--backend", choices=["auto", "torch", "triton"],
                       help="Triton kernels or torch ops for the products (default: auto = Triton on a GPU; "
                            "$LORAFFT_BACKEND also sets it)")


def add_revision(parser: argparse.ArgumentParser) -> None:
    """``--revision``: the branch, tag or commit of the inputs given as Hub ids (:mod:`lorafft.io.hub`)."""
    parser.add_argument("--revision", metavar="REV",
                        help="branch, tag or commit of every input given as a Hub id (default: the repository's "
                             "default branch; for the base an adapter names, the revision its adapter_config.json "
                             "records)")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
