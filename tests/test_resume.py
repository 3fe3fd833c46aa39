"""Never lose work: a scan killed with SIGKILL mid-way resumes from its journal to an uninterrupted run's report."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

import lorafft
from lorafft.cli import main
from lorafft.journal import Journal
from lorafft.synthetic import write_trio

ONE_MATRIX_PER_BATCH = "1e-9"  # GB: every matrix is its own batch, so there is a journal line after each


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A three-layer trio: 21 matrices, one batch each, so a scan can be killed half-way."""
    return write_trio(tmp_path_factory.mktemp("run"), layers=3, seed=5)


def _matrices(path):
    data = json.loads(open(path).read())
    return data["matrices"], data["totals"]


def _lorafft(*arguments) -> subprocess.Popen:
    """``python -m lorafft ...`` in a child process. Every run of this test is a child with the same environment:
    results are bit-identical for one machine and thread count, not across thread counts."""
    return subprocess.Popen([sys.executable, "-m", "lorafft", *map(str, arguments)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_scan_resumes_to_the_uninterrupted_report(run, tmp_path):
    arguments = ["scan", run.base, run.lora, "--eps", "0.5", "0.7", "--side", "both",
                 "--max-batch-bytes", ONE_MATRIX_PER_BATCH, "--quiet"]
    reference = tmp_path / "reference.json"
    assert _lorafft(*arguments, "--out", reference).wait() == 0
    assert not (tmp_path / "reference.json.journal").exists()  # removed once the report is written

    out = tmp_path / "report.json"
    journal = tmp_path / "report.json.journal"
    _kill_midway(arguments, out, journal)
    lines = journal.read_text().count("\n")
    total = 2 * 3 * 7  # sides x layers x projections
    assert 5 <= lines < 1 + total

    resumed = _lorafft(*arguments, "--out", out, "--resume")
    stdout, _ = resumed.communicate()
    assert resumed.returncode == 0 and "intruders" in stdout
    assert not journal.exists()
    assert _matrices(out) == _matrices(reference)


def test_journal_of_other_options_is_refused_and_never_overwritten(run, tmp_path, capsys):
    out = tmp_path / "report.json"
    journal = tmp_path / "report.json.journal"
    other = Journal(journal, {"inputs": {"base": "elsewhere"}, "options": {}}, resume=False)
    other.close(remove=False)
    before = journal.read_text()
    arguments = ["scan", str(run.base), str(run.full), "--out", str(out), "--quiet", "--include", "layers\\.0\\.mlp"]
    assert main(arguments + ["--resume"]) == 2
    assert "other inputs or options" in capsys.readouterr().err
    assert main(arguments) == 2  # a fresh scan does not overwrite someone's journal either
    assert "--resume" in capsys.readouterr().err
    assert journal.read_text() == before and not out.exists()


def _kill_midway(arguments, out, journal) -> None:
    """Run ``lorafft scan`` with ``--out out`` and SIGKILL it once the journal holds 4 rows."""
    process = _lorafft(*arguments, "--out", out)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 5:  # header + 2 matrices x 2 sides
            break
        time.sleep(0.005)
    assert process.poll() is None, "the scan finished before it could be killed: make the fixture bigger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()


def test_resume_after_the_adapter_changed_is_refused(run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(run.lora, adapter)
    arguments = ["scan", run.base, adapter, "--side", "both", "--max-batch-bytes", ONE_MATRIX_PER_BATCH, "--quiet"]
    out, journal = tmp_path / "report.json", tmp_path / "report.json.journal"
    _kill_midway(arguments, out, journal)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(key for key in tensors if "lora_B" in key)[-1]  # a module the killed scan had not reached
    tensors[name] = 2 * tensors[name]
    save_file(tensors, weights)  # the same size: only the content and the time tell
    before = journal.read_text()
    resumed = _lorafft(*arguments, "--out", out, "--resume")
    _, stderr = resumed.communicate()
    assert resumed.returncode == 2
    assert stderr.count("\n") == 1 and str(weights) in stderr and "changed since" in stderr
    assert journal.read_text() == before and not out.exists()


def test_partial_last_line_is_ignored(run, tmp_path):
    journal = tmp_path / "scan.journal"
    include = ["layers\\.0\\.self_attn"]
    first = lorafft.scan(run.base, run.full, include=include, journal=journal)  # no out: the journal is kept
    text = journal.read_text()
    assert text.count("\n") == 2 + len(first.rows) and text.endswith('{"lorafft_journal_end": 4}\n')
    lines = text.splitlines(keepends=True)
    journal.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # a write cut short by the crash
    resumed = lorafft.scan(run.base, run.full, include=include, journal=journal, resume=True)
    assert [r.to_dict() for r in resumed.rows] == [r.to_dict() for r in first.rows]


def test_a_second_crash_after_a_partial_line_still_resumes(run, tmp_path):
    """Resuming cuts off the partial line a crash left before appending, so the journal stays readable through a
    second crash (here: the resumed scan is stopped after one more row)."""
    header = {"inputs": {"base": "b", "tuned": ["t"]}, "options": {}}
    rows = lorafft.scan(run.base, run.full, include=["layers\\.0\\.self_attn"]).rows
    log = Journal(tmp_path / "j", header, resume=False)
    for row in rows[:2]:
        log.append(row)
    log.close(remove=False)
    with open(tmp_path / "j", "ab") as handle:
        handle.write(json.dumps(rows[2].to_dict()).encode()[:40])  # crash one: mid-line
    resumed = Journal(tmp_path / "j", header, resume=True)
    assert len(resumed.rows) == 2
    resumed.append(rows[3])
    resumed.close(remove=False)  # crash two, after one more row
    again = Journal(tmp_path / "j", header, resume=True)
    assert [row.to_dict() for row in again.rows.values()] == [row.to_dict() for row in (rows[0], rows[1], rows[3])]
    again.close(remove=True)


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
                                     b'{"lorafft_journal": 1}\n{"name": ' + b"[" * 5000 + b"\n"])
def test_a_journal_that_is_not_one_is_a_one_line_error(run, tmp_path, capsys, content):
    out, journal = tmp_path / "report.json", tmp_path / "report.json.journal"
    journal.write_bytes(content)
    for extra in (["--resume"], []):
        assert main(["scan", str(run.base), str(run.full), "--out", str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(journal) in err and "Traceback" not in err
    assert journal.read_bytes() == content and not out.exists()
