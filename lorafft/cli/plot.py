"""The ``lorafft plot`` and ``lorafft report`` commands: figures and HTML pages from saved JSON reports.

Both read what ``lorafft scan ... --out report.json`` (or a tracked training run) wrote; no checkpoint is needed.
When the checkpoints are still where the report says, ``plot`` adds the similarity heatmaps of the worst matrices
and, for a training-run scan, the intruder trajectory of the worst one; a tracked run's trajectory comes from the
report itself. The HTML page adds a heatmap; ``report A.json B.json --html`` puts several reports on one page.
Paths are checked before torch is imported; matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from typing import TYPE_CHECKING

from lorafft import options
from lorafft.cli import arguments
from lorafft.errors import InputError

if TYPE_CHECKING:  # annotations only: the report module is imported when a command runs
    from lorafft.report import Report

PLOT_EPILOG = """\
figures written into DIR (PNG):
  counts_vs_eps.png   total intruders versus eps, one curve per REPORT (and per checkpoint of a
                      training-run scan) - the paper's Figure 4; pass one report per LoRA rank to compare them
  counts_vs_k.png     intruders among the top k versus k / min(m, n) (Figure 15); only up to the scan's --k,
                      so scan with a large --k for this one
  layer_bars.png      intruders per layer, stacked by module
  checkpoint_totals.png  total intruders per checkpoint (a scan of several TUNED)
  magnitude_direction.png  dM against dD per matrix (DoRA's Figure 2; reports with those columns)
  spectrum-NAME.png   singular values of the few matrices with most intruders, fine-tuned and base
  similarity-NAME.png |cos| between the top singular vectors of base and fine-tune of the matrices with most
                      intruders (Figures 1-3; --heatmaps, --heatmap-size); read from the checkpoints
  trajectory-NAME.png for a training-run scan (several checkpoints): rank and singular value of each intruder
                      of the last checkpoint's worst matrix across the checkpoints (Figure 5); read from them,
                      or, for a tracked run (IntruderCallback, Tracker), from the cosines its report keeps
With several REPORTs the per-report figures are prefixed by the report's file name. Heatmaps, and a scan's
trajectory, need the checkpoints at the paths the report names (relative ones: from the current directory);
when they are gone the command says so in one line and writes the others. A tracked run has no heatmaps (it
keeps no singular vectors). Each figure is written to a temporary name and renamed into place when complete:
a plot that fails leaves the figures it finished and every file that was there before.

examples:
  lorafft scan ./base ./lora --eps 0.5 0.6 0.7 0.8 0.9 --out lora.json
  lorafft plot lora.json --out figures/
  lorafft plot rank1.json rank8.json full.json --out compare/ --eps 0.6
  lorafft plot lora.json --out zoom/ --heatmap-size 100 --spectra 0
  lorafft scan ./base ./run/checkpoint-100 ./run/checkpoint-200 --out run.json && lorafft plot run.json --out run/
"""

REPORT_EPILOG = """\
One REPORT: the page holds the inputs, options and versions, intruder totals per eps, the matrices with most
intruders, every figure of 'lorafft plot', and one row per matrix. Several REPORTs: one page comparing them
(LoRA beside full fine-tuning): what each is, intruders per eps of each, counts vs eps on one axis, per-layer
bars side by side, the matrices with most intruders in each. One file with the images inside: mail it, open
it offline. Needs matplotlib for the figures (pip install matplotlib, or the 'plot' extra).

examples:
  lorafft scan ./base ./lora --out report.json && lorafft report report.json --html report.html
  lorafft report report.json --html report.html --no-heatmap   # the checkpoints are elsewhere
  lorafft report lora.json full.json --html both.html          # LoRA beside full fine-tuning
"""


def _at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def add_commands(subparsers) -> None:
    """Register ``plot`` and ``report`` on the ``lorafft`` command's subparsers; the parsed args carry ``run``
    (:func:`run_plot`, :func:`run_report`)."""
    plot = subparsers.add_parser("plot", help="draw the paper's figures from saved reports (PNG files)",
                                 description="Draw intruder-dimension figures from one or more JSON reports written "
                                             "by 'lorafft scan --out FILE.json'.",
                                 epilog=PLOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("reports", nargs="+", metavar="REPORT", help="JSON report(s) from 'lorafft scan --out'")
    plot.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files (created if needed)")
    plot.add_argument("--side", choices=["left", "right"],
                      help="singular vectors to plot (default: left when every report has them, else right)")
    plot.add_argument("--eps", type=arguments.checked(float, arguments.threshold, "--eps"), metavar="EPS",
                      help="threshold of the per-layer, top-k and spectrum figures (default: each report's smallest)")
    plot.add_argument("--spectra", type=_at_least(0), default=3, metavar="N",
                      help="spectrum figures for the N matrices with most intruders (default: 3)")
    plot.add_argument("--heatmaps", type=_at_least(0), metavar="N",
                      help="similarity heatmaps for the N matrices with most intruders, read from the checkpoints "
                           "(default: 1; 0: none)")
    plot.add_argument("--heatmap-size", type=_at_least(1), default=10, metavar="n",
                      help="top n base and fine-tuned singular vectors per heatmap (default: 10, as the paper; "
                           "up to a few hundred)")
    plot.add_argument("--no-trajectory", action="store_true",
                      help="no intruder trajectory for a training-run scan (it reads every checkpoint)")
    plot.add_argument("--dpi", type=_at_least(10, 1200), default=100,
                      help="resolution of the PNG files, 10 to 1200 (default: 100)")
    plot.set_defaults(run=run_plot)

    report = subparsers.add_parser("report", help="write a saved report as one self-contained HTML page",
                                   description="Turn a JSON report written by 'lorafft scan --out FILE.json' into one "
                                               "HTML file with tables and figures, viewable offline.",
                                   epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("reports", nargs="+", metavar="REPORT",
                        help="JSON report(s) from 'lorafft scan --out'; several: one page comparing them")
    report.add_argument("--html", required=True, metavar="FILE", help="the HTML file to write")
    report.add_argument("--side", choices=["left", "right"],
                        help="several REPORTs: the singular vectors compared (default: left when every report has "
                             "them, else right)")
    report.add_argument("--no-heatmap", action="store_true",
                        help="do not read the checkpoints for the worst matrix's similarity heatmap")
    report.set_defaults(run=run_report)


def _side(reports: list[Report], paths: list[str], side: str | None) -> str:
    """The side to plot: ``side``, else left when every report has it, else right; InputError naming a report that
    lacks it."""
    present = [{r.side for r in report.rows} for report in reports]
    chosen = side or ("left" if all("left" in sides for sides in present) else "right")
    for path, sides in zip(paths, present):
        if chosen not in sides:
            raise InputError(path, f"has no {chosen} singular vectors (scanned: {', '.join(sorted(sides))}); "
                                   "choose --side")
    return chosen


def _labels(paths: list[str]) -> list[str]:
    """One label per report: the file name without extension, or the whole path where two names collide."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return stems if len(set(stems)) == len(stems) else list(paths)


def _filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _missing_checkpoints(report: Report) -> list[str]:
    """The report's base and tuned inputs that are not on disk (all of them for in-memory state dicts)."""
    paths = [str(report.inputs.get("base")), *map(str, report.checkpoints)]
    return [path for path in paths if not os.path.exists(path)]


def _checkpoint_figures(report: Report, side: str, eps: float, heatmaps: int, args):
    """``(filename, Figure)`` pairs drawn from the checkpoints: the similarity heatmaps of the ``heatmaps``
    matrices with most intruders (of the last checkpoint) and, for several checkpoints, the intruder trajectory of
    the worst one. InputError when a checkpoint cannot be read."""
    from lorafft.plots import figures
    from lorafft.plots.heatmaps import plot_similarity, similarity
    from lorafft.plots.trajectory import intruder_trajectory, plot_trajectory

    base = report.inputs["base"]
    for row in figures.worst_rows(report, eps, heatmaps, side):
        drawn = similarity(base, report.checkpoints[row.checkpoint], row.name, n=args.heatmap_size, side=side, eps=eps,
                           k_intruders=row.k, split_fused=report.options.get("split_fused", False))
        yield f"similarity-{_filename(row.name)}.png", plot_similarity(drawn)
    if len(report.checkpoints) > 1 and not args.no_trajectory:
        (row,) = figures.worst_rows(report, eps, 1, side)
        drawn = intruder_trajectory(base, report.checkpoints, row.name, side=side, eps=eps, k=row.k,
                                    split_fused=report.options.get("split_fused", False))
        yield f"trajectory-{_filename(row.name)}.png", plot_trajectory(drawn)


def run_plot(args) -> int:
    """``lorafft plot``: write every report-only figure into ``args.out`` and the figures read from the checkpoints
    when they are on disk (a tracked run's trajectory from its report); print the files written. Each figure is
    renamed into place when complete: a failure leaves the figures finished before it and removes only its
    temporary file (and ``args.out`` when this run made it and it is still empty)."""
    options.output_directory(args.out)
    for path in args.reports:
        options.report_file(path)
    from lorafft.report import Report

    reports = [Report.load(path) for path in args.reports]
    side = _side(reports, args.reports, args.side)
    created = not os.path.isdir(args.out)
    os.makedirs(args.out, exist_ok=True)
    written = []
    try:
        _write_figures(args, reports, side, written)
    except BaseException as error:
        if created and not os.listdir(args.out):
            os.rmdir(args.out)
        if isinstance(error, ImportError):
            print(f"lorafft: error: {error}", file=sys.stderr)
            return 1
        raise
    finally:
        print("\n".join(written))
    return 0


def _write_figures(args, reports: list[Report], side: str, written: list[str]) -> None:
    """Every figure of ``lorafft plot`` into ``args.out``, each path appended to ``written`` once in place."""
    from lorafft.io.writer import atomic_path
    from lorafft.plots import figures
    from lorafft.plots.magnitude_direction import plot_magnitude_direction

    labels = _labels(args.reports)

    def save(figure, name):
        target = os.path.join(args.out, name)
        with atomic_path(target) as temporary:
            figure.savefig(temporary, format="png", dpi=args.dpi)
        written.append(target)

    save(figures.plot_counts_vs_eps(dict(zip(labels, reports)) if len(reports) > 1 else reports[0], side),
         "counts_vs_eps.png")
    for label, report in zip(labels, reports):
        prefix = f"{_filename(label)}-" if len(reports) > 1 else ""
        eps = report.threshold(args.eps)
        if len(report.checkpoints) > 1:
            save(figures.plot_checkpoint_totals(report, side), f"{prefix}checkpoint_totals.png")
        save(figures.plot_counts_vs_k(report, side, eps), f"{prefix}counts_vs_k.png")
        save(figures.plot_layer_bars(report, side, eps), f"{prefix}layer_bars.png")
        if any(r.delta_magnitude is not None and r.delta_direction is not None for r in report.rows):
            save(plot_magnitude_direction(report), f"{prefix}magnitude_direction.png")
        for row in figures.worst_rows(report, eps, args.spectra, side):
            save(figures.plot_spectra(report, row.name, side, eps), f"{prefix}spectrum-{_filename(row.name)}.png")
        for name, figure in _from_vectors(label, report, side, eps, args):
            save(figure, prefix + name)


def _from_vectors(label: str, report: Report, side: str, eps: float, args):
    """``(filename, Figure)`` of the figures that need singular vectors: for a tracked run its trajectory from the
    report; otherwise those of :func:`_checkpoint_figures` when the checkpoints are on disk. What cannot be drawn
    is said in one note on stderr (for a tracked run's heatmaps, only when ``--heatmaps`` asked for them)."""
    from lorafft.plots import figures
    from lorafft.plots.trajectory import is_tracked, plot_trajectory, tracked_trajectory

    heatmaps = 1 if args.heatmaps is None else args.heatmaps
    trajectory = len(report.checkpoints) > 1 and not args.no_trajectory
    if is_tracked(report):
        if args.heatmaps:
            print(f"lorafft: note: {label}: no similarity heatmap: a tracked run keeps no singular vectors",
                  file=sys.stderr)
        if trajectory:
            (row,) = figures.worst_rows(report, eps, 1, side)
            try:
                drawn = tracked_trajectory(report, row.name, side=side, eps=eps)
            except ValueError as error:
                print(f"lorafft: note: {label}: no trajectory: {error}", file=sys.stderr)
            else:
                yield f"trajectory-{_filename(row.name)}.png", plot_trajectory(drawn)
        return
    if not heatmaps and not trajectory:
        return
    missing = _missing_checkpoints(report)
    if missing:
        print(f"lorafft: note: {label}: no similarity heatmap or trajectory: checkpoint(s) not found: "
              f"{', '.join(missing)}", file=sys.stderr)
        return
    try:
        yield from _checkpoint_figures(report, side, eps, heatmaps, args)
    except InputError as error:
        print(f"lorafft: note: {label}: no similarity heatmap or trajectory: {error}", file=sys.stderr)


def run_report(args) -> int:
    """``lorafft report``: write one report as an HTML page, or several as one page comparing them."""
    options.output_file(args.html, arguments.HTML_SUFFIXES)
    for path in args.reports:
        options.report_file(path)
    from lorafft.plots.html import write_comparison_html, write_html
    from lorafft.report import Report

    reports = [Report.load(path) for path in args.reports]
    try:
        if len(reports) == 1:
            write_html(reports[0], args.html, heatmap=not args.no_heatmap)
        else:
            side = _side(reports, args.reports, args.side)
            write_comparison_html(dict(zip(_labels(args.reports), reports)), args.html, side=side)
    except ImportError as error:
        print(f"lorafft: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.html}")
    return 0
