"""Heatmaps and intruder trajectories read from checkpoints, against fp64 SVDs of matrices built from the files."""

import json

import pytest
import torch
from safetensors import safe_open

from lorafft import synthetic
from lorafft.errors import InputError
from lorafft.plots.heatmaps import plot_similarity, similarity
from lorafft.plots.trajectory import intruder_trajectory, plot_trajectory

patches = pytest.importorskip("matplotlib.patches")

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"  # 688×256
EPS = 0.5


def _base_tensor(directory, name):
    """One tensor of a sharded safetensors checkpoint, read with the safetensors library alone, as fp64."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    with safe_open(directory / index["weight_map"][name], "pt") as shard:
        return shard.get_tensor(name).double()


def _tuned_matrix(trio, kind, name):
    """W0 + (α/r)·B·A from the adapter files, or the full fine-tune's tensor; fp64."""
    if kind == "full":
        return _base_tensor(trio.full, name)
    config = json.loads((trio.lora / "adapter_config.json").read_text())
    module = "base_model.model." + name.removesuffix(".weight")
    with safe_open(trio.lora / "adapter_model.safetensors", "pt") as adapter:
        A, B = (adapter.get_tensor(f"{module}.lora_{part}.weight").double() for part in "AB")
    return _base_tensor(trio.base, name) + config["lora_alpha"] / config["r"] * B @ A


def _reference(W0, Wt, n, side):
    """fp64 LAPACK: |cos| of the top-n base × top-n tuned vectors, max |cos| of each tuned one over ALL base ones,
    and both spectra."""
    U0, S0, V0h = torch.linalg.svd(W0, full_matrices=False)
    Ut, St, Vth = torch.linalg.svd(Wt, full_matrices=False)
    X, Y = (U0, Ut[:, :n]) if side == "left" else (V0h.T, Vth[:n].T)
    every = (X.T @ Y).abs()
    return every[:n], every.max(dim=0).values, St[:n], S0[:n]


@pytest.mark.parametrize(("kind", "name", "side"), [("lora", Q_PROJ, "left"), ("full", Q_PROJ, "left"),
                                                     ("lora", UP_PROJ, "right"), ("lora", UP_PROJ, "left")])
def test_similarity_matches_fp64(trio, kind, name, side):
    result = similarity(trio.base, getattr(trio, kind), name, side=side, eps=EPS)
    W0, Wt = _base_tensor(trio.base, name), _tuned_matrix(trio, kind, name)
    cosines, max_cos, tuned_sigma, base_sigma = _reference(W0, Wt, 10, side)
    assert result.cosines.shape == (10, 10) and result.name == name and result.side == side
    torch.testing.assert_close(result.cosines, cosines, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.max_cos, max_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.tuned_sigma, tuned_sigma, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(result.base_sigma, base_sigma, atol=1e-5, rtol=1e-6)
    assert result.intruders.tolist() == (max_cos < EPS).tolist()
    assert int(result.intruders.sum()) == (1 if kind == "lora" else 0)  # the trio: rank-1 LoRA, one intruder each


def _outlined_columns(ax):
    return sorted(patch.get_x() + patch.get_width() / 2 for patch in ax.patches if isinstance(patch, patches.Rectangle))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_heatmap_outlines_exactly_the_intruders(trio, kind, tmp_path):
    result = similarity(trio.base, getattr(trio, kind), Q_PROJ)
    figure = plot_similarity(result)
    ax = figure.axes[0]
    expected = result.intruders.nonzero().flatten().tolist()
    assert len(expected) == (1 if kind == "lora" else 0)
    assert _outlined_columns(ax) == pytest.approx(expected)
    image = ax.images[0]
    assert image.get_clim() == (0.0, 1.0)
    assert (image.colorbar.vmin, image.colorbar.vmax) == (0.0, 1.0)
    assert ax.get_xlabel() and ax.get_ylabel() and image.colorbar.ax.get_ylabel()
    assert Q_PROJ in ax.get_title() and "ε = 0.5" in ax.get_title()
    assert len(ax.texts) == 100  # every |cos| printed at n = 10
    figure.savefig(tmp_path / f"similarity_{kind}.png", dpi=80)


def test_heatmap_of_200_vectors(trio, tmp_path):
    result = similarity(trio.base, trio.lora, UP_PROJ, n=200, k_intruders=10)
    assert result.cosines.shape == (200, 200) and result.max_cos.shape == (200,)
    assert result.intruders[10:].sum() == 0 and int(result.intruders.sum()) == 1
    figure = plot_similarity(result)
    ax = figure.axes[0]
    assert _outlined_columns(ax) == pytest.approx(result.intruders.nonzero().flatten().tolist())
    assert not ax.texts  # no per-cell text at this size
    assert len(ax.get_xticks()) <= 12 and len(ax.get_yticks()) <= 12
    figure.savefig(tmp_path / "similarity_200.png", dpi=80)


def test_unknown_matrix_is_an_input_error(trio):
    with pytest.raises(InputError, match="no tensor named"):
        similarity(trio.base, trio.lora, "model.layers.9.self_attn.q_proj.weight")


def test_trajectory_intruders_climb_the_spectrum(tmp_path):
    """One run: W0 + t·ΔW for a rank-2 LoRA update ΔW = s·B·A of top σ 1.5·σ1(W0), t = 0.3, 0.6, 1.0."""
    generator = torch.Generator().manual_seed(1)
    W0 = synthetic.random_weight(256, 256, generator=generator)
    A, B = synthetic.lora_update(256, 256, 2, generator=generator, lora_alpha=4, sigma=1.5 * synthetic.SIGMA1)
    base = synthetic.write_checkpoint({Q_PROJ: W0}, tmp_path / "base")
    steps = (0.3, 0.6, 1.0)
    weights = [W0 + t * (4 / 2) * (B @ A) for t in steps]
    run = [synthetic.write_checkpoint({Q_PROJ: W}, tmp_path / f"step-{i}") for i, W in enumerate(weights)]

    trajectory = intruder_trajectory(base, run, Q_PROJ, eps=EPS, k=10)
    assert trajectory.labels == ["step-0", "step-1", "step-2"]
    assert trajectory.intruders.tolist() == [0, 1]  # the two LoRA directions top the last spectrum
    assert (trajectory.max_cos < EPS).all()
    assert trajectory.rank[-1].tolist() == [0, 1]
    torch.testing.assert_close(trajectory.alignment[-1], torch.ones(2, dtype=torch.float64))
    assert (trajectory.rank[0] >= 20).all() and (trajectory.rank[1:] <= 1).all()  # deep in the spectrum at t = 0.3
    assert (trajectory.sigma.diff(dim=0) > 0).all()  # σ grows with t
    for c, W in enumerate(weights):  # σ at the recorded rank, from an fp64 LAPACK SVD of the same matrix
        sigma = torch.linalg.svdvals(W.double())
        torch.testing.assert_close(trajectory.sigma[c], sigma[trajectory.rank[c]], atol=1e-5, rtol=1e-6)

    figure = plot_trajectory(trajectory)
    rank_ax, sigma_ax = figure.axes
    for ax in (rank_ax, sigma_ax):
        intruder_lines = [line for line in ax.get_lines() if line.get_label().startswith("y_")]
        assert len(intruder_lines) == 2 and ax.get_xlabel() and ax.get_ylabel()
        assert all(list(line.get_xdata()) == [0, 1, 2] for line in intruder_lines)
    assert [line.get_ydata()[-1] for line in rank_ax.get_lines()] == [0, 1]
    assert rank_ax.yaxis_inverted()
    figure.savefig(tmp_path / "trajectory.png", dpi=80)
