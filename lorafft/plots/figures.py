"""The paper's figures drawn from a report alone (no checkpoint is read).

* :func:`plot_counts_vs_eps` — intruder count versus the threshold ε, one curve per report or checkpoint
  (Shuttleworth et al. 2410.21228, Figure 4);
* :func:`plot_counts_vs_k` — intruders among the top k as k grows, x = k / min(m, n) (Figure 15);
* :func:`plot_layer_bars` — intruders per layer, stacked by module;
* :func:`plot_spectra` — one matrix's fine-tuned singular values beside the base's, intruders marked;
* :func:`plot_checkpoint_totals` — intruders per tuned input and ε (many adapters of one base, or a run);
* :func:`plot_layer_bars_compared` — intruders per layer, one bar per report side by side (LoRA beside full
  fine-tuning).

Counts are integers and their axes start at 0; a figure with nothing to count says so in words ("no intruders at
ε = 0.5 among the top 10"). Text drawn from tensor names goes through :func:`printable` (a lone surrogate of an odd
file name cannot be drawn). Each takes an optional matplotlib ``ax`` and returns the Figure. Without ``ax`` the
figure is a bare ``matplotlib.figure.Figure`` (never pyplot: no global state, no display needed; ``savefig`` renders
with Agg). matplotlib is an optional extra (``pip install matplotlib``, or the ``plot`` extra), imported only when a
figure is drawn.

A vector y_j is an intruder at ε when its ``max_cos[j] < ε``; counts for any ε are taken from the rows' ``max_cos``
lists (the same fp64 comparison the scan made), so a figure's ε need not be one the scan swept. A report of a
training run (``scan(base, [ckpt, ...])``) has rows for every checkpoint: :func:`plot_counts_vs_eps` draws each,
the single-report figures draw one (the last by default).
"""

from __future__ import annotations

import math
import os
import statistics

import numpy

from lorafft.errors import plural, printable

# ``report`` arguments are lorafft.report.Report objects and ``row``/``rows`` their MatrixRows, unannotated: plots
# never imports lorafft.report, whose plot_* methods call into plots (the dependency runs one way).

DEFAULT_EPS_GRID = tuple(i / 20 for i in range(2, 20))  # 0.1, 0.15, ..., 0.95


def new_axes(ax=None, size=(6.4, 4.2)):
    """``(figure, axes)``: the given axes and its figure, or a new single-axes Figure (matplotlib imported here)."""
    if ax is not None:
        return ax.figure, ax
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("lorafft's figures need matplotlib: pip install matplotlib (or the lorafft 'plot' "
                          "extra)") from error
    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.add_subplot()


def module_label(module: str) -> str:
    """A row's module path as drawn: :func:`printable`, and ``"(top level)"`` for a matrix named ``weight`` alone."""
    return printable(module) or "(top level)"


def count_axis(ax, total: int, empty: str) -> None:
    """A count's y axis: integer ticks from 0; when ``total`` (everything drawn) is 0, the axes say ``empty`` in
    words instead of showing a blank box around 0."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if total == 0:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.55, empty, transform=ax.transAxes, ha="center", va="center", wrap=True,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"})
    else:
        ax.set_ylim(bottom=0)


def select_rows(report, side: str, checkpoint: int | None = None):
    """The rows of one side and one checkpoint (default: the last one, the only one of a plain scan)."""
    checkpoint = len(report.checkpoints) - 1 if checkpoint is None else checkpoint
    rows = [r for r in report.rows if r.side == side and r.checkpoint == checkpoint]
    if not rows:
        sides = sorted({r.side for r in report.rows})
        raise ValueError(f"the report has no {side!r} rows for checkpoint {checkpoint} (sides: {', '.join(sides)}; "
                         f"checkpoints: 0..{len(report.checkpoints) - 1})")
    return rows


def checkpoint_label(report, checkpoint: int) -> str:
    """``"lora: adapter-dir"``: the kind and file name of one tuned input (the name alone when it is the kind)."""
    kinds = report.inputs.get("tuned_kind")
    kind = kinds[checkpoint] if isinstance(kinds, list) else kinds
    name = printable(os.path.basename(os.path.normpath(str(report.checkpoints[checkpoint]))))
    return f"{kind}: {name}" if kind and kind != name else name


def worst_rows(report, eps: float, count: int = 5, side: str | None = None,
               checkpoint: int | None = None):
    """The ``count`` rows with most intruders at ``eps``, ties broken by lowest max |cos| (rows of one side when
    given, of the last checkpoint by default); rows without intruders are included when fewer have any."""
    checkpoint = len(report.checkpoints) - 1 if checkpoint is None else checkpoint
    rows = [r for r in report.rows if (side is None or r.side == side) and r.checkpoint == checkpoint]
    return sorted(rows, key=lambda r: (-r.intruders(eps), min(r.max_cos, default=1.0)))[:count]


def find_row(report, name: str, side: str = "left", checkpoint: int | None = None):
    """The row of the matrix called ``name`` (base or tuned tensor name)."""
    rows = select_rows(report, side, checkpoint)
    for row in rows:
        if name in (row.name, row.tuned_name):
            return row
    raise ValueError(f"no {side} row named {name!r} in the report (e.g. {', '.join(r.name for r in rows[:3])})")


def _k_note(rows) -> str:
    ks = sorted({r.k for r in rows})
    return f"top-k = {ks[0]}" if len(ks) == 1 else f"top-k = {ks[0]}..{ks[-1]}"


def _top(rows) -> str:
    """``"the top 10"`` (or ``"the top 4..10"``): how many tuned vectors per matrix the counts look at."""
    ks = sorted({r.k for r in rows})
    return f"the top {ks[0]}" if len(ks) == 1 else f"the top {ks[0]}..{ks[-1]}"


def plot_counts_vs_eps(reports, side: str = "left", eps_grid=None, *, ax=None):
    """Total intruder count (summed over matrices) versus ε — the paper's Figure 4.

    One curve per report (labelled by the dict key, e.g. per LoRA rank) and, in a report of several checkpoints,
    per checkpoint. ``eps_grid`` defaults to 0.1 … 0.95 in steps of 0.05. A dashed vertical line marks the median
    random-direction floor 1/√d of the rows: any unit vector has max |cos| ≥ that, so ε below it counts nothing.
    """
    grid = DEFAULT_EPS_GRID if eps_grid is None else tuple(sorted(float(e) for e in eps_grid))
    labelled = reports.items() if isinstance(reports, dict) else [(None, reports)]
    figure, ax = new_axes(ax)
    floors, everything, total = [], [], 0
    for label, report in labelled:
        count = len(report.checkpoints)
        for checkpoint in range(count):
            rows = select_rows(report, side, checkpoint)
            floors.extend(r.random_floor for r in rows)
            everything.extend(rows)
            curve_label = label if label is not None else checkpoint_label(report, checkpoint)
            if count > 1:
                curve_label = " ".join(filter(None, (label, f"[{checkpoint}]", checkpoint_label(report, checkpoint))))
            counts = [sum(r.intruders(e) for r in rows) for e in grid]
            total += sum(counts)
            ax.plot(grid, counts, marker="o", markersize=3, label=curve_label)
    floor = statistics.median(floors)
    ax.axvline(floor, linestyle="--", color="grey", label=f"random floor 1/√d (median {floor:.3g})")
    ax.set_xlabel("threshold ε (intruder: max |cos| to every base singular vector < ε)")
    ax.set_ylabel("intruder dimensions (sum over matrices)")
    ax.set_title(f"Intruder dimensions vs ε ({side} singular vectors, {_k_note(everything)})")
    count_axis(ax, total, f"no intruders at any ε from {grid[0]:g} to {grid[-1]:g}\namong {_top(everything)} "
                          f"{side} singular vectors")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return figure


def plot_checkpoint_totals(report, side: str = "left", eps=None, *, ax=None):
    """Intruders per tuned input (x: adapters of one base, or checkpoints of one run), one bar per ε: which of these
    fine-tunes grew intruders. ``eps`` defaults to the report's thresholds; only each input's own matrices count."""
    eps = tuple(report.eps) if eps is None else tuple(sorted(float(e) for e in eps))
    checkpoints = range(len(report.checkpoints))
    totals = [[sum(r.intruders(e) for r in report.rows if r.side == side and r.checkpoint == c) for c in checkpoints]
              for e in eps]
    figure, ax = new_axes(ax, size=(max(6.4, 0.9 * len(report.checkpoints) * len(eps) ** 0.5 + 3), 4.2))
    width = 0.8 / len(eps)
    for index, (threshold, heights) in enumerate(zip(eps, totals)):
        positions = [c + (index - (len(eps) - 1) / 2) * width for c in checkpoints]
        ax.bar(positions, heights, width, label=f"ε = {threshold:g}")
    ax.set_xticks(list(checkpoints), [checkpoint_label(report, c) for c in checkpoints], rotation=30, ha="right",
                  fontsize="small")
    ax.set_ylabel("intruder dimensions (sum over the input's matrices)")
    ax.set_title(f"Intruders per fine-tune ({side} singular vectors)")
    rows = [r for r in report.rows if r.side == side]
    count_axis(ax, sum(map(sum, totals)), f"no intruders at ε = {', '.join(f'{e:g}' for e in eps)}\n"
                                          f"among {_top(rows)} {side} singular vectors of any input")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return figure


def counts_vs_fraction(rows, eps: float) -> tuple[list[float], list[int]]:
    """``(x, y)``: x = k / min(m, n), y = intruders at ``eps`` among each matrix's top ⌊x·min(m, n)⌋ vectors, summed
    over ``rows``; x runs up to the smallest fraction every row's k covers (beyond it the report knows nothing)."""
    reach = min(r.k / min(r.shape) for r in rows)
    xs = numpy.unique(numpy.concatenate([numpy.arange(1, r.k + 1) / min(r.shape) for r in rows]))
    xs = xs[xs <= reach]
    ys = numpy.zeros(len(xs), dtype=numpy.int64)
    for r in rows:
        below = numpy.concatenate([[0], numpy.cumsum(numpy.asarray(r.max_cos) < eps)])
        ys += below[numpy.floor(xs * min(r.shape) + 1e-9).astype(numpy.int64)]
    return [0.0, *xs.tolist()], [0, *ys.tolist()]


def plot_counts_vs_k(report, side: str = "left", eps: float = 0.5, *, per_module: bool = False,
                     checkpoint: int | None = None, ax=None):
    """Intruders among the top k tuned singular vectors as k grows, x = k / min(m, n) — the paper's Figure 15.

    Summed over matrices (one curve), or one curve per module with ``per_module``. A report holds only its top k
    vectors per matrix, so each curve stops at the smallest k / min(m, n) its matrices cover; scan with
    ``k = min(m, n)`` for the whole spectrum, as the paper does.
    """
    rows = select_rows(report, side, checkpoint)
    groups = {}
    for row in rows:
        groups.setdefault(row.module if per_module else f"all {len(rows)} matrices", []).append(row)
    figure, ax = new_axes(ax, size=(7.6, 4.2) if per_module else (6.4, 4.2))
    reach, total = 0.0, 0
    for label, group in sorted(groups.items()):
        xs, ys = counts_vs_fraction(group, eps)
        reach, total = max(reach, xs[-1]), total + ys[-1]
        ax.step(xs, ys, where="post", label=f"{module_label(label)} ({len(group)})" if per_module else label)
    ax.set_xlabel(f"k / min(m, n): fraction of the spectrum (the report's {_k_note(rows)}: known up to {reach:.3g})")
    ax.set_ylabel(f"intruders among the top k (ε = {eps:g})")
    ax.set_title(f"Intruders among the top k ({side} singular vectors)")
    count_axis(ax, total, f"no intruders at ε = {eps:g} among {_top(rows)} {side} singular vectors")
    if per_module:
        ax.legend(fontsize="small", title="module (matrices)", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return figure


def plot_layer_bars(report, side: str = "left", eps: float = 0.5, *, checkpoint: int | None = None, ax=None):
    """Intruder count per layer (x) at ``eps``, stacked by module; matrices without a layer index (embeddings,
    ``lm_head``) form a last bar, "other"."""
    rows = select_rows(report, side, checkpoint)
    positions, labels = _layers(rows)
    modules = sorted({r.module for r in rows})
    figure, ax = new_axes(ax, size=(7.2, 4.2))
    bottom = [0] * len(labels)
    for module in modules:
        heights = [0] * len(labels)
        for r in rows:
            if r.module == module:
                heights[positions[r.layer]] += r.intruders(eps)
        ax.bar(range(len(labels)), heights, bottom=bottom, label=module_label(module))
        bottom = [b + h for b, h in zip(bottom, heights)]
    _layer_ticks(ax, labels)
    ax.set_ylabel(f"intruder dimensions (ε = {eps:g}, {_k_note(rows)})")
    ax.set_title(f"Intruders per layer and module ({side} singular vectors)")
    count_axis(ax, sum(bottom), f"no intruders at ε = {eps:g} among {_top(rows)} {side} singular vectors\n"
                                f"of any of the {len(rows)} matrices")
    ax.legend(fontsize="small", title="module", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return figure


def _layers(rows) -> tuple[dict, list[str]]:
    """``({layer: x position}, tick labels)``: layer indices in order, then "other" for matrices without one."""
    layers = sorted({r.layer for r in rows if r.layer is not None})
    positions = {layer: index for index, layer in enumerate(layers)}
    labels = [str(layer) for layer in layers]
    if any(r.layer is None for r in rows):
        positions[None] = len(labels)
        labels.append("other")
    return positions, labels


def _layer_ticks(ax, labels: list[str]) -> None:
    """Layer tick labels along x, thinned to at most 32."""
    step = math.ceil(len(labels) / 32)
    ax.set_xticks(range(0, len(labels), step), labels[::step])
    ax.set_xlabel("layer")


def plot_layer_bars_compared(reports: dict, side: str = "left", eps: float = 0.5, *, ax=None):
    """Intruders per layer at ``eps``, one bar per report side by side in each layer (``reports``: ``{label:
    report}``, e.g. a LoRA fine-tune and a full one of the same base; each report's last checkpoint). A layer one
    report lacks has no bar for it."""
    chosen = {label: select_rows(report, side) for label, report in reports.items()}
    everything = [row for rows in chosen.values() for row in rows]
    positions, labels = _layers(everything)
    figure, ax = new_axes(ax, size=(max(7.2, 0.25 * len(labels) * len(reports) + 3), 4.2))
    width, total = 0.8 / len(reports), 0
    for index, (label, rows) in enumerate(chosen.items()):
        heights = {}
        for r in rows:
            heights[positions[r.layer]] = heights.get(positions[r.layer], 0) + r.intruders(eps)
        total += sum(heights.values())
        offset = (index - (len(reports) - 1) / 2) * width
        ax.bar([x + offset for x in sorted(heights)], [heights[x] for x in sorted(heights)], width,
               label=printable(label))
    _layer_ticks(ax, labels)
    ax.set_ylabel(f"intruder dimensions (ε = {eps:g}, sum over the layer's matrices)")
    ax.set_title(f"Intruders per layer ({side} singular vectors, {_k_note(everything)})")
    count_axis(ax, total, f"no intruders at ε = {eps:g} among {_top(everything)} {side} singular vectors\n"
                          f"in any layer of any report")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return figure


def plot_spectra(report, name: str, side: str = "left", eps: float | None = None, *,
                 checkpoint: int | None = None, ax=None):
    """One matrix's top-k fine-tuned singular values by rank, the base's top singular values beside them when the
    row has them, and the intruders at ``eps`` (default: the report's smallest ε) marked with their max |cos|."""
    row = find_row(report, name, side, checkpoint)
    eps = report.threshold(eps)
    ranks = list(range(1, len(row.singular_values) + 1))
    figure, ax = new_axes(ax)
    ax.plot(ranks, row.singular_values, marker="o", markersize=4, label="fine-tuned σ_j")
    if row.base_singular_values:
        base = row.base_singular_values
        ax.plot(range(1, len(base) + 1), base, marker="s", markersize=3, linestyle="--", label="base σ_i")
    marked = [j for j, value in enumerate(row.max_cos) if value < eps]
    if marked:
        ax.scatter([j + 1 for j in marked], [row.singular_values[j] for j in marked], s=120, facecolors="none",
                   edgecolors="red", linewidths=1.5, zorder=3, label=f"intruder (max |cos| < {eps:g}, value shown)")
    for j in marked:
        ax.annotate(f"{row.max_cos[j]:.2f}", (j + 1, row.singular_values[j]), textcoords="offset points",
                    xytext=(8, 4), fontsize="small", color="red")
    ax.margins(y=0.12)
    ax.set_xlabel("rank j (by descending singular value)")
    ax.set_ylabel("singular value")
    found = plural(len(marked), "intruder", "intruders")
    ax.set_title(f"{printable(row.name)}\n{checkpoint_label(report, row.checkpoint)}, {side} side, "
                 f"{row.shape[0]}×{row.shape[1]}, {found} at ε = {eps:g}", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return figure
