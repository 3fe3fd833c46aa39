"""DoRA's weight decomposition analysis as a picture (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", Sec. 3.2, Figure 2): per module type, each matrix's mean change of direction ΔD against its mean
change of magnitude ΔM, one point per layer and checkpoint, and the least-squares slope with its confidence interval.

DoRA draws one module type (query) with one point per layer and intermediate checkpoint, and reads the sign of the
relation across those points. Module types differ in scale, so a fit across them would mostly measure that: here
each module type has its own panel and its own fit, over all of its points (every layer of every checkpoint).
What the figure and :func:`caption` state is what the report measured (slopes, intervals, how many points); the
reading of a sign is left to the reader.

ΔM and ΔD come from the rows (``delta_magnitude``, ``delta_direction``: :func:`lorafft.analysis.magnitude_direction`);
the two sides' rows of a matrix carry the same values, so each matrix and checkpoint is one point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from lorafft.plots.figures import checkpoint_label, module_label, new_axes

MAX_PANELS = 12  # module types drawn at most (a mixture of experts has one per expert): the best-covered ones
CHECKPOINT_COLOURS = 10  # up to this many checkpoints take matplotlib's categorical colours C0..C9


@dataclass
class SlopeFit:
    """The least-squares line ``ΔM ≈ intercept + slope · ΔD`` through ``points`` points, and the ``confidence``
    interval of the slope from Student's t with ``points - 2`` degrees of freedom (None for two points)."""

    slope: float
    intercept: float
    points: int
    interval: tuple[float, float] | None
    confidence: float

    def describe(self) -> str:
        """``"slope +4.42 (95% CI +3.9 to +4.9), n = 8"``."""
        if self.interval is None:
            spread = " (no interval from 2 points)"
        else:
            spread = (f" ({100 * self.confidence:g}% CI {self.interval[0]:+.3g} to {self.interval[1]:+.3g})")
        return f"slope {self.slope:+.3g}{spread}, n = {self.points}"


def fit_slope(x, y, confidence: float = 0.95) -> SlopeFit | None:
    """Ordinary least squares of ``y`` on ``x`` (1-D, fp64) with the slope's two-sided ``confidence`` interval
    ``b ± t · sqrt(Σ r_i² / (n − 2) / Σ (x_i − x̄)²)``; None when fewer than two points or all x are equal (no
    line through them)."""
    from scipy import stats

    x, y = numpy.asarray(x, dtype=numpy.float64), numpy.asarray(y, dtype=numpy.float64)
    n = len(x)
    if n < 2 or numpy.ptp(x) == 0:
        return None
    centred = x - x.mean()
    spread = float((centred**2).sum())
    slope = float((centred * (y - y.mean())).sum() / spread)
    intercept = float(y.mean() - slope * x.mean())
    interval = None
    if n > 2:
        residuals = y - intercept - slope * x
        error = math.sqrt(float((residuals**2).sum()) / (n - 2) / spread)
        t = float(stats.t.ppf(0.5 + confidence / 2, n - 2))
        interval = (slope - t * error, slope + t * error)
    return SlopeFit(slope, intercept, n, interval, confidence)


def magnitude_direction_points(report, modules=None) -> dict[str, list]:
    """``{module type: rows}``: per module type (all, or those named in ``modules``), one row per matrix and
    checkpoint that has ΔM and ΔD. ValueError when no row has them (a report written before they were measured)."""
    points: dict[str, dict] = {}
    for row in report.rows:
        if row.delta_magnitude is not None and row.delta_direction is not None:
            if modules is None or row.module in modules:
                points.setdefault(row.module, {}).setdefault((row.name, row.checkpoint), row)
    if not points:
        raise ValueError("the report has no delta_magnitude / delta_direction" + (
            f" for the modules {', '.join(modules)}" if modules is not None else
            " (written before lorafft measured them, or no matrix has a direction): scan again"))
    return {module: list(rows.values()) for module, rows in sorted(points.items())}


def magnitude_direction_fits(report, modules=None, confidence: float = 0.95) -> dict[str, SlopeFit | None]:
    """Per module type, :func:`fit_slope` of ΔM on ΔD over its points (every layer and checkpoint)."""
    return {module: fit_slope([r.delta_direction for r in rows], [r.delta_magnitude for r in rows], confidence)
            for module, rows in magnitude_direction_points(report, modules).items()}


def caption(report, modules=None, confidence: float = 0.95) -> str:
    """What the figure measured, in words: the axes, what a point is, and each module type's fitted slope."""
    fits = magnitude_direction_fits(report, modules, confidence)
    slopes = "; ".join(f"{module_label(module)}: {fit.describe() if fit else 'no line (fewer than two distinct ΔD)'}"
                       for module, fit in fits.items())
    count = len(report.checkpoints)
    return (f"Change of magnitude ΔM (mean over output rows of | ‖w_t,i‖ − ‖w_0,i‖ |) against change of direction "
            f"ΔD (mean of 1 − cos(w_t,i, w_0,i)), per module type: one point per layer and checkpoint "
            f"({count} checkpoint{'s' if count != 1 else ''}), least-squares slope over a panel's points "
            f"(DoRA, Liu et al. 2024, Fig. 2, reads its sign). Measured: {slopes}.")


def plot_magnitude_direction(report, *, modules=None, confidence: float = 0.95, ax=None):
    """ΔD (x) against ΔM (y), one panel per module type (at most :data:`MAX_PANELS`, those with most points; pick
    them with ``modules``), one point per layer and checkpoint coloured by checkpoint (discrete colours, one legend
    for the figure), and the least-squares line of the panel's points, its slope and ``confidence`` interval in the
    panel's title. ``ax``: an Axes to draw into when one module type is drawn. Returns the Figure."""
    from matplotlib.ticker import MaxNLocator

    points = magnitude_direction_points(report, modules)
    chosen = sorted(sorted(points, key=lambda module: -len(points[module]))[:MAX_PANELS])
    if ax is not None and len(chosen) > 1:
        raise ValueError(f"ax holds one panel, and {len(chosen)} module types would be drawn: pass modules=[...]")
    columns = min(3, len(chosen))
    rows_of_panels = math.ceil(len(chosen) / columns)
    figure, first = new_axes(ax, size=(3.8 * columns + 2.2, 3.1 * rows_of_panels + 1.2))
    panels = [first] if ax is not None else _panels(figure, rows_of_panels, columns, len(chosen))
    colours = _checkpoint_colours(len(report.checkpoints))
    drawn = [row for module in chosen for row in points[module]]
    x_unit = _unit([r.delta_direction for r in drawn])
    y_unit = _unit([r.delta_magnitude for r in drawn])
    for panel, module in zip(panels, chosen):
        rows = points[module]
        for checkpoint in sorted({r.checkpoint for r in rows}):
            mine = [r for r in rows if r.checkpoint == checkpoint]
            panel.scatter([r.delta_direction / x_unit for r in mine], [r.delta_magnitude / y_unit for r in mine],
                          s=22, zorder=3, color=colours[checkpoint], label=checkpoint_label(report, checkpoint))
        fit = fit_slope([r.delta_direction for r in rows], [r.delta_magnitude for r in rows], confidence)
        if fit is not None:
            ends = numpy.array([min(r.delta_direction for r in rows), max(r.delta_direction for r in rows)])
            panel.plot(ends / x_unit, (fit.intercept + fit.slope * ends) / y_unit, linestyle="--", color="black",
                       linewidth=1)
        said = fit.describe() if fit else "no line: fewer than two distinct ΔD"
        panel.set_title(f"{module_label(module)}\n{said}", fontsize="small")
        panel.ticklabel_format(axis="both", useOffset=False)
        panel.xaxis.set_major_locator(MaxNLocator(nbins=4))
        panel.grid(alpha=0.3)
    _legend(figure, report, colours)
    left_out = len(points) - len(chosen)
    figure.suptitle("ΔM against ΔD per module type\na point per layer and checkpoint; dashed: least-squares line"
                    + (f"\n({len(chosen)} of {len(points)} module types, those with most points; modules= picks)"
                       if left_out else ""), fontsize="medium")
    figure.supxlabel(f"ΔD: mean over output rows of 1 − cos(w_t,i, w_0,i){_in(x_unit)}", fontsize="small")
    figure.supylabel(f"ΔM: mean over output rows of | ‖w_t,i‖ − ‖w_0,i‖ |{_in(y_unit)}", fontsize="small")
    return figure


def _unit(values: list[float]) -> float:
    """A power of ten to divide an axis' values by, so that its tick labels stay short (1 where they already are:
    largest magnitude in [0.01, 10000))."""
    largest = max((abs(v) for v in values), default=0.0)
    if largest == 0 or 1e-2 <= largest < 1e4:
        return 1.0
    return 10.0 ** math.floor(math.log10(largest))


def _in(unit: float) -> str:
    """The axis label's note of the unit its values are drawn in: ``" (in units of 1e-03)"``, or nothing."""
    return "" if unit == 1.0 else f" (in units of {unit:.0e})"


def _panels(figure, rows: int, columns: int, count: int) -> list:
    """``count`` Axes on a ``rows`` × ``columns`` grid of ``figure`` (its first single Axes replaced)."""
    figure.clear()
    grid = figure.subplots(rows, columns, squeeze=False)
    for extra in grid.flat[count:]:
        extra.remove()
    return list(grid.flat[:count])


def _checkpoint_colours(count: int) -> list:
    """One discrete colour per checkpoint: matplotlib's categorical C0..C9 for up to ten, else ``count`` steps of
    viridis in training order (dark early, yellow late)."""
    if count <= CHECKPOINT_COLOURS:
        return [f"C{index}" for index in range(count)]
    from matplotlib import colormaps

    steps = colormaps["viridis"].resampled(count)
    return [steps(index) for index in range(count)]


def _legend(figure, report, colours) -> None:
    """One legend for the figure, right of the panels: a marker per checkpoint (at most ten, evenly spread)."""
    from matplotlib.lines import Line2D

    count = len(colours)
    shown = sorted({round(i * (count - 1) / 9) for i in range(10)}) if count > CHECKPOINT_COLOURS else range(count)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[c]) for c in shown]
    title = "checkpoint" if count <= CHECKPOINT_COLOURS else f"checkpoint ({count}; every one coloured)"
    figure.legend(handles, [checkpoint_label(report, c) for c in shown], loc="outside right center",
                  fontsize="small", title=title)
