"""Similarity heatmaps of one matrix read from the checkpoints (Shuttleworth et al. 2410.21228, Figures 1–3).

For a base matrix W0 and its fine-tuned Wt = W0 + ΔW, :func:`similarity` computes ``|<x_i, y_j>|`` between the top-n
base singular vectors x_i and the top-n tuned singular vectors y_j of one side, and which y_j are intruders by the
paper's definition: ``max_i |<y_j, x_i>| < ε`` over **all** base singular vectors x_i, not only the n shown.
:func:`plot_similarity` draws it as the paper does: tuned vectors along x, base vectors along y, intruder columns
outlined. A LoRA intruder is a column without a bright cell; a full fine-tune shows a bright diagonal.

The matrix is paired and merged exactly as :func:`lorafft.scan` does (tolerant names, PEFT adapters merged,
``fan_in_fan_out`` transposed). matplotlib is imported only when a figure is drawn (``pip install matplotlib``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy
import torch

from lorafft import analysis, io, linalg, loading, pairing
from lorafft.errors import InputError
from lorafft.errors import printable
from lorafft.plots.figures import new_axes

CELL_TEXT_MAX = 12  # heatmaps up to this size print each |cos| in its cell


def load_weights(base, tuned: list, name: str, *,
                 split_fused: bool = False) -> tuple[str, torch.Tensor, list[torch.Tensor]]:
    """``(base name, W0, [Wt, ...])``: the matrix ``name`` of the base and of each tuned input, as :func:`lorafft.scan`
    pairs and merges it.

    ``base``: a checkpoint (directory, file, shard index or ``{name: tensor}``); ``tuned``: a list of checkpoints or
    PEFT adapter directories. ``name`` is resolved tolerantly of prefixes against the base's tensor names. W0 and each
    Wt are fp32 ``[out, in]`` (the analysed orientation). Raises InputError when a tuned input has no such matrix of
    the base's shape (or none: an adapter that does not adapt it).
    """
    with contextlib.ExitStack() as stack:
        base_checkpoint = stack.enter_context(loading.open_base(base, split_fused=split_fused))
        base_name = pairing.NameIndex(base_checkpoint.names()).resolve(name)
        if base_name is None:
            raise InputError(base_checkpoint.path, f"no tensor named '{name}'")
        scope = pairing.Scope(include=(f"^{re.escape(base_name)}$",), embeddings=True)
        sources, pairs = [], []
        for source in tuned:
            opened = loading.open_tuned(source, split_fused=split_fused)
            stack.enter_context(opened.tensors if isinstance(opened, io.Adapter) else opened)
            sources.append(opened)
            pairs.append({base_name: pairing.find_pairs(base_checkpoint, opened, scope, strict=True)[0][0]})
        loader = loading.BatchLoader(base_checkpoint, sources, pairs, factored=False)
        ((_, loaded),) = loader.batches([[pairs[0][base_name]]])
    return base_name, loaded.W0[0], [Wt[0] for Wt in loaded.tuned]


@dataclass
class Similarity:
    """|cos| between the top-n singular vectors of one base matrix W0 and its fine-tuned Wt, on one side.

    cosines: ``[n, n]`` fp64, ``cosines[i, j] = |<x_i, y_j>|`` — row i the base vector x_i, column j the tuned
        vector y_j, both by descending singular value (0-based), as the paper draws it (tuned along x).
    max_cos: ``[n]`` fp64, ``max_i |<y_j, x_i>|`` over **all** base singular vectors of the side (over the defined
        ones of a rank-deficient base, as in a scan's rows).
    intruders: ``[n]`` bool, ``max_cos < eps`` for ``j < k_intruders`` (the paper's k), False beyond; the
        undetermined vectors of a rank-deficient base are not intruders (:func:`lorafft.analysis.analyze`).
    tuned_sigma: ``[n]`` fp64, the σ_j of Wt; base_sigma: ``[n]`` fp64, the σ_i of W0.
    """

    name: str
    side: str
    eps: float
    k_intruders: int
    cosines: torch.Tensor
    max_cos: torch.Tensor
    intruders: torch.Tensor
    tuned_sigma: torch.Tensor
    base_sigma: torch.Tensor


def similarity(base, tuned, name: str, *, n: int = 10, side: str = "left", eps: float = 0.5,
               k_intruders: int | None = None, split_fused: bool = False) -> Similarity:
    """The similarity of the top ``n`` tuned and base singular vectors of matrix ``name``, and its intruders.

    ``base``: a checkpoint; ``tuned``: a checkpoint or a PEFT adapter directory (see :func:`load_weights`).
    ``side``: "left" (output space, the paper's choice) or "right". Intruders are tested among the top
    ``k_intruders`` tuned vectors (default: all n). ``n`` is capped at min(out, in). ``split_fused``: as in
    :func:`lorafft.scan` (for reports scanned with it).
    """
    if side not in linalg.SIDES:
        raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    base_name, W0, (Wt,) = load_weights(base, [tuned], name, split_fused=split_fused)
    basis = linalg.base_basis(W0.unsqueeze(0))
    result = analysis.analyze(W0, Wt, k=min(n, *W0.shape), eps=(eps,), sides=(side,), basis=basis,
                              generator=analysis.matrix_generators(0, [base_name]))[side]  # as a scan finds them
    every_base = basis.project(result.vectors, side)  # [1, s, n]: each y_j against every x_i
    n = result.vectors.shape[-1]
    k_intruders = n if k_intruders is None else min(k_intruders, n)
    return Similarity(
        name=base_name,
        side=side,
        eps=float(eps),
        k_intruders=k_intruders,
        cosines=every_base[0, :n].abs(),
        max_cos=result.max_cos[0],
        intruders=result.intruders[0, :, 0] & (torch.arange(n) < k_intruders),
        tuned_sigma=result.singular_values[0],
        base_sigma=basis.sigma[0, :n],
    )


def plot_similarity(similarity: Similarity, ax=None):
    """Heatmap of ``similarity.cosines`` (colour scale fixed to 0–1), tuned vector j along x, base vector i along y,
    each intruder's column outlined in red (the title says "outlined" only when there is one). Cells carry their
    value up to 12×12; beyond, ticks are thinned. Returns the Figure (a new one when ``ax`` is None)."""
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    figure, ax = new_axes(ax, size=(6.4, 5.6))
    cosines = similarity.cosines.numpy()
    rows, columns = cosines.shape
    image = ax.imshow(cosines, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="|cos(x_i, y_j)|")
    if max(rows, columns) <= CELL_TEXT_MAX:
        for (i, j), value in numpy.ndenumerate(cosines):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                    color="black" if value > 0.6 else "white")
    intruders = similarity.intruders.nonzero().flatten().tolist()
    for j in intruders:
        ax.add_patch(Rectangle((j - 0.5, -0.5), 1, rows, fill=False, edgecolor="red", clip_on=False,
                               linewidth=2 if columns <= 50 else 1))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=min(max(rows, columns), 10), integer=True))
    ax.set_xlabel("tuned singular vector j (by σ)")
    ax.set_ylabel("base singular vector i (by σ)")
    rule = f"max_i |cos| < ε = {similarity.eps:g} over all x_i, top {similarity.k_intruders}"
    if not intruders:
        found = f"no intruders ({rule})"
    else:
        which = (f"{len(intruders)} intruders" if len(intruders) > 5 else
                 f"intruder{'s' if len(intruders) > 1 else ''} j = {', '.join(map(str, intruders))}")
        found = f"{which} ({rule}), outlined"
    ax.set_title(f"{printable(similarity.name)} ({similarity.side})\n{found}", fontsize="small")
    return figure
