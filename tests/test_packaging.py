"""The built wheel holds every module of the source tree (``kernels/`` as ``lorafft.kernels``) and works installed
non-editable, away from the checkout: ``lorafft demo``, ``--version``, ``scan``, ``plot``, ``report --html`` and the
kernels import."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import lorafft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "lorafft", "kernels")


def _buildable() -> str | None:
    """Why a wheel cannot be built here (no pip or setuptools to build offline without isolation), else None."""
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:  # found, not imported: setuptools would patch distutils
            return f"{module} is not installed: cannot build the wheel offline"
    return None


def _source_modules() -> set[str]:
    """Every .py file of the checkout's ``lorafft/`` and ``kernels/``, named as it must appear in the wheel."""
    modules = set()
    for top, prefix in (("lorafft", "lorafft"), ("kernels", "lorafft/kernels")):
        for directory, subdirectories, files in os.walk(os.path.join(ROOT, top)):
            subdirectories[:] = [d for d in subdirectories if d != "__pycache__"
                                 and not os.path.islink(os.path.join(directory, d))]  # a dev symlink lorafft/kernels
            relative = os.path.relpath(directory, os.path.join(ROOT, top))
            modules |= {os.path.normpath(os.path.join(prefix, relative, f)).replace(os.sep, "/")
                        for f in files if f.endswith(".py")}
    return modules


def _copy_checkout(target) -> None:
    """The files a build reads, as a clean checkout has them (no caches, no development symlink, no build/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, target / name, ignore=lambda d, names: set(ignore(d, names)) | {
                n for n in names if os.path.islink(os.path.join(d, n))})
        else:
            shutil.copy(source, target / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    reason = _buildable()
    if reason:
        pytest.skip(reason)
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    _copy_checkout(source)
    subprocess.run(PIP + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=300)
    (built,) = dist.glob("lorafft-*.whl")
    return str(built)


def test_wheel_lists_every_source_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(f"lorafft-{lorafft.__version__}.dist-info/entry_points.txt").decode()
    modules = {name for name in names if name.endswith(".py")}
    expected = _source_modules()
    assert {"lorafft/cli/__init__.py", "lorafft/plots/__init__.py", "lorafft/kernels/sketch.py"} <= expected
    assert modules == expected, (f"missing from the wheel: {sorted(expected - modules)}; "
                                 f"not in the source tree: {sorted(modules - expected)}")
    assert not [name for name in names if name.startswith("kernels/")]  # never a top-level kernels package
    assert "lorafft = lorafft.cli:main" in entry_points


def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run(PIP + ["install", "--no-deps", "--no-index", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target), TRITON_INTERPRET="1")

    def run(*argv, **kwargs):
        return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120, **kwargs)

    code = "import lorafft, lorafft.kernels.sketch as k; print(lorafft.__file__, k.__file__)"
    where = run(sys.executable, "-c", code, check=True).stdout.split()
    assert where == [str(target / "lorafft" / "__init__.py"), str(target / "lorafft" / "kernels" / "sketch.py")]
    version = run(str(target / "bin" / "lorafft"), "--version", check=True)  # the console script
    assert version.stdout.strip() == f"lorafft {lorafft.__version__}"
    demo = run(sys.executable, "-m", "lorafft", "demo", "--quiet")
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.count("intruders") >= 2 and "LoRA grows intruder dimensions" in demo.stdout
    assert os.listdir(work) == []
    # the rest of the README's path, from the wheel: demo checkpoints kept, scanned, drawn, written as a page
    lorafft_command = str(target / "bin" / "lorafft")
    for argv in (["demo", "--dir", "demo", "--quiet"], ["scan", "demo/base", "demo/lora", "--out", "lora.json",
                 "--quiet"], ["plot", "lora.json", "--out", "figures", "--spectra", "1", "--heatmaps", "1"],
                 ["report", "lora.json", "--html", "lora.html"]):
        done = run(lorafft_command, *argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
    assert (work / "lora.html").read_text(encoding="utf-8").count("data:image/png") >= 4
    alone = subprocess.run([lorafft_command, "scan", "lora", "--quiet"], cwd=work / "demo", env=env,
                           capture_output=True, text=True, timeout=120)  # the base the adapter names, from its dir
    assert alone.returncode == 0 and "intruders" in alone.stdout, alone.stderr
    assert any(name.startswith("similarity-") for name in os.listdir(work / "figures"))
