"""Start-up of the ``lorafft`` command: help, version and argument errors answer in well under a second, without
importing torch (the library is imported only when a command runs)."""

import os
import subprocess
import sys
import time

import pytest

import lorafft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP = [["--help"], ["--version"]] + [[*command, "--help"] for command in
                                      (["scan"], ["cache", "build"], ["demo"], ["plot"], ["report"], ["intervene"])]
ERRORS = [["scan", "BASE", "TUNED", "--k", "0"], ["scan", "BASE", "TUNED", "--eps", "nan"],
          ["scan", "BASE", "TUNED", "--include", "("], ["scan", "BASE", "TUNED", "--resume"],
          ["scan", "BASE", "TUNED", "--out", "report.txt"], ["plot", "r.json", "--out", "figures", "--eps", "2"],
          ["intervene", "BASE", "TUNED", "--lambda", "-1", "--out", "new"],
          ["intervene", "BASE", "TUNED", "--lambda", "1", "--out", "new", "--eps", "0"], ["no-such-command"],
          # paths, checked before torch too: a missing report, a CSV table given as one, missing local inputs
          ["plot", "missing.json", "--out", "figures"], ["report", "missing.json", "--html", "r.html"],
          ["report", "r.json", "missing.json", "--html", "r.html"], ["plot", "r.csv", "--out", "figures"],
          ["scan", "./base-dir", "./missing-lora"], ["scan", "missing.safetensors", "b.safetensors"],
          ["intervene", "/no/such/base", "./missing-lora", "--lambda", "0.5", "--out", "new"],
          ["demo", "--dir", "no/such/dir"]]


def _lorafft(argv, cwd) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """Run ``python -X importtime -m lorafft ARGV`` from ``cwd`` with this checkout first on the path; return the
    process, its wall time in seconds and the top-level names of every module it imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorafft", *argv], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    timing = [line for line in process.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timing[1:]}  # [0] is the header
    process.stderr = "\n".join(line for line in process.stderr.splitlines() if not line.startswith("import time:"))
    return process, seconds, imported


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_help_and_version_without_torch_under_a_second(argv, tmp_path):
    process, seconds, imported = _lorafft(argv, tmp_path)
    assert process.returncode == 0, process.stderr
    assert "lorafft" in imported and "argparse" in imported  # the importtime record is read correctly
    assert "torch" not in imported
    if argv == ["--version"]:
        assert process.stdout.strip() == f"lorafft {lorafft.__version__}"
    else:
        assert "usage: lorafft" in process.stdout
    if argv[-1] == "--help" and len(argv) > 1:  # every command's help ends with examples
        assert "examples:" in process.stdout
    # best of three: one slow start on a busy machine is not the command's doing
    best = min([seconds] + [_lorafft(argv, tmp_path)[1] for _ in range(2)])
    assert best < 1.0, f"lorafft {' '.join(argv)} took {best:.2f} s"


@pytest.mark.parametrize("argv", ERRORS, ids=" ".join)
def test_argument_errors_without_torch_one_line_exit_2(argv, tmp_path):
    if "r.json" in argv:
        (tmp_path / "r.json").write_text("{}")  # present: the next report is the missing one
    before = os.listdir(tmp_path)
    process, seconds, imported = _lorafft(argv, tmp_path)
    assert process.returncode == 2 and process.stdout == ""
    (line,) = process.stderr.splitlines()
    assert line.startswith("lorafft: error: ")
    if any(arg.startswith(("missing", "./missing", "/no/")) for arg in argv):
        assert "no such file" in line
    assert "torch" not in imported
    assert os.listdir(tmp_path) == before  # nothing written
    assert seconds < 5.0  # generous: the point is that nothing heavy runs; the help test times start-up tightly


def test_import_lorafft_does_not_import_torch_until_used():
    code = ("import sys, lorafft; before = 'torch' in sys.modules; from lorafft.cli import build_parser; "
            "build_parser().parse_args(['scan', 'a', 'b', '--k', '3']); parsed = 'torch' in sys.modules; "
            "scan = lorafft.scan; import lorafft.scan as module; "
            "print(before, parsed, 'torch' in sys.modules, callable(scan), module is scan, "
            "lorafft.cache.build_base_cache.__module__, lorafft.intervene.intervene.__module__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "False", "True", "True", "True", "lorafft.cache", "lorafft.intervene"]
