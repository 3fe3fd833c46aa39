"""The paper's analyses as pictures (Shuttleworth et al. 2410.21228); matplotlib is an optional extra
(``pip install matplotlib``, or the ``plot`` extra), imported only when a figure is drawn.

From a report alone (:mod:`lorafft.plots.figures`):

* :func:`plot_counts_vs_eps` — intruders versus ε, one curve per report or checkpoint (Figure 4);
* :func:`plot_counts_vs_k` — intruders among the top k versus k / min(m, n) (Figure 15);
* :func:`plot_layer_bars` — intruders per layer, stacked by module;
* :func:`plot_spectra` — one matrix's singular values, fine-tuned and base, intruders marked;
* :func:`plot_checkpoint_totals` — intruders per tuned input and ε (which of many adapters grew intruders);
* :func:`plot_layer_bars_compared` — intruders per layer of several reports side by side (LoRA beside full);
* :func:`plot_magnitude_direction` — ΔD against ΔM per module type, a point per layer and checkpoint, the fitted
  slope with its confidence interval (DoRA's Figure 2; :mod:`lorafft.plots.magnitude_direction`);
* :func:`write_html` — all of them and the report's tables in one offline HTML page, :func:`write_comparison_html`
  several reports on one page (:mod:`lorafft.plots.html`).

From the checkpoints (they need the singular vectors, which a report does not keep):

* :func:`similarity` / :func:`plot_similarity` — |cos| heatmap of one matrix's top singular vectors (Figures 1–3);
* :func:`intruder_trajectory` / :func:`plot_trajectory` — the last checkpoint's intruders along a run (Figure 5);
  for a tracked run, :func:`tracked_trajectory` follows them through the cosines the tracker kept instead.

The ``lorafft plot`` and ``lorafft report`` commands (:mod:`lorafft.cli.plot`) draw the report-only ones, and the
checkpoint ones when the checkpoints are still where the report says.
"""

from lorafft.plots.figures import (plot_checkpoint_totals, plot_counts_vs_eps, plot_counts_vs_k, plot_layer_bars,
                                   plot_layer_bars_compared, plot_spectra)
from lorafft.plots.heatmaps import plot_similarity, similarity
from lorafft.plots.html import write_comparison_html, write_html
from lorafft.plots.magnitude_direction import plot_magnitude_direction
from lorafft.plots.trajectory import intruder_trajectory, plot_trajectory, tracked_trajectory

__all__ = [
    "intruder_trajectory",
    "plot_checkpoint_totals",
    "plot_counts_vs_eps",
    "plot_counts_vs_k",
    "plot_layer_bars",
    "plot_layer_bars_compared",
    "plot_magnitude_direction",
    "plot_similarity",
    "plot_spectra",
    "plot_trajectory",
    "similarity",
    "tracked_trajectory",
    "write_comparison_html",
    "write_html",
]
