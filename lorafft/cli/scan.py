"""The ``lorafft scan`` and ``lorafft cache build`` commands: arguments checked here, the work done by
:func:`lorafft.scan` and :func:`lorafft.cache.build_base_cache` (imported only when a command runs)."""

from __future__ import annotations

import argparse
import os
import sys

from lorafft import options
from lorafft.cli import arguments
from lorafft.errors import InputError, printable

CACHE_EPILOG = """\
examples:
  lorafft cache build ./base --out ./base-cache
  lorafft scan ./base ./lora-adapter --base-cache ./base-cache --out report.json
  lorafft cache build meta-llama/Llama-3.1-8B --revision main --out ./llama-cache --device cuda
"""

SCAN_EPILOG = """\
BASE and TUNED: a Hugging Face checkpoint directory (model.safetensors, sharded with
model.safetensors.index.json, pytorch_model.bin or its sharded index), a single .safetensors/.bin file,
or a Hugging Face Hub id (org/name; a local path of that name always wins), read from the Hub cache
(HF_HOME, HF_HUB_CACHE) or downloaded (weights, configs, adapter files only) unless HF_HUB_OFFLINE=1;
TUNED may also be a PEFT adapter directory (adapter_config.json + adapter_model.safetensors/.bin).
Positionals: BASE TUNED [TUNED ...]; when the first one is a PEFT adapter (or is the only one), every
positional is a TUNED adapter and BASE is the base_model_name_or_path of their adapter_config.json.

examples:
  lorafft scan ./llama-base ./my-finetune --out report.json
  lorafft scan ./base ./lora-adapter --eps 0.5 0.6 0.7 0.8 0.9 --side both --out report.csv
  lorafft scan ./my-lora-adapter --out report.json       # the base its adapter_config.json names
  lorafft scan meta-llama/Llama-3.2-1B ./my-lora-adapter --revision main
  lorafft scan ./base ./tuned --include 'layers\\.(0|1)\\.' --exclude 'mlp' --k 20
  lorafft scan ./base ./run/checkpoint-100 ./run/checkpoint-200 ./run/checkpoint-300 --out trajectory.json
  lorafft scan ./phi-3-base ./phi-3-finetune --split-fused --out report.json   # q, k, v, gate, up apart
"""


def add_commands(subparsers) -> None:
    """Register ``scan`` and ``cache build`` on the ``lorafft`` command's subparsers; the parsed args carry ``run``."""
    scan = subparsers.add_parser("scan", help="compare a base checkpoint with a fine-tune or a LoRA adapter",
                                 description="Intruder-dimension scan of every weight matrix BASE and TUNED share.",
                                 epilog=SCAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [BASE] TUNED [TUNED ...] [options]")
    scan.add_argument("inputs", metavar="[BASE] TUNED", nargs="+",
                      help="base checkpoint, then fine-tuned checkpoints or PEFT adapter directories (paths or Hub "
                           "ids); several TUNED give one report with a checkpoint column, the base paid for once. "
                           "Adapters alone (the first positional an adapter): their base is the one they name")
    arguments.add_revision(scan)
    scan.add_argument("--out", metavar="FILE",
                      help="write the full report here: .json (the report: schema in the README, what plot and "
                           "report read) or .csv (the per-matrix table: one line per matrix, side and checkpoint, "
                           "per-vector lists space-separated; one line per vector: Report.vectors())")
    arguments.add_analysis(scan, several_eps=True)
    scan.add_argument("--side", choices=["left", "right", "both"], default="left",
                      help="singular vectors to compare: left = output space of a [out, in] weight (default, "
                           "the paper's choice), right = input space, or both")
    scan.add_argument("--tol", type=arguments.checked(float, options.positive_number, "--tol"),
                      default=1e-5, help="error bound to certify per max |cos| (default: 1e-5)")
    scan.add_argument("--delta-ranks", action="store_true",
                      help="also report the effective and stable rank of the update dW = TUNED - BASE per matrix")
    arguments.add_scope(scan)
    scan.add_argument("--strict", action="store_true",
                      help="a paired name with another shape is an error, not a warning")
    _add_resources(scan)
    arguments.add_quiet(scan)
    scan.set_defaults(run=run_scan)

    cache = subparsers.add_parser("cache", help="build a base-spectrum cache reused by later scans",
                                  description="Compute every base singular basis once and store it (safetensors, "
                                              "fp32, fingerprinted); then 'lorafft scan --base-cache DIR' skips that "
                                              "work.", epilog=CACHE_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="compute and store the bases of BASE",
                               description="Compute and store the singular basis of every 2-D weight of BASE.",
                               epilog=CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("base", metavar="BASE", help="base checkpoint (directory, file or Hub id)")
    build.add_argument("--out", metavar="DIR", required=True, help="cache directory (created if needed)")
    arguments.add_revision(build)
    arguments.add_device(build, default="cpu; on a GPU the fp64 Gram and its eigh run there, the bases are stored "
                                        "on the host as from the CPU")
    arguments.add_scope(build)
    arguments.add_quiet(build)
    build.set_defaults(run=run_cache)


def _add_resources(parser: argparse.ArgumentParser) -> None:
    """Where and how ``scan`` computes: caches, journal, memory, seed, device, backend."""
    group = parser.add_argument_group("computation")
    arguments.add_compute(group)
    group.add_argument("--write-base-cache", metavar="DIR", help="store every base basis this scan computes here")
    group.add_argument("--journal", metavar="FILE",
                       help="append every finished matrix here, fsync'd (default with --out: OUT.journal)")
    group.add_argument("--resume", action="store_true",
                       help="finish the scan recorded in the journal after a crash or kill (same arguments; needs "
                            "--out or --journal)")
    group.add_argument("--max-batch-bytes", metavar="GB",
                       type=arguments.checked(float, options.gigabytes, "--max-batch-bytes"),
                       help="cap on the memory one batch of same-shape matrices holds at its peak (both batches in "
                            "flight, the base basis, the Krylov blocks), in GB (default: 4 on the CPU; on a GPU, 0.8 "
                            "of its free memory)")
    group.add_argument("--profile", action="store_true",
                       help="time each stage (read, to_device, base_basis, tuned_topk, match, magnitude_direction, "
                            "write), print the table on stderr and keep it in the report's profile (on a GPU each "
                            "stage synchronises the device)")
    group.add_argument("--seed", type=arguments.checked(int, options.seed, "--seed"), default=0,
                       help="seed of the random start blocks, in [0, 2^62) (default: 0)")


def _journal(args) -> str | None:
    """The journal path ``scan`` writes (``--journal``, else ``OUT.journal`` with ``--out``), checked as an output
    file; InputError when ``--resume`` has none to resume from."""
    journal = args.journal or (args.out + ".journal" if args.out else None)
    if args.resume and journal is None:
        raise InputError("--resume", "needs the journal of the interrupted scan: give the same --out "
                                     "(journal OUT.journal) or --journal FILE")
    return None if journal is None else options.output_file(journal, suffixes=None)


def _base_and_tuned(inputs: list[str], revision: str | None) -> tuple[str | None, list[str]]:
    """``(BASE or None, [TUNED, ...])`` from the positionals: adapters alone (one positional, or a first one that is
    a PEFT adapter, which cannot be a base) have no BASE; otherwise the first is BASE."""
    from lorafft.io import hub, is_adapter

    if len(inputs) == 1 or is_adapter(hub.locate(inputs[0], revision=revision)[0]):
        return None, inputs
    return inputs[0], inputs[1:]


def run_scan(args) -> int:
    """``lorafft scan``: check the input and output paths, scan, print the summary (and where the report went)."""
    arguments.inputs_exist(args.inputs)
    if args.out is not None:
        options.output_file(args.out)
    journal = _journal(args)
    if args.write_base_cache is not None:
        options.output_directory(args.write_base_cache)
    from lorafft.scan import scan

    base, tuned = _base_and_tuned(args.inputs, args.revision)
    try:
        report = scan(base, tuned if len(tuned) > 1 else tuned[0], revision=args.revision, k=args.k, eps=args.eps,
                      side=args.side, include=args.include, exclude=args.exclude, embeddings=args.embeddings,
                      strict=args.strict, split_fused=args.split_fused, delta_ranks=args.delta_ranks,
                      base_cache=args.base_cache, write_base_cache=args.write_base_cache, journal=journal,
                      resume=args.resume, out=args.out, max_batch_bytes=args.max_batch_bytes, tol=args.tol,
                      seed=args.seed, device=args.device, backend=args.backend, progress=not args.quiet,
                      profile=args.profile)
    except KeyboardInterrupt:
        if journal is not None and os.path.isfile(journal):
            print(printable(f"lorafft: the finished matrices are in {journal}: the same command with --resume "
                            f"continues"),
                  file=sys.stderr)
        raise
    if report is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(printable(report.summary()))
    if args.out:
        print(printable(f"full report: {args.out}"))
    if report.profile is not None:
        print(profile_table(report.profile), file=sys.stderr)
    return 0


def profile_table(profile: dict) -> str:
    """The stages' seconds of a profiled scan (``Report.profile``), a line each with its share of the wall time."""
    wall = profile["wall_seconds"]
    lines = [f"profile: {wall:.2f} s wall (stages overlap: the reader thread works beside the analysis)"]
    lines += [f"  {name:<20} {seconds:9.3f} s  {100 * seconds / max(wall, 1e-9):5.1f} %"
              for name, seconds in profile["stages"].items()]
    memory = profile.get("memory")
    if memory is not None:
        peak = memory.get("peak_allocated_bytes")
        lines.append(f"  memory on {memory['device']}: {memory['batches']} batches, largest predicted to peak at "
                     f"{memory['predicted_peak_bytes'] / 2**30:.2f} GiB"
                     + ("" if peak is None else f", allocator's peak {peak / 2**30:.2f} GiB"))
    return "\n".join(lines)


def run_cache(args) -> int:
    """``lorafft cache build``: compute and store the base bases; print how many."""
    options.output_directory(args.out)
    from lorafft.cache import build_base_cache

    cache = build_base_cache(args.base, args.out, revision=args.revision, include=args.include,
                             exclude=args.exclude, embeddings=args.embeddings, split_fused=args.split_fused,
                             device=args.device or "cpu", progress=not args.quiet)
    print(printable(f"{len(cache.entries)} base bases in {cache.directory}"))
    return 0
