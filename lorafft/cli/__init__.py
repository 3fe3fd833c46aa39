"""The ``lorafft`` command: the top parser, one module per command family, and how errors and warnings are printed.

Exit status: 0 on success, 2 on bad input (one line on stderr naming the argument or file and the problem; nothing
written). Parsing, ``--help``, ``--version`` and argument errors never import torch: each command imports the
library only in its ``run`` function.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from lorafft import __version__
from lorafft.cli import demo, intervene, plot, scan
from lorafft.cli.arguments import Parser
from lorafft.errors import InputError, InternalError, printable

DESCRIPTION = """\
Find intruder dimensions (Shuttleworth et al., arXiv 2410.21228): for every weight matrix W0 of a base model and
its fine-tuned Wt, the top-k singular vectors y_j of Wt, max_i |<y_j, x_i>| over ALL singular vectors x_i of W0,
and how many y_j stay below each threshold eps (intruders). LoRA tends to grow them; full fine-tuning does not.

commands:
  lorafft scan BASE TUNED --out report.json   compare a base with a fine-tune or a PEFT LoRA adapter
                                              (several TUNED: checkpoints along one training run)
  lorafft cache build BASE --out DIR          compute the base's bases once; then scan --base-cache DIR
  lorafft demo                                write a small synthetic base, full fine-tune and LoRA adapter,
                                              and scan both (nothing is downloaded)
  lorafft plot REPORT --out DIR               the paper's figures from a saved JSON report (PNG)
  lorafft report REPORT --html out.html       one self-contained HTML page: tables and every figure
  lorafft intervene [BASE] TUNED --lambda 0.5 --out DIR
                                              rescale the intruder dimensions (the paper's Sec. 6) and write
                                              a new PEFT adapter or checkpoint
Run 'lorafft scan --help' for the options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``lorafft`` parser with every command; the parsed args carry ``run(args) -> exit status``."""
    parser = Parser(prog="lorafft", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorafft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan.add_commands(commands)
    demo.add_command(commands)
    plot.add_commands(commands)
    intervene.add_command(commands)
    return parser


def main(argv=None) -> int:
    """Run the ``lorafft`` command line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Warnings print as ``lorafft: warning: ...``; an :class:`InputError` as ``lorafft: error: <path>: <problem>``
    with status 2, and so does an OSError of a file lorafft reads or writes (no space left on device, a directory
    removed mid-run, permission denied). Usage errors exit 2 from argparse (``SystemExit``), with one line. Ctrl-C
    (and SIGTERM under the console script) prints one line and exits 130 (a scan's journal keeps its finished rows for
    ``--resume``); a closed stdout (``| head``) ends quietly; an :class:`InternalError` (a result that cannot be
    right) is one line asking for a report, status 3. A name the output encoding cannot hold (a file or tensor name
    that is not UTF-8, decoded by Python to lone surrogates) is printed escaped, never as an encoding error.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; a stream put in its place without one is left as it is
            stream.reconfigure(errors="backslashreplace")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(printable(f"lorafft: warning: {message}"),
                                                                    file=sys.stderr)
        try:
            args = build_parser().parse_args(argv)
            return args.run(args)
        except InputError as error:
            print(printable(f"lorafft: error: {error}"), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lorafft: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader of stdout went away: nothing more to say, and say nothing at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except OSError as error:
            where = f"{os.fsdecode(error.filename)}: " if error.filename is not None else ""
            print(printable(f"lorafft: error: {where}{(error.strerror or str(error)).lower()}"), file=sys.stderr)
            return 2
        except InternalError as error:
            print(printable(f"lorafft: internal error: {error} (please report this)"), file=sys.stderr)
            return 3
