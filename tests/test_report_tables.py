"""What researchers load: the per-vector table (``Report.vectors``), the per-matrix table with its lists kept
(``to_pandas``) and as CSV, the README's pandas reads run as written, a short ``repr``, and ``analyze``'s counts
named by their ε. Checked against the rows they come from on the synthetic trio (rank-1 LoRA: one intruder per
adapted matrix at ε = 0.5) and a rank-deficient base (where ``outside`` decides)."""

import dataclasses
import json
import math
import pathlib
import re

import pytest
import torch

import lorafft
from lorafft import synthetic
from test_report_schema import rank_deficient_report

pd = pytest.importorskip("pandas")

EPS = (0.5, 0.7, 0.9)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(trio):
    return lorafft.scan(trio.base, [trio.full, trio.lora], eps=EPS, include=[r"layers\.0\.self_attn"], side="both")


def test_vectors_is_one_row_per_matrix_side_checkpoint_and_j(report):
    frame = report.vectors()
    assert len(frame) == sum(r.k for r in report.rows)
    assert list(frame.columns) == ["name", "checkpoint", "tuned", "layer", "module", "side", "j", "sigma",
                                   "base_sigma", "max_cos", "argmax", "error_bound", "near_threshold", "outside",
                                   *(f"intruder@{e:g}" for e in EPS)]
    for row in report.rows:
        mine = frame[(frame["name"] == row.name) & (frame["side"] == row.side) & (frame["checkpoint"] ==
                                                                                  row.checkpoint)]
        assert list(mine["j"]) == list(range(row.k))
        assert list(mine["sigma"]) == row.singular_values and list(mine["max_cos"]) == row.max_cos
        assert list(mine["base_sigma"]) == row.base_singular_values and list(mine["argmax"]) == row.argmax
        assert set(mine["tuned"]) == {report.checkpoints[row.checkpoint]}
        for e in EPS:  # the booleans add up to the report's counts
            assert int(mine[f"intruder@{e:g}"].sum()) == row.counts[f"{e:g}"]
    assert frame["intruder@0.5"].dtype == bool
    lora = frame[(frame["checkpoint"] == 1) & (frame["side"] == "left")]
    assert int(lora["intruder@0.5"].sum()) == 4  # q, k, v, o of layer 0: one intruder each


def test_vectors_of_a_rank_deficient_base_count_what_the_report_counts(tmp_path):
    deficient = rank_deficient_report(tmp_path, EPS)
    (row,) = deficient.rows
    frame = deficient.vectors()
    assert list(frame["outside"]) == row.outside and row.undetermined["0.5"] > 0
    for e in EPS:  # undetermined vectors (max_cos < ε <= outside) are not intruders, as in counts
        assert int(frame[f"intruder@{e:g}"].sum()) == row.counts[f"{e:g}"]
        assert int(((frame["max_cos"] < e) & ~frame[f"intruder@{e:g}"]).sum()) == row.undetermined[f"{e:g}"]


def test_repeated_singular_values_have_nan_bounds_in_the_table(report):
    row = report.rows[0]
    forced = lorafft.Report(report.eps, [dataclasses.replace(row, error_bound=[math.inf] * row.k)], report.inputs,
                            report.options, report.versions)
    assert forced.vectors()["error_bound"].isna().all()


def test_the_per_matrix_table_keeps_lists_as_lists_and_the_csv_spaces_them(report, tmp_path):
    frame = report.to_pandas()
    assert len(frame) == len(report.rows)
    assert frame["max_cos"].tolist() == [r.max_cos for r in report.rows]
    assert frame["argmax"].tolist() == [r.argmax for r in report.rows]
    assert list(frame["intruders@0.5"]) == [r.counts["0.5"] for r in report.rows]
    report.save(tmp_path / "matrices.csv")
    table = pd.read_csv(tmp_path / "matrices.csv")
    assert len(table) == len(report.rows)
    parsed = [[float(v) for v in text.split()] for text in table["max_cos"]]
    assert parsed == [pytest.approx(r.max_cos, rel=1e-5) for r in report.rows]


def _readme_block(after: str) -> str:
    """The first ```python block of the README after the line containing ``after``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readmes_pandas_reads_work_as_written(report, tmp_path, monkeypatch):
    report.save(tmp_path / "report.json")
    report.save(tmp_path / "matrices.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):  # why the README does not offer it: the report is not one table
        pd.read_json("report.json")
    space = {}
    exec(_readme_block("these reads work"), space)
    assert len(space["matrices"]) == len(report.rows)
    assert space["matrices"]["max_cos"].tolist() == [r.max_cos for r in report.rows]
    assert space["vectors"].equals(report.vectors())
    assert len(space["table"]) == len(report.rows)
    assert len(space["intruders"]) == sum(r.counts["0.5"] for r in report.rows)


def test_repr_is_short_and_says_what_the_report_holds(report, trio):
    text = repr(report)
    assert len(text) < 300 and "\n" not in text
    assert text.startswith(f"Report(base={str(trio.base)!r}, tuned=[{str(trio.full)!r}, ... 2 checkpoints], ")
    assert "4 matrices (left+right)" in text and f"totals={report.totals()}" in text
    one = lorafft.Report(report.eps, report.rows[:1], {**report.inputs, "tuned": [str(trio.full)]},
                         report.options, report.versions)
    assert "1 matrix (left)" in repr(one)


def test_analyze_names_its_counts_by_eps():
    generator = torch.Generator().manual_seed(3)
    W0 = torch.stack([synthetic.random_weight(40, 40, generator=generator) for _ in range(3)])
    A, B = synthetic.lora_update(40, 40, 2, generator=generator, lora_alpha=4, sigma=1.5 * synthetic.SIGMA1)
    result = lorafft.analyze(W0, W0 + 2 * B @ A, k=5, eps=(0.3, 0.5))["left"]
    named = result.counts_by_eps
    assert list(named) == ["0.3", "0.5"]
    for index, key in enumerate(named):
        assert torch.equal(named[key], result.counts[:, index]) and named[key].shape == (3,)
        assert named[key].tolist() == (result.max_cos < float(key)).sum(dim=-1).tolist()
    assert json.dumps({key: value.tolist() for key, value in named.items()})
