"""The ``lorafft`` command: a thin layer over :func:`lorafft.scan`.

Exit status: 0 on success, 2 on bad input (one line on stderr naming the file and the problem; no report file).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

from lorafft.errors import InputError
from lorafft.intervene import add_command as add_intervene_command
from lorafft.plots.commands import add_commands as add_plot_commands

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
  lorafft intervene BASE TUNED --lambda 0.5 --out DIR
                                              rescale the intruder dimensions (the paper's Sec. 6) and write
                                              a new PEFT adapter or checkpoint
Run 'lorafft scan --help' for the options.
"""

SCAN_EPILOG = """\
BASE and TUNED: a Hugging Face checkpoint directory (model.safetensors, sharded with
model.safetensors.index.json, pytorch_model.bin or its sharded index), a single .safetensors/.bin file;
TUNED may also be a PEFT adapter directory (adapter_config.json + adapter_model.safetensors/.bin).

examples:
  lorafft scan ./llama-base ./my-finetune --out report.json
  lorafft scan ./base ./lora-adapter --eps 0.5 0.6 0.7 0.8 0.9 --side both --out report.csv
  lorafft scan ./base ./tuned --include 'layers\\.(0|1)\\.' --exclude 'mlp' --k 20
  lorafft scan ./base ./run/checkpoint-100 ./run/checkpoint-200 ./run/checkpoint-300 --out trajectory.json
  lorafft scan ./phi-3-base ./phi-3-finetune --split-fused --out report.json   # q, k, v, gate, up apart
"""


SPLIT_FUSED_HELP = (
    "analyse fused projections as their parts: qkv_proj and query_key_value as .q, .k, .v, gate_up_proj as .gate, "
    ".up (Phi-3, GPT-NeoX, BLOOM, Falcon; the layout is read from each checkpoint directory's config.json, so BASE "
    "and TUNED must be directories). Default: analysed whole. PEFT adapters are always merged onto the whole fused "
    "weight")


def _scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=10, help="tuned singular vectors per matrix (default: 10, as the paper)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.5], metavar="EPS",
                        help="thresholds: a vector is an intruder when its max |cos| < EPS (default: 0.5; "
                             "the paper's sweep: 0.5 0.6 0.7 0.8 0.9)")
    parser.add_argument("--side", choices=["left", "right", "both"], default="left",
                        help="singular vectors to compare: left = output space of a [out, in] weight (default, "
                             "the paper's choice), right = input space, or both")
    parser.add_argument("--include", nargs="+", default=[], metavar="REGEX", help="only tensors whose name matches one")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="REGEX", help="skip tensors whose name matches one")
    parser.add_argument("--embeddings", action="store_true", help="also analyse embeddings and lm_head (left out by default)")
    parser.add_argument("--strict", action="store_true", help="a paired name with another shape is an error, not a warning")
    parser.add_argument("--split-fused", action="store_true", help=SPLIT_FUSED_HELP)
    parser.add_argument("--delta-ranks", action="store_true",
                        help="also report the effective and stable rank of the update dW = TUNED - BASE per matrix")
    parser.add_argument("--base-cache", metavar="DIR", help="read base bases from this cache ('lorafft cache build')")
    parser.add_argument("--write-base-cache", metavar="DIR", help="store every base basis this scan computes here")
    parser.add_argument("--journal", metavar="FILE",
                        help="append every finished matrix here, fsync'd (default with --out: OUT.journal)")
    parser.add_argument("--resume", action="store_true",
                        help="finish the scan recorded in the journal after a crash or kill (same arguments)")
    parser.add_argument("--max-batch-bytes", type=float, default=1.0, metavar="GB",
                        help="cap on the fp32 base + tuned weights analysed at once, in GB (default: 1)")
    parser.add_argument("--tol", type=float, default=1e-5, help="error bound to certify per max |cos| (default: 1e-5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random start blocks (default: 0)")
    parser.add_argument("--device", type=_device, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: the GPU when CUDA is available, else the CPU)")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"],
                        help="Triton kernels or torch ops for the products (default: auto = Triton on a GPU; "
                             "$LORAFFT_BACKEND also sets it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _device(value: str):
    """``--device``: a torch device that exists on this machine."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} (try cpu, cuda or cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value}: only cpu and cuda devices are supported")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafft", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = commands.add_parser("scan", help="compare a base checkpoint with a fine-tune or a LoRA adapter",
                               description="Intruder-dimension scan of every weight matrix BASE and TUNED share.",
                               epilog=SCAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    scan.add_argument("base", metavar="BASE", help="base checkpoint (directory or file)")
    scan.add_argument("tuned", metavar="TUNED", nargs="+",
                      help="fine-tuned checkpoint or PEFT adapter directory; several (checkpoints along one run) give "
                           "one report with a checkpoint column, the base paid for once")
    scan.add_argument("--out", metavar="FILE", help="write the full report here: .json (schema in the README) or .csv")
    _scan_arguments(scan)
    scan.set_defaults(run=_run_scan)

    cache = commands.add_parser("cache", help="build a base-spectrum cache reused by later scans",
                                description="Compute every base singular basis once and store it (safetensors, fp32, "
                                            "fingerprinted); then 'lorafft scan --base-cache DIR' skips that work.")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    build = cache_commands.add_parser("build", help="compute and store the bases of BASE",
                                      description="Compute and store the singular basis of every 2-D weight of BASE.")
    build.add_argument("base", metavar="BASE", help="base checkpoint (directory or file)")
    build.add_argument("--out", metavar="DIR", required=True, help="cache directory (created if needed)")
    build.add_argument("--include", nargs="+", default=[], metavar="REGEX", help="only tensors whose name matches one")
    build.add_argument("--exclude", nargs="+", default=[], metavar="REGEX", help="skip tensors whose name matches one")
    build.add_argument("--embeddings", action="store_true", help="also embeddings and lm_head")
    build.add_argument("--split-fused", action="store_true", help=SPLIT_FUSED_HELP)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=_run_cache)

    demo = commands.add_parser("demo", help="scan a synthetic base, full fine-tune and LoRA adapter (no download)",
                               description="Write a small Llama-shaped base, a full fine-tune and a rank-1 LoRA adapter "
                                           "(PEFT layout) with lorafft.synthetic, then scan both against the base.")
    demo.add_argument("--dir", metavar="DIR", help="write the checkpoints here and keep them (default: a temporary directory)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_run_demo)

    add_plot_commands(commands)
    add_intervene_command(commands)
    return parser


def _run_scan(args) -> int:
    from lorafft.scan import scan

    journal = args.journal or (args.out + ".journal" if args.out else None)
    report = scan(args.base, args.tuned if len(args.tuned) > 1 else args.tuned[0], k=args.k, eps=args.eps, side=args.side, include=args.include,
                  exclude=args.exclude, embeddings=args.embeddings, strict=args.strict, split_fused=args.split_fused,
                  delta_ranks=args.delta_ranks,
                  base_cache=args.base_cache, write_base_cache=args.write_base_cache, journal=journal,
                  resume=args.resume, out=args.out, max_batch_bytes=int(args.max_batch_bytes * 2**30), tol=args.tol,
                  seed=args.seed, device=args.device, backend=args.backend, progress=not args.quiet)
    if report is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(report.summary())
    if args.out:
        print(f"full report: {args.out}")
    return 0


def _run_cache(args) -> int:
    from lorafft.cache import build_base_cache

    cache = build_base_cache(args.base, args.out, include=args.include, exclude=args.exclude,
                             embeddings=args.embeddings, split_fused=args.split_fused, progress=not args.quiet)
    print(f"{len(cache.entries)} base bases in {cache.directory}")
    return 0


def _run_demo(args) -> int:
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(f"lorafft: warning: {message}", file=sys.stderr)
        try:
            return args.run(args)
        except InputError as error:
            print(f"lorafft: error: {error}", file=sys.stderr)
            return 2
