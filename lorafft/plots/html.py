"""Self-contained HTML pages: one report's tables and figures (:func:`write_html`), or several reports side by side
(:func:`write_comparison_html`: LoRA beside full fine-tuning, the paper's central picture). Readable offline (no
external CSS, JS or fonts; figures are PNGs embedded as base64 data URIs); wide tables scroll inside their own box,
so no page is wider than the window. Text from tensor and file names goes through :func:`~lorafft.plots.figures.
printable`."""

from __future__ import annotations

import base64
import io
import math
import os
from html import escape

from lorafft.errors import InputError
from lorafft.io.writer import write_atomic
from lorafft.options import eps_key
from lorafft.plots import figures as fig
from lorafft.plots import magnitude_direction, trajectory
from lorafft.errors import printable

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; text-align: center; } td.text { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; max-width: 40em; }
"""


def _text(value) -> str:
    """A cell's text as a reader expects it: booleans ``yes``/``no``, a missing value (None, an empty list) ``—``,
    a list its items joined by commas, anything else ``str(value)``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    """An HTML table, every cell escaped; cells with letters left-aligned, numbers right-aligned."""
    def cell(value):
        value = _text(value)
        align = ' class="text"' if any(ch.isalpha() for ch in value) else ""
        return f"<td{align}>{escape(value)}</td>"

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>\n{body}</table></div>\n'


def _page(title: str, parts: list[str]) -> str:
    """A whole page: ``title`` as its title and heading, then ``parts`` (HTML), every character encodable."""
    return printable(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
                     f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n" + "".join(parts)
                     + "</body></html>\n")


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(figure, caption: str) -> str:
    return (f'<figure><img src="{_png(figure)}" alt="{escape(caption)}">'
            f'<figcaption>{escape(caption)}</figcaption></figure>\n')


def _bound(row) -> str:
    worst = max(row.error_bound, default=0.0)
    return "not separated" if math.isinf(worst) else f"{worst:.1e}"


def _from_vectors(report, row) -> str:
    """The figures that need singular vectors, for ``row``'s matrix (the worst): for a tracked run its trajectory,
    followed through the cosines the tracker kept; else the similarity heatmap when both checkpoints are still on
    disk; otherwise a note saying why not."""
    if trajectory.is_tracked(report):
        note = ("<p>No similarity heatmap: a tracked run keeps each step's rows and the cosines between consecutive "
                "steps' vectors, not the weights or the singular vectors themselves.</p>\n")
        if len(report.checkpoints) < 2:
            return note
        try:
            drawn = trajectory.tracked_trajectory(report, row.name, side=row.side, eps=report.threshold())
        except ValueError as error:
            return note + f"<p>No trajectory: {escape(str(error))}.</p>\n"
        caption = (f"Intruders of {row.name} ({row.side}) at the last tracked step, followed back step by step: "
                   f"rank and singular value of the best match among each step's top {drawn.search} (paper "
                   f"Figure 5); hollow markers: no match with |cos| ≥ ε.")
        return note + _figure(trajectory.plot_trajectory(drawn), caption)
    return _heatmap(report, row)


def _heatmap(report, row) -> str:
    """The similarity heatmap of ``row``'s matrix when both checkpoints are still on disk, else a note."""
    from lorafft.plots.heatmaps import plot_similarity, similarity

    base, tuned = report.inputs.get("base"), report.checkpoints[row.checkpoint]
    missing = [str(p) for p in (base, tuned) if not os.path.exists(str(p))]
    if missing:
        return f"<p>No similarity heatmap: {escape(', '.join(missing))} not found (the checkpoints are needed).</p>\n"
    eps = min(report.eps)
    try:
        drawn = similarity(base, tuned, row.name, n=min(row.k, 10), side=row.side, eps=eps, k_intruders=row.k,
                           split_fused=report.options.get("split_fused", False))
    except InputError as error:
        return f"<p>No similarity heatmap: {escape(str(error))}</p>\n"
    outlined = "; intruder columns outlined" if bool(drawn.intruders.any()) else "; no intruders"
    return _figure(plot_similarity(drawn), f"|cos| between the top singular vectors of {row.name} ({row.side}) in the "
                                           f"base (rows) and the fine-tune (columns){outlined} (paper Figures 1–3).")


INTRODUCTION = ("<p>A tuned singular vector y<sub>j</sub> is an <em>intruder</em> at threshold ε when "
                "max<sub>i</sub> |⟨y<sub>j</sub>, x<sub>i</sub>⟩| &lt; ε over every singular vector x<sub>i</sub> of "
                "the base matrix (Shuttleworth et al., arXiv 2410.21228). Any unit vector has max |cos| ≥ 1/√d "
                "against a complete basis of R<sup>d</sup>: the random floor.</p>\n")


def write_html(report, path, *, figures: bool = True, spectra: int = 3, worst: int = 10,
               heatmap: bool = True) -> None:
    """Write ``report`` as one offline HTML page at ``path`` (atomically).

    Contents: inputs, options and versions; a summary (intruders per ε per side and checkpoint, the random floor, the
    ``worst`` matrices with most intruders, the skipped list); with ``figures`` (needs matplotlib) every figure of
    :mod:`lorafft.plots.figures` per side, ΔM against ΔD, the spectra of the ``spectra`` worst matrices and, with
    ``heatmap``, the worst one's similarity heatmap when the checkpoints are still on disk (a tracked run's report:
    its intruder trajectory instead); last, one table row per matrix and side.
    """
    eps = report.threshold()
    ranked = fig.worst_rows(report, eps, worst)
    parts = [INTRODUCTION, "<h2>Inputs</h2>\n", _table(["", "value"], _inputs(report))]
    parts.append("<h2>Summary</h2>\n")
    parts.append(summary_html(report, ranked))
    parts.append("<h3>Skipped</h3>\n")
    parts.append(_table(["matrix", "reason"], [[s.get("name"), s.get("reason")] for s in report.skipped])
                 if report.skipped else "<p>none</p>\n")
    if figures:
        parts.append("<h2>Figures</h2>\n")
        parts.extend(_figures(report, ranked[:spectra]))
        if heatmap and ranked:
            parts.append(_from_vectors(report, ranked[0]))
    parts.append("<h2>Every matrix</h2>\n")
    parts.append(_every_matrix(report))
    write_atomic(path, _page("lorafft: intruder dimensions", parts))


def _inputs(report) -> list[list]:
    """The rows of the inputs table: each input, when the report was made, its options and library versions."""
    inputs = []
    for key, value in report.inputs.items():
        values = value if isinstance(value, list) else [value]
        inputs += [[f"{key} [{i}]" if len(values) > 1 else key, v] for i, v in enumerate(values)]
    inputs += [["created", report.created]]
    inputs += [[f"option {key}", value] for key, value in report.options.items()]
    inputs += [[f"version {key}", value] for key, value in report.versions.items()]
    return inputs


def write_comparison_html(reports: dict, path, *, side: str | None = None, figures: bool = True) -> None:
    """Write several reports as one offline HTML page at ``path`` (atomically): the paper's central picture when
    they are a LoRA fine-tune and a full one of the same base.

    ``reports``: ``{label: report}`` (the label names each one, e.g. its file name); a report of several
    checkpoints stands by its last. ``side``: the singular vectors compared (default: left when every report has
    them, else right). Contents: what each report is (inputs, k, ε), the intruders per ε of each (counted from max
    |cos| at every report's ε, so reports scanned at different ε compare), the matrices with most intruders in
    each, and with ``figures`` (needs matplotlib) the counts versus ε of all on one axis and their per-layer counts
    side by side.
    """
    side = side or ("left" if all(any(r.side == "left" for r in rep.rows) for rep in reports.values()) else "right")
    eps = sorted({e for report in reports.values() for e in report.eps})
    last = {label: fig.select_rows(report, side) for label, report in reports.items()}
    described = [[label, report.inputs.get("base"), report.checkpoints[-1], _kind(report, len(report.checkpoints) - 1),
                  sorted({r.k for r in last[label]}), ", ".join(f"{e:g}" for e in report.eps)]
                 for label, report in reports.items()]
    totals = [[label, len(rows), f"{min(r.random_floor for r in rows):.3g}"]
              + [sum(r.intruders(e) for r in rows) for e in eps] for label, rows in last.items()]
    parts = [INTRODUCTION, "<h2>Reports</h2>\n",
             _table(["report", "base", "fine-tune (last checkpoint)", "kind", "k", "ε scanned"], described),
             f"<h2>Intruders ({side} singular vectors), summed over matrices</h2>\n",
             _table(["report", "matrices", "random floor 1/√d (smallest)"] + [f"ε = {e:g}" for e in eps], totals)]
    if figures:
        parts.append("<h2>Figures</h2>\n")
        parts.append(_figure(fig.plot_counts_vs_eps(reports, side),
                             f"Total intruders versus ε, one curve per report ({side} singular vectors; paper "
                             f"Figure 4)."))
        parts.append(_figure(fig.plot_layer_bars_compared(reports, side, eps[0]),
                             f"Intruders per layer at ε = {eps[0]:g}, one bar per report side by side."))
    for label, rows in last.items():
        worst = sorted(rows, key=lambda r: (-r.intruders(eps[0]), min(r.max_cos, default=1.0)))[:10]
        parts.append(f"<h3>{escape(str(label))}: most intruders at ε = {eps[0]:g}</h3>\n")
        parts.append(_table(["matrix", f"intruders at {eps[0]:g}", "min max|cos|"],
                            [[r.name, f"{r.intruders(eps[0])}/{r.k}", f"{min(r.max_cos):.3f}"] for r in worst]))
    write_atomic(path, _page(f"lorafft: {len(reports)} reports compared", parts))


def _kind(report, checkpoint: int) -> str:
    kinds = report.inputs.get("tuned_kind")
    return kinds[checkpoint] if isinstance(kinds, list) else str(kinds)


def summary_html(report, ranked=None, *, figure: bool = False) -> str:
    """The summary as HTML: intruders per ε, side and checkpoint beside the random floor, then the matrices with most
    intruders (``ranked``, default the 10 worst at the smallest ε); with ``figure`` (and matplotlib installed) the
    counts-vs-ε figure too. :meth:`lorafft.report.Report._repr_html_` shows this in notebooks."""
    eps, keys = report.threshold(), [eps_key(e) for e in report.eps]
    ranked = fig.worst_rows(report, eps, 10) if ranked is None else ranked
    trajectory = len(report.checkpoints) > 1
    summary = []
    for c in range(len(report.checkpoints)):
        for side in sorted({r.side for r in report.rows}):
            rows = fig.select_rows(report, side, c)
            floors = sorted(r.random_floor for r in rows)
            floor = f"{floors[0]:.3g}" if floors[0] == floors[-1] else f"{floors[0]:.3g} .. {floors[-1]:.3g}"
            totals = report.totals(side, c)
            summary.append(([f"[{c}] {fig.checkpoint_label(report, c)}"] if trajectory else [])
                           + [side, len(rows), floor, *(totals[key] for key in keys)])
    header = (["checkpoint"] if trajectory else []) + ["side", "matrices", "random floor 1/√d"]
    parts = ["<p>Intruders (max |cos| &lt; ε), summed over matrices:</p>\n",
             _table(header + [f"ε = {key}" for key in keys], summary),
             f"<h3>Most intruders at ε = {eps:g}{' (last checkpoint)' if trajectory else ''}</h3>\n",
             _table(["matrix", "side", f"intruders at {eps:g}", "min max|cos|"],
                    [[r.name, r.side, f"{r.intruders(eps)}/{r.k}", f"{min(r.max_cos):.3f}"] for r in ranked])]
    if figure:
        try:
            parts.append(_figure(fig.plot_counts_vs_eps(report, sorted({r.side for r in report.rows})[0]),
                                 "Total intruders versus ε (paper Figure 4)."))
        except ImportError:  # matplotlib is an optional extra: the tables alone then
            pass
    return printable("".join(parts))


def _figures(report, spectra: list) -> list[str]:
    """Every report-only figure per side, and the spectra of the rows ``spectra``."""
    eps, parts = report.threshold(), []
    for side in sorted({r.side for r in report.rows}):
        parts.append(_figure(fig.plot_counts_vs_eps(report, side),
                             f"Total intruders versus ε, {side} singular vectors (paper Figure 4)."))
        if len(report.checkpoints) > 1:
            parts.append(_figure(fig.plot_checkpoint_totals(report, side),
                                 f"Intruders per fine-tune and ε, {side} singular vectors."))
        parts.append(_figure(fig.plot_counts_vs_k(report, side, eps),
                             f"Intruders among the top k versus k / min(m, n), {side} (paper Figure 15); the "
                             f"report holds only its top k per matrix."))
        parts.append(_figure(fig.plot_layer_bars(report, side, eps), f"Intruders per layer and module, {side}."))
    if any(r.delta_magnitude is not None and r.delta_direction is not None for r in report.rows):
        parts.append(_figure(magnitude_direction.plot_magnitude_direction(report),
                             magnitude_direction.caption(report)))
    for row in spectra:
        where = fig.checkpoint_label(report, row.checkpoint)
        ringed = "intruders ringed" if row.intruders(eps) else f"no intruder at ε = {eps:g}"
        parts.append(_figure(fig.plot_spectra(report, row.name, row.side, eps, checkpoint=row.checkpoint),
                             f"Singular values of {row.name} ({row.side}) in {where}, fine-tuned and base; {ringed}."))
    return parts


def _every_matrix(report) -> str:
    """One table row per matrix, side (and checkpoint)."""
    keys, trajectory = [eps_key(e) for e in report.eps], len(report.checkpoints) > 1
    header = ["matrix"] + (["checkpoint"] if trajectory else []) + ["layer", "module", "shape", "side"]
    header += [f"ε = {key}" for key in keys] + ["min max|cos|", "max error bound", "near ε"]
    table = [[r.name] + ([f"[{r.checkpoint}] {fig.checkpoint_label(report, r.checkpoint)}"] if trajectory else [])
             + ["" if r.layer is None else r.layer, r.module, f"{r.shape[0]}×{r.shape[1]}", r.side]
             + [r.counts[key] for key in keys] + [f"{min(r.max_cos):.4f}", _bound(r), sum(r.near_threshold)]
             for r in report.rows]
    return _table(header, table)
