"""The ``lorafft demo`` command: a synthetic base, full fine-tune and LoRA adapter written and scanned (no download)."""

from __future__ import annotations

import argparse
import os
import tempfile

from lorafft import options
from lorafft.cli import arguments
from lorafft.errors import InputError

DEMO_PARTS = ("base", "full", "lora", "run")
MARKER = ".lorafft-demo"  # left by the demo in --dir: only a directory holding it may have its parts replaced

DEMO_EPILOG = """\
With --dir, also run/step-0.25 .. run/step-1: the LoRA adapter's update grown as t*s*B*A, a mock training run
(the README's Figure 5 example scans them).

examples:
  lorafft demo                      scan in a temporary directory, then remove it
  lorafft demo --dir demo           keep demo/base, demo/full, demo/lora and demo/run, then for instance:
  lorafft scan demo/lora --out r.json && lorafft plot r.json --out figures
  lorafft scan demo/base demo/run/step-0.25 demo/run/step-0.5 demo/run/step-0.75 demo/run/step-1 --out run.json
"""


def add_command(subparsers) -> None:
    """Register ``demo`` on the ``lorafft`` command's subparsers; the parsed args carry ``run`` (:func:`run`)."""
    demo = subparsers.add_parser("demo", help="scan a synthetic base, full fine-tune and LoRA adapter (no download)",
                                 description="Write a small Llama-shaped base, a full fine-tune and a rank-1 LoRA "
                                             "adapter (PEFT layout) with lorafft.synthetic, then scan both against "
                                             "the base.",
                                 epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--dir", metavar="DIR",
                      help="write the checkpoints (and a mock training run of the adapter) here and keep them: a new "
                           "or empty directory, or an earlier demo's (default: a temporary directory)")
    arguments.add_quiet(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    """``lorafft demo``: write the trio (and with ``--dir`` the mock run), print both scans' summaries."""
    if args.dir is not None:
        _demo_directory(args.dir)
    from lorafft.scan import scan
    from lorafft.synthetic import write_run, write_trio

    with tempfile.TemporaryDirectory(prefix="lorafft-demo-") as temporary:
        directory = args.dir or temporary
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as marker:
            marker.write("written by lorafft demo: its base/, full/ and lora/ may be replaced by the next demo\n")
        trio = write_trio(directory)
        print(f"synthetic checkpoints in {trio.base.parent}" + ("" if args.dir else " (temporary)"))
        if args.dir is not None:
            steps = write_run(trio.lora, trio.base.parent / "run")
            print(f"a mock training run of the LoRA adapter: {', '.join(str(step) for step in steps)}")
        for label, tuned in (("full fine-tune", trio.full), ("LoRA adapter (rank 1)", trio.lora)):
            print(f"\n== {label}: lorafft scan {trio.base} {tuned}")
            print(scan(trio.base, tuned, eps=(0.5, 0.6, 0.7, 0.8, 0.9), progress=False if args.quiet else None)
                  .summary())
    print("\nLoRA grows intruder dimensions (max |cos| < eps against every base singular vector); "
          "the full fine-tune has few or none.")
    return 0


def _demo_directory(path) -> None:
    """InputError unless ``path`` may take the demo's checkpoints: new, empty, or an earlier demo's (it holds the
    demo's marker file and nothing but ``base/``, ``full/``, ``lora/`` and ``run/``), so that a user's own checkpoints
    are never written into or replaced, whatever their folders are called."""
    options.output_directory(path)
    present = set(os.listdir(path)) if os.path.isdir(path) else set()
    others = sorted(present - {*DEMO_PARTS, MARKER})
    if others:
        raise InputError(path, f"holds {others[0]!r}" + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                         + ": the demo writes base/, full/, lora/ and run/ only into a new or empty directory (or "
                           "an earlier demo's)")
    if present and MARKER not in present:
        raise InputError(path, f"holds {', '.join(sorted(present))} that an earlier demo did not write (no {MARKER} "
                               f"marker): the demo replaces only its own checkpoints; name a new or empty directory")
