"""The ``lorafft demo`` command: a synthetic base, full fine-tune and LoRA adapter written and scanned (no download)."""

from __future__ import annotations

import argparse
import tempfile

from lorafft import options
from lorafft.cli import arguments

DEMO_EPILOG = """\
examples:
  lorafft demo                      scan in a temporary directory, then remove it
  lorafft demo --dir demo           keep demo/base, demo/full and demo/lora, then for instance:
  lorafft scan demo/lora --out r.json && lorafft plot r.json --out figures
"""


def add_command(subparsers) -> None:
    """Register ``demo`` on the ``lorafft`` command's subparsers; the parsed args carry ``run`` (:func:`run`)."""
    demo = subparsers.add_parser("demo", help="scan a synthetic base, full fine-tune and LoRA adapter (no download)",
                                 description="Write a small Llama-shaped base, a full fine-tune and a rank-1 LoRA "
                                             "adapter (PEFT layout) with lorafft.synthetic, then scan both against "
                                             "the base.",
                                 epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--dir", metavar="DIR",
                      help="write the checkpoints here and keep them (default: a temporary directory)")
    arguments.add_quiet(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    """``lorafft demo``: write the trio, print both scans' summaries."""
    if args.dir is not None:
        options.output_directory(args.dir)
    from lorafft.scan import scan
    from lorafft.synthetic import write_trio

    with tempfile.TemporaryDirectory(prefix="lorafft-demo-") as temporary:
        trio = write_trio(args.dir or temporary)
        print(f"synthetic checkpoints in {trio.base.parent}" + ("" if args.dir else " (temporary)"))
        for label, tuned in (("full fine-tune", trio.full), ("LoRA adapter (rank 1)", trio.lora)):
            print(f"\n== {label}: lorafft scan {trio.base} {tuned}")
            print(scan(trio.base, tuned, eps=(0.5, 0.6, 0.7, 0.8, 0.9), progress=not args.quiet).summary())
    print("\nLoRA grows intruder dimensions (max |cos| < eps against every base singular vector); "
          "the full fine-tune has few or none.")
    return 0
