"""The report's JSON Schema (``lorafft/report.schema.json``): every report lorafft writes validates against it
(checked with jsonschema's own Draft 2020-12 validator, independently of lorafft's reader), the schema names every
field a row has, and a report that breaks it is refused by ``report`` and ``plot`` in one line naming the file and
the JSON path of the first problem. Also names Python cannot encode (lone surrogates from non-UTF-8 file and tensor
names): printed, drawn and written escaped, never an encoding error."""

import dataclasses
import importlib.resources
import json
import os
import subprocess
import sys

import jsonschema
import pytest
import torch

import lorafft
from lorafft import cli, synthetic
from lorafft.report import MatrixRow, check_schema
from lorafft.tracking import Tracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = (0.5, 0.9)


@pytest.fixture(scope="module")
def schema():
    schema = json.loads(importlib.resources.files("lorafft").joinpath("report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)  # the schema is itself valid
    return schema


def rank_deficient_report(tmp_path, eps=EPS):
    """A scan of a base whose 32×32 matrix has rank 4, fine-tuned: a row with ``base_rank`` 4 and ``outside``."""
    generator = torch.Generator().manual_seed(8)
    W0 = torch.zeros(32, 32)
    W0[:4, :4] = 5 * torch.randn(4, 4, generator=generator)
    base = synthetic.write_checkpoint({"w.weight": W0}, tmp_path / "deficient-base")
    tuned = synthetic.write_checkpoint({"w.weight": W0 + 0.3 * torch.randn(32, 32, generator=generator)},
                                       tmp_path / "deficient-tuned")
    return lorafft.scan(base, tuned, k=10, eps=eps)


def _tracked():
    """A tracked run of a plain model over three steps (rows with ``cos_previous``)."""
    generator = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(synthetic.random_weight(40, 48, generator=generator))
        tracker = Tracker(layer, k=6, eps=EPS)
        for step in (1, 2, 3):
            layer.weight.add_(0.4 * torch.randn(40, 1, generator=generator) @ torch.randn(1, 48, generator=generator))
            tracker.step(step)
    return tracker.report()


@pytest.fixture(scope="module")
def written(trio, tmp_path_factory):
    """Every kind of report lorafft writes, as the JSON it writes."""
    tmp_path = tmp_path_factory.mktemp("reports")
    layer_0 = [r"layers\.0\.self_attn"]
    reports = {
        "one checkpoint": lorafft.scan(trio.base, trio.lora, eps=EPS, include=layer_0),
        "several checkpoints, both sides, delta ranks": lorafft.scan(
            trio.base, [trio.full, trio.lora], eps=EPS, include=layer_0, side="both", delta_ranks=True),
        "rank-deficient base": rank_deficient_report(tmp_path),
        "tracked run": _tracked(),
    }
    return {name: json.loads(report.to_json()) for name, report in reports.items()}


def test_every_report_lorafft_writes_validates(schema, written):
    assert any(row["outside"] is not None for row in written["rank-deficient base"]["matrices"])
    assert any(row["delta_effective_rank"] is not None
               for row in written["several checkpoints, both sides, delta ranks"]["matrices"])
    assert sum(row["cos_previous"] is not None for row in written["tracked run"]["matrices"]) == 2
    for name, data in written.items():
        jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)  # jsonschema's own verdict
        check_schema(data, name)  # and lorafft's reader's


def test_the_schema_names_every_field_of_a_row(schema):
    """A field added to MatrixRow must be added to the schema (rows refuse unknown properties)."""
    row = schema["$defs"]["row"]
    assert set(row["properties"]) == {f.name for f in dataclasses.fields(MatrixRow)}
    assert row["additionalProperties"] is False and set(row["required"]) <= set(row["properties"])


def _break(data, case):
    data = json.loads(json.dumps(data))
    if case == "inputs: []":
        data["inputs"] = []
    elif case == "string max_cos":
        data["matrices"][0]["max_cos"][2] = "0.3"
    elif case == "shape [64]":
        data["matrices"][1]["shape"] = [64]
    elif case == "eps: []":
        data["options"]["eps"] = []
    elif case == "NaN max_cos":
        data["matrices"][0]["max_cos"][1] = float("nan")
    elif case == "Infinity random floor":
        data["matrices"][0]["random_floor"] = float("inf")
    elif case == "unknown row field":
        data["matrices"][0]["colour"] = "red"
    return data


MALFORMED = {  # case: the JSON path and words the one error line names
    "inputs: []": "$.inputs: [] is not of type 'object'",
    "string max_cos": "$.matrices[0].max_cos[2]: '0.3' is not of type 'number'",
    "shape [64]": "$.matrices[1].shape: [64] is too short",
    "eps: []": "$.options.eps: [] should be non-empty",
    "NaN max_cos": "$.matrices[0].max_cos[1]: nan is not a finite number",
    "Infinity random floor": "$.matrices[0].random_floor: inf is not a finite number",
    "unknown row field": "$.matrices[0]: Additional properties are not allowed ('colour' was unexpected)",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_report_is_one_line_naming_the_json_path(written, tmp_path, capsys, case):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_break(written["one checkpoint"], case)))  # NaN and Infinity as Python writes them
    for argv, output in ((["report", path, "--html", tmp_path / "r.html"], tmp_path / "r.html"),
                         (["plot", path, "--out", tmp_path / "figures"], tmp_path / "figures")):
        capsys.readouterr()
        assert cli.main([str(a) for a in argv]) == 2, argv
        (line,) = capsys.readouterr().err.splitlines()
        assert line == f"lorafft: error: {path}: not a lorafft report of schema 1: {MALFORMED[case]}"
        assert not output.exists()


def test_a_csv_table_is_not_taken_for_a_report(written, tmp_path, capsys):
    path = tmp_path / "r.csv"
    lorafft.Report.from_dict(written["one checkpoint"]).save(path)
    assert cli.main(["plot", str(path), "--out", str(tmp_path / "figures")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"lorafft: error: {path}: is a CSV table, not a report: figures and pages are drawn from the "
                    "JSON report ('lorafft scan ... --out FILE.json')")


def test_names_python_cannot_encode_are_printed_drawn_and_written_escaped(tmp_path, capsys):
    """A pickled tensor name and an output file name that are not UTF-8 (Python holds them as lone surrogates,
    ``\\udcff``): the scan's summary and its 'full report:' line under a strict UTF-8 stdout, the HTML page and the
    figures all show the name escaped; nothing raises."""
    generator = torch.Generator().manual_seed(0)
    W = synthetic.random_weight(48, 48, generator=generator)
    name = "layers.0.q\udcff.weight"
    torch.save({name: W}, tmp_path / "base.bin")
    torch.save({name: W + 0.5 * torch.randn(48, 1, generator=generator) @ torch.randn(1, 48, generator=generator)},
               tmp_path / "tuned.bin")
    out = os.fsencode(tmp_path) + b"/r\xff.json"
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get(
        "PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "lorafft", "scan", str(tmp_path / "base.bin"),
                           str(tmp_path / "tuned.bin"), "--out", out, "--quiet"], capture_output=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    stdout = done.stdout.decode("utf-8")  # strict: every byte printed is UTF-8
    assert "layers.0.q\\udcff.weight" in stdout and "full report: " in stdout and "r\\udcff.json" in stdout
    report = lorafft.Report.load(os.fsdecode(out))
    assert report.rows[0].name == name and "q\\udcff" in report.summary()
    assert cli.main(["report", os.fsdecode(out), "--html", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "layers.0.q\\udcff.weight" in page and page.count("data:image/png;base64,") >= 4
    assert cli.main(["plot", os.fsdecode(out), "--out", str(tmp_path / "figures"), "--heatmaps", "0"]) == 0
    assert "spectrum-layers.0.q_.weight.png" in os.listdir(tmp_path / "figures")
