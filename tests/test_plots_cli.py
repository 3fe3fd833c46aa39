"""``lorafft plot`` pictures read from the checkpoints (similarity heatmaps, a training run's intruder trajectory) and
the ``Report.plot_*`` methods, checked for content against the lorafft.plots functions they wrap."""

import dataclasses
import json
import os
from html.parser import HTMLParser

import numpy
import pytest
import torch

import lorafft
from lorafft import cli, synthetic
from lorafft.plots import figures
from lorafft.plots.heatmaps import plot_similarity, similarity
from lorafft.plots.html import write_html
from lorafft.plots.trajectory import intruder_trajectory, plot_trajectory

image = pytest.importorskip("matplotlib.image")

EPS = (0.5, 0.6, 0.7, 0.8, 0.9)
LAYER_0 = ["layers\\.0\\."]  # 7 matrices: keeps the scans short
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def reports(trio):
    return {kind: lorafft.scan(trio.base, getattr(trio, kind), k=10, eps=EPS, include=LAYER_0, progress=False)
            for kind in ("full", "lora")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run: W0 + t·ΔW for a rank-2 LoRA update of top σ 1.5·σ1(W0), t = 0.3, 0.6, 1.0 (checkpoints on
    disk), and its trajectory scan."""
    directory = tmp_path_factory.mktemp("run")
    generator = torch.Generator().manual_seed(1)
    W0 = synthetic.random_weight(256, 256, generator=generator)
    A, B = synthetic.lora_update(256, 256, 2, generator=generator, lora_alpha=4, sigma=1.5 * synthetic.SIGMA1)
    base = synthetic.write_checkpoint({Q_PROJ: W0}, directory / "base")
    steps = [synthetic.write_checkpoint({Q_PROJ: W0 + t * 2 * (B @ A)}, directory / f"step-{i}")
             for i, t in enumerate((0.3, 0.6, 1.0))]
    return lorafft.scan(base, steps, k=10, eps=EPS, progress=False)


def red_pixels(path) -> int:
    """Pixels of the intruder outline's pure red (viridis, the text and the axes have none)."""
    pixels = image.imread(path)[..., :3]
    return int(((pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)).sum())


def plot(argv, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    status = cli.main(["plot", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out.split(), captured.err


def test_plot_writes_the_worst_matrices_heatmaps(reports, tmp_path, capsys):
    paths = {}
    for kind, report in reports.items():
        paths[kind] = tmp_path / f"{kind}.json"
        report.to_json(paths[kind])
    status, written, err = plot([paths["lora"], "--out", tmp_path / "lora", "--spectra", "0", "--heatmaps", "2"],
                                capsys)
    assert status == 0 and not err
    worst = figures.worst_rows(reports["lora"], 0.5, 2, "left")
    heatmaps = [str(tmp_path / "lora" / f"similarity-{row.name}.png") for row in worst]
    drawn = ("counts_vs_eps.png", "counts_vs_k.png", "layer_bars.png", "magnitude_direction.png")
    assert written == [str(tmp_path / "lora" / name) for name in drawn] + heatmaps
    for path in heatmaps:
        assert image.imread(path).shape[:2] == (560, 640)  # 6.4 × 5.6 in at the default 100 dpi
        assert red_pixels(path) > 500  # the one intruder's column is outlined

    # the full fine-tune: the worst matrix drawn all the same, no outline; n = 30 on request
    status, written, _ = plot([paths["full"], "--out", tmp_path / "full", "--spectra", "0", "--heatmap-size", "30",
                               "--dpi", "50"], capsys)
    (row,) = figures.worst_rows(reports["full"], 0.5, 1, "left")
    assert status == 0 and written[-1] == str(tmp_path / "full" / f"similarity-{row.name}.png")
    assert image.imread(written[-1]).shape[:2] == (280, 320) and red_pixels(written[-1]) == 0


def test_plot_without_the_checkpoints_says_so_and_draws_the_rest(reports, tmp_path, capsys):
    report = reports["lora"]
    gone = dataclasses.replace(report, inputs={**report.inputs, "base": str(tmp_path / "moved")})
    gone.to_json(tmp_path / "gone.json")
    status, written, err = plot([tmp_path / "gone.json", "--out", tmp_path / "figures", "--spectra", "1"], capsys)
    assert status == 0 and len(written) == 5 and not any("similarity" in path for path in written)
    assert str(tmp_path / "figures" / "magnitude_direction.png") in written
    (line,) = err.splitlines()
    assert line == ("lorafft: note: gone: no similarity heatmap or trajectory: checkpoint(s) not found: "
                    f"{tmp_path / 'moved'}")
    with pytest.raises(SystemExit):  # a bad count is a usage error
        cli.main(["plot", str(tmp_path / "gone.json"), "--out", str(tmp_path), "--heatmap-size", "0"])


def test_plot_of_a_training_run_writes_the_trajectory(run, tmp_path, capsys):
    run.to_json(tmp_path / "run.json")
    status, written, err = plot([tmp_path / "run.json", "--out", tmp_path / "figures", "--spectra", "0"], capsys)
    assert status == 0 and not err
    assert written[-2:] == [str(tmp_path / "figures" / f"{kind}-{Q_PROJ}.png") for kind in ("similarity", "trajectory")]
    assert image.imread(written[-1]).shape[:2] == (440, 1000)
    status, written, _ = plot([tmp_path / "run.json", "--out", tmp_path / "none", "--heatmaps", "0", "--no-trajectory"],
                              capsys)
    assert status == 0 and not any("similarity" in p or "trajectory" in p for p in written)


@pytest.fixture(scope="module")
def tracked(run):
    """The same run tracked in memory: a plain model holding W0 (the tracker's snapshot), its weight then set to
    each checkpoint's W0 + t·ΔW in turn (a Tracker's report: steps that were never written)."""
    from lorafft.io import open_checkpoint
    from lorafft.tracking import Tracker

    layer = torch.nn.Linear(256, 256, bias=False)
    with open_checkpoint(run.inputs["base"]) as base, torch.no_grad():
        layer.weight.copy_(base.get(Q_PROJ))
        tracker = Tracker(layer, k=10, eps=EPS)
        for step, checkpoint in enumerate(run.checkpoints):
            with open_checkpoint(checkpoint) as tuned:
                layer.weight.copy_(tuned.get(Q_PROJ))
            tracker.step(10 * (step + 1))
    return tracker.report()


def test_a_tracked_run_gets_its_trajectory_from_the_report(run, tracked, tmp_path, capsys):
    """A tracked run's intruders followed back through the cosines its rows keep: the same ranks, singular values
    and alignments as searching each checkpoint directly (lorafft.plots.trajectory.intruder_trajectory), wherever
    the direct search finds the intruder among the top k; below them the chain has lost it (alignment < ε). And
    ``lorafft plot`` / ``report --html`` draw it, with no note about checkpoints."""
    from lorafft.plots.trajectory import tracked_trajectory

    chained = tracked_trajectory(tracked, "weight", eps=0.5)
    direct = intruder_trajectory(run.inputs["base"], run.checkpoints, Q_PROJ, eps=0.5, k=10)
    assert chained.labels == ["step 10", "step 20", "step 30"] and chained.chained
    assert chained.intruders.tolist() == direct.intruders.tolist() == [0, 1]
    within = direct.rank < 10  # [C, p]: where the top k hold the intruder's best match
    assert within[1:].all() and not within[0].any()  # t = 0.3: below the top 10; t = 0.6, 1.0: in it
    assert torch.equal(chained.rank[within], direct.rank[within])
    torch.testing.assert_close(chained.sigma[within], direct.sigma[within], rtol=1e-6, atol=0)
    torch.testing.assert_close(chained.alignment[within], direct.alignment[within], rtol=0, atol=1e-3)
    assert (chained.alignment[0] < 0.5).all()

    tracked.to_json(tmp_path / "tracked.json")
    status, written, err = plot([tmp_path / "tracked.json", "--out", tmp_path / "figures", "--spectra", "0"], capsys)
    assert status == 0 and err == ""  # no "checkpoint(s) not found" for steps that never were on disk
    assert written[-1] == str(tmp_path / "figures" / "trajectory-weight.png")
    assert image.imread(written[-1]).shape[:2] == (440, 1000)
    status, _, err = plot([tmp_path / "tracked.json", "--out", tmp_path / "more", "--heatmaps", "2"], capsys)
    assert status == 0 and err == "lorafft: note: tracked: no similarity heatmap: a tracked run keeps no singular " \
                                  "vectors\n"
    assert cli.main(["report", str(tmp_path / "tracked.json"), "--html", str(tmp_path / "tracked.html")]) == 0
    page = (tmp_path / "tracked.html").read_text(encoding="utf-8")
    assert "followed back step by step" in page and "not found" not in page

    older = tracked.to_dict()  # a tracked run's report written before trackers kept the cosines
    for row in older["matrices"]:
        del row["cos_previous"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    status, written, err = plot([tmp_path / "older.json", "--out", tmp_path / "older", "--spectra", "0"], capsys)
    assert status == 0 and not any("trajectory" in path for path in written)
    assert err.startswith("lorafft: note: older: no trajectory: the report has no cosines between tracked steps")

    gap = tracked.to_dict()  # the worst matrix missing at the first step (another there): a note, not a traceback
    for row in gap["matrices"]:
        if row["checkpoint"] == 0:
            row["name"] = row["tuned_name"] = row["module"] = "other"
    (tmp_path / "gap.json").write_text(json.dumps(gap))
    status, written, err = plot([tmp_path / "gap.json", "--out", tmp_path / "gap", "--spectra", "0"], capsys)
    assert status == 0 and err.startswith("lorafft: note: gap: no trajectory:") and "Traceback" not in err

    bent = tracked.to_dict()  # cos_previous that is not k × k: a one-line input error naming the file
    bent["matrices"][-1]["cos_previous"] = bent["matrices"][-1]["cos_previous"][:3]
    (tmp_path / "bent.json").write_text(json.dumps(bent))
    status, _, err = plot([tmp_path / "bent.json", "--out", tmp_path / "bent"], capsys)
    assert status != 0 and "bent.json" in err and "cos_previous" in err and len(err.strip().splitlines()) == 1


def content(figure) -> list:
    """What a figure shows: per axes, its labels, title, lines, bars, scatter points, images and texts."""
    shown = []
    for ax in figure.axes:
        shown.append((ax.get_xlabel(), ax.get_ylabel(), ax.get_title(),
                      [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines],
                      [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches],
                      [c.get_offsets().tolist() for c in ax.collections],
                      [numpy.asarray(i.get_array()).tolist() for i in ax.images],
                      [t.get_text() for t in ax.texts]))
    return shown


def test_report_methods_draw_what_the_plots_functions_draw(trio, reports, tmp_path):
    lora, full = reports["lora"], reports["full"]
    (worst,) = figures.worst_rows(lora, 0.5, 1)
    pairs = [
        (lora.plot_counts_vs_eps(), figures.plot_counts_vs_eps(lora)),
        (lora.plot_counts_vs_eps(label="lora", others={"full": full}, eps_grid=[0.3, 0.5]),
         figures.plot_counts_vs_eps({"lora": lora, "full": full}, eps_grid=[0.3, 0.5])),
        (lora.plot_counts_vs_k(per_module=True), figures.plot_counts_vs_k(lora, eps=0.5, per_module=True)),
        (lora.plot_layer_bars(eps=0.7), figures.plot_layer_bars(lora, eps=0.7)),
        (lora.plot_spectra(worst.name), figures.plot_spectra(lora, worst.name)),
        (lora.plot_similarity(worst.name, n=12),
         plot_similarity(similarity(trio.base, trio.lora, worst.name, n=12, k_intruders=10))),
    ]
    for method, function in pairs:
        assert content(method) == content(function)
    (ax,) = pairs[1][0].axes
    assert [line.get_label() for line in ax.lines][:2] == ["lora", "full"]
    similarity_ax = pairs[-1][0].axes[0]
    assert numpy.asarray(similarity_ax.images[0].get_array()).shape == (12, 12)

    lora.to_html(tmp_path / "lora.html", spectra=1)
    page = (tmp_path / "lora.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 + 1 + 1 + 1  # + ΔD vs ΔM


def test_report_plot_trajectory(run):
    checkpoints = run.checkpoints
    method = run.plot_trajectory(Q_PROJ)
    function = plot_trajectory(intruder_trajectory(run.inputs["base"], checkpoints, Q_PROJ, eps=0.5, k=10))
    assert content(method) == content(function)
    rank_ax = method.axes[0]
    assert [line.get_ydata()[-1] for line in rank_ax.lines if line.get_label().startswith("y_")] == [0, 1]
    (ax,) = run.plot_counts_vs_eps().axes
    assert len([line for line in ax.lines if not line.get_label().startswith("random floor")]) == 3


class _Cells(HTMLParser):
    """Every table row of a page as a list of cell texts."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None


def test_html_shows_booleans_and_missing_values_as_words(reports, tmp_path):
    scanned = reports["lora"]  # one option of each kind, whatever scan records:
    report = dataclasses.replace(scanned, options={**scanned.options, "base_cache": None, "embeddings": False,
                                                   "strict": True})
    path = tmp_path / "page.html"
    write_html(report, path, figures=False)
    parser = _Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    options = {row[0][len("option "):]: row[1] for row in parser.rows if row and row[0].startswith("option ")}
    assert set(options) == set(report.options)
    for key, value in report.options.items():
        if isinstance(value, bool):
            assert options[key] == ("yes" if value else "no"), key
        elif value is None or value == []:
            assert options[key] == "—", key
        elif isinstance(value, list):
            assert options[key].split(", ") == [str(v) for v in value], key
    assert options["strict"] == "yes" and options["embeddings"] == "no" and options["base_cache"] == "—"
    assert not {"True", "False", "None", "[]"} & {cell.strip() for row in parser.rows for cell in row}


@pytest.mark.parametrize("broken", ["short max_cos", "no matrices", "checkpoint out of range"])
def test_a_report_that_does_not_hold_together_is_refused(reports, tmp_path, capsys, broken):
    """plot and report read a report whose lists, rows or indices do not fit: one line, exit 2, nothing written."""
    data = reports["lora"].to_dict()
    if broken == "short max_cos":
        data["matrices"][0]["max_cos"] = data["matrices"][0]["max_cos"][:3]
    elif broken == "no matrices":
        data["matrices"] = []
    else:
        data["matrices"][0]["checkpoint"] = 5
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    status, _, err = plot([path, "--out", tmp_path / "figs"], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and str(path) in err and not (tmp_path / "figs").exists()
    assert cli.main(["report", str(path), "--html", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


def test_a_failing_plot_keeps_every_figure_that_was_there(reports, tmp_path, capsys, monkeypatch):
    """A plot that fails part-way (here: the disk fills while the third figure is written) leaves every figure of an
    earlier run byte for byte, the one it was replacing included, no temporary file, and the figures it finished;
    into a new directory, a failure at the first figure leaves no directory."""
    from matplotlib.figure import Figure

    path = tmp_path / "r.json"
    reports["lora"].save(path)
    figures_dir = tmp_path / "figs"
    status, before, _ = plot([path, "--out", figures_dir, "--spectra", "1", "--heatmaps", "0"], capsys)
    assert status == 0 and len(before) == 5
    earlier = {name: (figures_dir / name).read_bytes() for name in os.listdir(figures_dir)}
    (figures_dir / "notes.txt").write_text("mine")
    save, calls = Figure.savefig, []

    def fail_on_the_third(figure, target, **kwargs):
        calls.append(target)
        if len(calls) == 3:
            with open(target, "wb") as handle:
                handle.write(b"\x89PNG half")  # a partial figure, then the disk is full
            raise OSError(28, "No space left on device")
        return save(figure, target, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fail_on_the_third)
    assert cli.main(["plot", str(path), "--out", str(figures_dir), "--spectra", "1", "--heatmaps", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "no space left on device" in captured.err  # one line, exit 2
    finished = captured.out.split()
    assert finished == [str(figures_dir / name) for name in ("counts_vs_eps.png", "counts_vs_k.png")]
    assert sorted(os.listdir(figures_dir)) == sorted([*earlier, "notes.txt"])  # no temporary, nothing removed
    for name, content in earlier.items():
        assert (figures_dir / name).read_bytes() == content, name  # layer_bars.png too: never half-written
    calls.clear()
    monkeypatch.setattr(Figure, "savefig", lambda figure, target, **kwargs: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        cli.main(["plot", str(path), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
