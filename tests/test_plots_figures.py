"""Report-only figures, the HTML page and the ``plot`` / ``report`` commands, checked for content on the synthetic trio
(rank-1 LoRA: exactly one intruder per adapted matrix at ε = 0.5; full fine-tune: none)."""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys

import pytest

import lorafft
from lorafft import cli
from lorafft.errors import InputError
from lorafft.cli import plot as commands
from lorafft.plots import figures
from lorafft.plots.html import write_html

EPS = (0.5, 0.6, 0.7, 0.8, 0.9)


@pytest.fixture(scope="module")
def reports(trio):
    return {"full": lorafft.scan(trio.base, trio.full, k=10, eps=EPS),
            "lora": lorafft.scan(trio.base, trio.lora, k=10, eps=EPS)}


@pytest.fixture(scope="module")
def deep(trio):
    """Layer 0 only, k = 64: the k / min(m, n) curve reaches 0.25 (256-wide) and 1.0 (the 64-row k/v matrices)."""
    return lorafft.scan(trio.base, trio.lora, k=64, eps=(0.5,), include=["layers\\.0\\."])


def curves(ax):
    return [line for line in ax.lines if not line.get_label().startswith("random floor")]


def assert_labelled(figure):
    for ax in figure.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_counts_vs_eps_one_curve_per_report(reports, tmp_path):
    figure = figures.plot_counts_vs_eps(reports)
    (ax,) = figure.axes
    assert_labelled(figure)
    full, lora = curves(ax)
    assert [full.get_label(), lora.get_label()] == ["full", "lora"]
    grid = list(full.get_xdata())
    assert grid == list(figures.DEFAULT_EPS_GRID) and grid[0] == 0.1 and grid[-1] == 0.95
    for label, line in (("full", full), ("lora", lora)):
        totals = reports[label].totals()
        assert [line.get_ydata()[grid.index(e)] for e in EPS] == [totals[str(e)] for e in EPS]
    at_half = grid.index(0.5)
    assert lora.get_ydata()[at_half] == 14 > full.get_ydata()[at_half] == 0  # 14 adapted matrices, one intruder each
    (floor,) = [line for line in ax.lines if line not in (full, lora)]
    assert floor.get_xdata()[0] == statistics.median(r.random_floor for r in reports["lora"].rows)
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["full", "lora"]
    # any ε, not only the scanned ones: counted from max_cos
    line = curves(figures.plot_counts_vs_eps(reports["lora"], eps_grid=[0.3, 0.55]).axes[0])[0]
    assert list(line.get_ydata()) == [sum(c < e for r in reports["lora"].rows for c in r.max_cos) for e in (0.3, 0.55)]
    figure.savefig(tmp_path / "counts_vs_eps.png")


def test_counts_vs_eps_trajectory_one_curve_per_checkpoint(trio, reports):
    trajectory = lorafft.scan(trio.base, [trio.full, trio.lora], k=10, eps=EPS)
    (ax,) = figures.plot_counts_vs_eps(trajectory).axes
    lines = curves(ax)
    assert [line.get_label() for line in lines] == ["[0] full", "[1] lora"]  # the kind is the name: said once
    grid = list(lines[0].get_xdata())
    for line, label in zip(lines, ("full", "lora")):
        assert [line.get_ydata()[grid.index(e)] for e in EPS] == [reports[label].totals()[str(e)] for e in EPS]


def test_counts_vs_k_summed_and_per_module(deep, tmp_path):
    figure = figures.plot_counts_vs_k(deep, eps=0.5)
    (ax,) = figure.axes
    assert_labelled(figure)
    (line,) = ax.lines
    x, y = list(line.get_xdata()), list(line.get_ydata())
    reach = min(r.k / min(r.shape) for r in deep.rows)
    assert reach == 0.25 and x[0] == 0 and x[-1] == reach and y[0] == 0
    assert all(a <= b for a, b in zip(y, y[1:]))
    expected = sum(c < 0.5 for r in deep.rows for c in r.max_cos[: int(reach * min(r.shape))])
    assert y[-1] == expected
    assert "64" in ax.get_xlabel() and "0.25" in ax.get_xlabel()  # says where the report's k ends
    figure.savefig(tmp_path / "counts_vs_k.png")

    (ax,) = figures.plot_counts_vs_k(deep, eps=0.5, per_module=True).axes
    assert len(ax.lines) == len({r.module for r in deep.rows}) == 7
    ends = {line.get_label().split(" ")[0]: (line.get_xdata()[-1], line.get_ydata()[-1]) for line in ax.lines}
    for row in deep.rows:  # one matrix per module in layer 0: each curve runs through that matrix's whole k
        assert ends[row.module] == (pytest.approx(row.k / min(row.shape)), row.counts["0.5"])


def test_layer_bars_heights_are_per_layer_counts(reports, tmp_path):
    report = reports["lora"]
    figure = figures.plot_layer_bars(report, eps=0.5)
    (ax,) = figure.axes
    assert_labelled(figure)
    modules = sorted({r.module for r in report.rows})
    assert [c.get_label() for c in ax.containers] == modules
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    for position, layer in enumerate((0, 1)):
        for container, module in zip(ax.containers, modules):
            (row,) = [r for r in report.rows if r.layer == layer and r.module == module]
            assert container.patches[position].get_height() == row.counts["0.5"] == 1
        top = max(p.get_y() + p.get_height() for c in ax.containers for p in [c.patches[position]])
        assert top == sum(r.counts["0.5"] for r in report.rows if r.layer == layer) == 7
    figure.savefig(tmp_path / "layer_bars.png")


def test_spectra_show_the_rows_values_and_intruders(reports, tmp_path):
    report = reports["lora"]
    (row,) = figures.worst_rows(report, 0.5, 1)
    figure = figures.plot_spectra(report, row.name)
    (ax,) = figure.axes
    assert_labelled(figure)
    tuned, base = ax.lines
    assert list(tuned.get_ydata()) == row.singular_values and list(tuned.get_xdata()) == list(range(1, row.k + 1))
    assert list(base.get_ydata()) == row.base_singular_values
    (marked,) = ax.collections
    intruders = [j + 1 for j, c in enumerate(row.max_cos) if c < 0.5]
    assert [x for x, _ in marked.get_offsets()] == intruders == [1]  # the LoRA direction is the new top one
    figure.savefig(tmp_path / "spectrum.png")

    assert ax.get_title().splitlines()[1].startswith("lora, left side")  # which checkpoint it shows
    full = reports["full"]
    (ax,) = figures.plot_spectra(full, full.rows[0].name).axes
    assert not ax.collections and "0 intruders at" in ax.get_title() and "full, left side" in ax.get_title()
    with pytest.raises(ValueError, match="no left row named"):
        figures.plot_spectra(full, "model.layers.9.nothing.weight")
    with pytest.raises(ValueError, match="no 'right' rows"):
        figures.plot_spectra(full, full.rows[0].name, side="right")


def test_figures_with_nothing_to_count_say_so_on_an_integer_axis_from_zero(reports):
    """The full fine-tune has no intruders at ε = 0.5: each count figure says so in words, its y axis runs from 0
    with integer ticks (not −0.04 .. 0.04); a figure with counts keeps its data limits, from 0."""
    full, lora = reports["full"], reports["lora"]
    drawn = {
        "vs eps": (figures.plot_counts_vs_eps(full, eps_grid=[0.5, 0.9]), "no intruders at any ε from 0.5 to 0.9"),
        "vs k": (figures.plot_counts_vs_k(full, eps=0.5), "no intruders at ε = 0.5 among the top 10"),
        "layers": (figures.plot_layer_bars(full, eps=0.5), "no intruders at ε = 0.5 among the top 10"),
        "compared": (figures.plot_layer_bars_compared({"full": full}, eps=0.5), "no intruders at ε = 0.5"),
    }
    for name, (figure, words) in drawn.items():
        (ax,) = figure.axes
        assert [t.get_text() for t in ax.texts if words in t.get_text()], name
        assert ax.get_ylim() == (0, 1), name
        assert all(float(tick).is_integer() for tick in ax.get_yticks()), name
    (ax,) = figures.plot_layer_bars(lora, eps=0.5).axes
    assert not ax.texts and ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 7
    assert all(float(tick).is_integer() for tick in ax.get_yticks())


def test_layer_bars_compared_side_by_side(reports, tmp_path):
    """One bar per report in each layer, its height that report's intruders in the layer at ε."""
    figure = figures.plot_layer_bars_compared(reports, eps=0.5)
    (ax,) = figure.axes
    assert [c.get_label() for c in ax.containers] == ["full", "lora"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    for container, label in zip(ax.containers, ("full", "lora")):
        heights = [p.get_height() for p in container.patches]
        assert heights == [sum(r.counts["0.5"] for r in reports[label].rows if r.layer == layer) for layer in (0, 1)]
    full_bar, lora_bar = (c.patches[0] for c in ax.containers)
    assert full_bar.get_x() + full_bar.get_width() <= lora_bar.get_x() + 1e-12  # beside, not stacked
    figure.savefig(tmp_path / "compared.png")


def test_html_is_offline_and_complete(reports, tmp_path):
    report = reports["lora"]
    path = tmp_path / "report.html"
    write_html(report, path)
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    # 3 figures for the one side, ΔD vs ΔM, 3 spectra, and the heatmap (the trio's checkpoints are on disk)
    assert text.count("data:image/png;base64,") == 8
    assert "<td>" + "</td><td>".join(str(report.totals()[str(e)]) for e in EPS) + "</td>" in text
    assert all(row.name in text for row in report.rows)
    assert "Skipped" in text and report.inputs["base"] in text

    gone = dataclasses.replace(report, inputs={**report.inputs, "base": str(tmp_path / "moved")})
    write_html(gone, path)
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 7 and "No similarity heatmap" in text
    write_html(report, path, figures=False)
    assert "data:image/png" not in path.read_text(encoding="utf-8")


def parse(argv):
    parser = argparse.ArgumentParser(prog="lorafft")
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_plot_command_writes_every_figure(reports, tmp_path, capsys):
    report_path = tmp_path / "lora.json"
    reports["lora"].to_json(report_path)
    assert commands.run_plot(parse(["plot", str(report_path), "--out", str(tmp_path / "figures")])) == 0
    written = capsys.readouterr().out.split()
    # counts vs ε, vs k, layer bars, ΔD vs ΔM, the spectra of the 3 worst matrices and (checkpoints on disk) the
    # worst one's heatmap
    assert len(written) == 3 + 1 + 3 + 1 and str(tmp_path / "figures" / "magnitude_direction.png") in written
    (worst,) = figures.worst_rows(reports["lora"], 0.5, 1, "left")
    assert written[-1] == str(tmp_path / "figures" / f"similarity-{worst.name}.png")
    for name in written:
        with open(name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    html = ["report", str(report_path), "--html", str(tmp_path / "r.html"), "--no-heatmap"]
    assert commands.run_report(parse(html)) == 0
    assert (tmp_path / "r.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 7


@pytest.mark.parametrize("content, problem", [
    ("{", "not valid JSON"),
    (json.dumps({"schema_version": 99}), "schema"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (None, "no such file"),
])
def test_bad_report_file_is_an_input_error(tmp_path, content, problem):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    args = parse(["report", str(path), "--html", str(tmp_path / "out.html")])
    with pytest.raises(InputError, match=problem) as error:
        commands.run_report(args)
    assert error.value.path == str(path) and "\n" not in str(error.value)
    assert not (tmp_path / "out.html").exists()


def test_cli_exit_status(reports, tmp_path, capsys):
    report_path = tmp_path / "lora.json"
    reports["lora"].to_json(report_path)
    assert cli.main(["plot", str(report_path), "--out", str(tmp_path / "figures"), "--spectra", "0"]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    capsys.readouterr()
    assert cli.main(["report", str(broken), "--html", str(tmp_path / "out.html")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lorafft: error: {broken}: ")


def test_matplotlib_is_not_imported_with_lorafft():
    code = "import sys, lorafft, lorafft.cli, lorafft.plots, lorafft.cli.plot; print('matplotlib' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"



def test_comparison_page_puts_reports_side_by_side(reports, tmp_path, capsys):
    """``lorafft report lora.json full.json --html both.html``: one page, each report's intruders per ε (counted
    from max |cos|, as the report counts them), counts versus ε on one axis and per-layer bars side by side."""
    from test_plots_cli import _Cells

    paths = {}
    for label in ("lora", "full"):
        paths[label] = tmp_path / f"{label}.json"
        reports[label].to_json(paths[label])
    page = tmp_path / "both.html"
    assert cli.main(["report", str(paths["lora"]), str(paths["full"]), "--html", str(page)]) == 0
    assert capsys.readouterr().out == f"wrote {page}\n"
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<title>lorafft: 2 reports compared</title>" in text
    assert text.count("data:image/png;base64,") == 2 and "one curve per report" in text and "side by side" in text

    parser = _Cells()
    parser.feed(text)
    header = next(row for row in parser.rows if row[:2] == ["report", "matrices"])
    assert header[3:] == [f"ε = {e:g}" for e in EPS]
    for label in ("lora", "full"):
        (row,) = [row for row in parser.rows if row[0] == label and len(row) == len(header)]
        assert row[3:] == [str(reports[label].totals()[f"{e:g}"]) for e in EPS]
    assert cli.main(["report", str(paths["lora"]), str(paths["full"]), "--html", str(page), "--side", "right"]) == 2
    assert "has no right singular vectors" in capsys.readouterr().err
