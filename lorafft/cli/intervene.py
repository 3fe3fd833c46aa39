"""The ``lorafft intervene`` command: arguments checked here, the work done by :func:`lorafft.intervene.intervene`
(imported only when the command runs)."""

from __future__ import annotations

import argparse

from lorafft import options
from lorafft.cli import arguments

DESCRIPTION = """\
Rescale the intruder dimensions of a fine-tune (Shuttleworth et al., arXiv 2410.21228, Sec. 6).

For every weight matrix, the top-k singular triplets (u_j, sigma_j, v_j) of the tuned Wt = W0 + dW whose u_j
has max |cos| < EPS against every singular vector of the base W0 (the intruders `lorafft scan` counts) get
sigma_j -> LAMBDA * sigma_j:

    W' = W0 + dW + (LAMBDA - 1) * u_j sigma_j v_j^T

Every other singular value and vector of Wt stays as it is. LAMBDA < 1 shrinks the intruders (the paper:
less forgetting of the pre-training data), 0 removes them, 1 changes nothing.

What is written to --out DIR (a new or empty directory; written atomically, or not at all):
  TUNED a PEFT LoRA adapter  -> a PEFT adapter; each changed module gets rank r + (intruders rescaled) and
                                keeps its scaling (rank_pattern / alpha_pattern). Nothing of the original
                                update is lost. Load it with PeftModel.from_pretrained(model, DIR).
  TUNED a full fine-tune     -> the same safetensors shards, index, dtypes and other files (config.json, ...);
                                only the changed matrices differ. (.bin checkpoints: convert to safetensors.)
DIR/lorafft_intervention.json lists every rescaled intruder (rank, max |cos|, sigma before and after).

BASE and TUNED may be Hugging Face Hub ids (org/name; a local path of that name always wins), read as
'lorafft scan' reads them (see 'lorafft scan --help'). Without BASE, TUNED must be a PEFT adapter: the base
is the one its adapter_config.json names.
"""

EPILOG = """\
examples:
  lorafft intervene ./base ./lora-adapter --lambda 0.5 --out ./lora-lambda0.5
  lorafft intervene ./base ./finetune --lambda 0 --which all --eps 0.6 --out ./finetune-no-intruders
  lorafft intervene ./base ./lora-adapter --lambda 0.25 --include 'layers\\.(0|1)\\.' --out ./early-layers
  lorafft intervene org/lora-adapter --lambda 0.5 --revision main --out ./lora-lambda0.5
"""


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``lorafft intervene`` on the CLI's subparsers; the parsed args carry ``run`` (:func:`run`)."""
    parser = subparsers.add_parser(
        "intervene", help="rescale intruder dimensions by lambda and write a new adapter or checkpoint",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", metavar="BASE", nargs="?",
                        help="base checkpoint (directory, file or Hub id); omitted: the base TUNED's "
                             "adapter_config.json names")
    parser.add_argument("tuned", metavar="TUNED",
                        help="PEFT LoRA adapter directory, or a safetensors fine-tune (path or Hub id)")
    arguments.add_revision(parser)
    parser.add_argument("--lambda", dest="lam", type=arguments.checked(float, options.scale_factor, "--lambda"),
                        required=True, metavar="LAMBDA",
                        help="factor for each rescaled singular value, >= 0 (e.g. 0.5 halves it, 0 removes it)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty)")
    parser.add_argument("--which", choices=options.WHICH, default="top",
                        help="top: only the highest-ranked intruder of each matrix (default); all: every intruder")
    arguments.add_analysis(parser, several_eps=False)
    arguments.add_scope(parser, split_fused=False)
    arguments.add_compute(parser.add_argument_group("computation"))
    arguments.add_quiet(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """``lorafft intervene``: print the summary (each rescaled σ before and after) and what a scan of the output will
    show; InputError propagates (the CLI prints it and exits 2)."""
    arguments.inputs_exist([args.base, args.tuned])
    options.output_directory(args.out)
    from lorafft.intervene import intervene

    summary = intervene(args.base, args.tuned, args.out, lam=args.lam, revision=args.revision, which=args.which,
                        eps=args.eps, k=args.k, include=args.include, exclude=args.exclude,
                        embeddings=args.embeddings, base_cache=args.base_cache, device=args.device,
                        backend=args.backend, progress=not args.quiet)
    print(summary.summary())
    print(expectation(summary))
    return 0


def expectation(summary) -> str:
    """What a scan of the written adapter or checkpoint against the same base will show, in words, with the
    command that checks it (``summary``: :class:`lorafft.intervene.InterventionSummary`)."""
    if summary.rescaled == 0 or summary.lam == 1:
        return "\nNothing changed: " + ("no intruder was found to rescale." if summary.rescaled == 0 else
                                        "λ = 1 keeps every singular value as it is.")
    if summary.lam == 0:
        moved = "0: those directions are gone from Wt, so they leave the top k and the counts"
    elif summary.lam < 1:
        moved = ("λ·σ, smaller: a rescaled vector moves down the spectrum and leaves the count once it falls out of "
                 "the top k")
    else:
        moved = "λ·σ, larger: a rescaled vector moves up the spectrum"
    return (f"\nWhat to expect: in the output, each rescaled vector keeps its direction, so its max|cos| against the "
            f"base is unchanged (the values above; up to the stored dtype's rounding), and its singular value becomes "
            f"{moved} (σ before -> after above); every other singular value and vector of Wt is unchanged.\n"
            f"Check: lorafft scan {summary.base} {summary.out_dir} --eps {summary.eps:g} --k {summary.k}")
