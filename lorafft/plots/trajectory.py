"""Intruder dimensions along a training run (Shuttleworth et al. 2410.21228, Figure 5): where the intruders of the
final checkpoint sat in the spectrum of the earlier ones.

:func:`intruder_trajectory` reads one matrix from a base checkpoint and from checkpoints of one run (each a full
checkpoint or a PEFT adapter, paired and merged as :func:`lorafft.scan` does), takes the intruders of the **last**
checkpoint (its top-k tuned singular vectors y_j with ``max_i |<y_j, x_i>| < ε`` over all base singular vectors
x_i), and follows each back: in every checkpoint, the tuned singular vector most aligned with it among the top K,
its rank and its singular value. :func:`plot_trajectory` draws rank and singular value per checkpoint, one line per
intruder: in LoRA training an intruder climbs the spectrum as its singular value grows.

A report of a trajectory scan (``lorafft scan BASE CKPT_1 CKPT_2 ...``) cannot stand in for the checkpoints: it keeps
max |cos| per vector, not the vectors, so it cannot tell which vector of an earlier checkpoint an intruder was. A
tracked run's report (:class:`lorafft.tracking.Tracker`, whose steps were never saved) keeps what that needs instead:
each step's ``cos_previous``, the cosines between consecutive steps' top-k vectors, which :func:`tracked_trajectory`
follows back from the last step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorafft import analysis, linalg
from lorafft.errors import printable
from lorafft.plots.figures import find_row, new_axes
from lorafft.plots.heatmaps import load_weights

SEARCH_FACTOR = 4  # default K = SEARCH_FACTOR · k tuned vectors searched per checkpoint


@dataclass
class Trajectory:
    """The intruders of a run's last checkpoint, followed through every checkpoint (C checkpoints, p intruders).

    labels: ``[C]`` checkpoint names (directory or file names; the index for in-memory state dicts).
    intruders: ``[p]`` int64, the rank j (0-based, by descending σ) of each intruder y_j in the last checkpoint.
    max_cos: ``[p]`` fp64, its ``max_i |<y_j, x_i>|`` over all base singular vectors (< eps).
    rank: ``[C, p]`` int64, rank of the tuned singular vector of checkpoint c most aligned with intruder p
        (searched among the top ``search``); sigma: ``[C, p]`` fp64, its singular value σ; alignment: ``[C, p]``
        fp64, the |cos| between the two (1 at the last checkpoint; low values mean no vector of that checkpoint
        among the top ``search`` resembles the intruder yet).
    base_sigma1: the base matrix's largest singular value.
    chained: True when followed step to step through a tracker's cosines (:func:`tracked_trajectory`), False when
        each checkpoint was searched directly.
    """

    name: str
    side: str
    eps: float
    k: int
    search: int
    labels: list[str]
    intruders: torch.Tensor
    max_cos: torch.Tensor
    rank: torch.Tensor
    sigma: torch.Tensor
    alignment: torch.Tensor
    base_sigma1: float
    chained: bool = False


def is_tracked(report) -> bool:
    """Whether ``report`` is a tracked training run's (:meth:`lorafft.tracking.Tracker.report`): its checkpoints
    are training steps that were never written to disk."""
    return bool(report.options.get("tracking"))


def tracked_trajectory(report, name: str, *, side: str = "left", eps: float = 0.5) -> Trajectory:
    """:class:`Trajectory` of matrix ``name`` in a tracked run's report, from its rows alone.

    The intruders are those of the last step (``max(max_cos, outside) < eps`` among its top k). Each is followed
    back through ``cos_previous`` (``C_c [k, k]``, the cosines between step c − 1's top-k vectors and step c's): its
    coefficients on step c's vectors ``a_c`` (``a_last = e_j``) give ``a_{c−1} = C_c a_c``; the best match at a step
    is the vector of largest |coefficient|, and that |coefficient| its ``alignment``. Only the top k are known at
    each step, so what of the intruder lies outside them is lost on the way back (alignment falls): an intruder that
    climbed from below rank k shows no match there. Steps before one without ``cos_previous`` (the first step, or a
    resumed run's restart) are left out. ValueError when the matrix is missing at some step, or when its last step
    has no ``cos_previous`` to follow (nothing to draw).
    """
    rows = [find_row(report, name, side, checkpoint) for checkpoint in range(len(report.checkpoints))]
    first = len(rows) - 1
    while first > 0 and rows[first].cos_previous is not None:
        first -= 1
    if first == len(rows) - 1:
        raise ValueError("the report has no cosines between tracked steps (written before trackers kept them, or "
                         "tracked with warm_start=False)")
    last = rows[-1]
    intruders = [j for j, flag in enumerate(last.is_intruder(eps)) if flag]
    coefficients = torch.eye(last.k, dtype=torch.float64)[:, intruders]  # [k, p]
    ranks, sigmas, alignments = [], [], []
    for position in range(len(rows) - 1, first - 1, -1):
        row = rows[position]
        best, rank = coefficients.abs().max(dim=0) if intruders else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        ranks.append(rank)
        sigmas.append(torch.tensor(row.singular_values, dtype=torch.float64)[rank])
        alignments.append(best)
        if position > first:
            coefficients = torch.tensor(row.cos_previous, dtype=torch.float64) @ coefficients
    return Trajectory(
        name=last.name,
        side=side,
        eps=float(eps),
        k=last.k,
        search=last.k,
        labels=[printable(label) for label in report.checkpoints[first:]],
        intruders=torch.tensor(intruders, dtype=torch.long),
        max_cos=torch.tensor([last.max_cos[j] for j in intruders], dtype=torch.float64),
        rank=torch.stack(ranks[::-1]),
        sigma=torch.stack(sigmas[::-1]),
        alignment=torch.stack(alignments[::-1]),
        base_sigma1=float(last.base_singular_values[0]),
        chained=True,
    )


def _label(source, index: int) -> str:
    return str(index) if isinstance(source, Mapping) else os.path.basename(os.path.normpath(os.fspath(source)))


def intruder_trajectory(base, checkpoints: list, name: str, *, side: str = "left", eps: float = 0.5, k: int = 10,
                        search: int | None = None, split_fused: bool = False) -> Trajectory:
    """Follow the intruders of the last of ``checkpoints`` (at threshold ``eps`` among its top ``k``) through all.

    ``base``: a checkpoint; ``checkpoints``: checkpoints or PEFT adapter directories of one run, in training order;
    ``name``: the matrix (base tensor name, resolved tolerantly of prefixes). ``search`` (K, default 4k, at most
    min(out, in)): how many top tuned singular vectors of each checkpoint are searched for the best match. Each
    checkpoint is analysed against the one base basis in turn (its matrices are held at once, fp32).
    """
    if side not in linalg.SIDES:
        raise ValueError(f"side must be one of {linalg.SIDES}, got {side!r}")
    if not checkpoints:
        raise ValueError("intruder_trajectory needs at least one checkpoint")
    base_name, W0, weights = load_weights(base, list(checkpoints), name, split_fused=split_fused)
    search = min(max(k, SEARCH_FACTOR * k if search is None else search), *W0.shape)
    basis = linalg.base_basis(W0.unsqueeze(0))
    results = [analysis.analyze(W0, tuned, k=search, eps=(eps,), sides=(side,), basis=basis,
                                generator=analysis.matrix_generators(0, [base_name]))[side] for tuned in weights]
    vectors = torch.cat([result.vectors for result in results])  # [C, d, K] fp64
    k = min(k, search)
    intruders = results[-1].intruders[0, :k, 0].nonzero().flatten()  # the last checkpoint's, as the report counts
    alignment, rank = (vectors.mT @ vectors[-1][:, intruders]).abs().max(dim=1)  # over the K vectors: [C, p]
    return Trajectory(
        name=base_name,
        side=side,
        eps=float(eps),
        k=k,
        search=vectors.shape[-1],
        labels=[_label(source, index) for index, source in enumerate(checkpoints)],
        intruders=intruders,
        max_cos=results[-1].max_cos[0, intruders],
        rank=rank,
        sigma=torch.cat([result.singular_values for result in results]).gather(1, rank),
        alignment=alignment,
        base_sigma1=float(basis.sigma[0, 0]),
    )


def plot_trajectory(trajectory: Trajectory, ax=None):
    """Two panels over the checkpoints (x): the rank of each intruder's best match (rank 0 on top) and its singular
    value (the base's σ_1 dashed), one line per intruder of the last checkpoint; hollow markers where the best match
    has |cos| < ε with the intruder (nothing like it yet). ``ax``: two Axes to draw into, or None for a new Figure.
    Returns the Figure."""
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        figure, _ = new_axes(None, size=(10.0, 4.4))
        figure.clear()
        rank_ax, sigma_ax = figure.subplots(1, 2)
    else:
        rank_ax, sigma_ax = ax
        figure = rank_ax.figure
    x = list(range(len(trajectory.labels)))
    for p, j in enumerate(trajectory.intruders.tolist()):
        label = f"y_{j} (max |cos| {trajectory.max_cos[p]:.2f})"
        weak = (trajectory.alignment[:, p] < trajectory.eps).nonzero().flatten().tolist()
        for panel, values in ((rank_ax, trajectory.rank[:, p]), (sigma_ax, trajectory.sigma[:, p])):
            (line,) = panel.plot(x, values.tolist(), marker="o", label=label)
            panel.scatter(weak, values[weak].tolist(), facecolors="white", edgecolors=line.get_color(), zorder=3)
    sigma_ax.axhline(trajectory.base_sigma1, linestyle="--", color="grey", label="base σ_1")
    if bool((trajectory.alignment < trajectory.eps).any()):
        sigma_ax.scatter([], [], facecolors="white", edgecolors="grey", label="best match |cos| < ε")
    if not len(trajectory.intruders):
        for panel in (rank_ax, sigma_ax):
            panel.text(0.5, 0.6, f"no intruders at ε = {trajectory.eps:g} among the top {trajectory.k}\n"
                                 f"of the last checkpoint: nothing to follow", transform=panel.transAxes,
                       ha="center", va="center", bbox={"boxstyle": "round", "facecolor": "white",
                                                       "edgecolor": "grey"})
    lowest = int(trajectory.rank.max()) if trajectory.rank.numel() else 0
    rank_ax.set_ylim(max(lowest, 1) + 0.5, -0.5)  # rank 0 on top; whole ranks, also when every rank is 0
    rank_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    rank_ax.set_ylabel("rank of the best match (0 = largest σ)")
    how = (f"followed step to step among the top {trajectory.search}" if trajectory.chained
           else f"best |cos| among the top {trajectory.search}")
    rank_ax.set_title(f"rank ({how})", fontsize="medium")
    sigma_ax.set_ylabel("singular value σ of the best match")
    sigma_ax.set_title("singular value", fontsize="medium")
    for panel in (rank_ax, sigma_ax):
        panel.set_xticks(x, trajectory.labels, rotation=30 if max(map(len, trajectory.labels)) > 8 else 0)
        panel.set_xlabel("checkpoint")
        panel.grid(alpha=0.3)
    sigma_ax.legend(fontsize="small", title="intruder (last checkpoint)")
    figure.suptitle(f"{printable(trajectory.name)} ({trajectory.side}): intruders of the last checkpoint "
                    f"(max_i |cos| < ε = {trajectory.eps:g}, top {trajectory.k}) along the run", fontsize="medium")
    return figure
