"""The built wheel holds every module of the source tree (``kernels/`` as ``lorafft.kernels``) and works installed
non-editable, away from the checkout: ``lorafft demo``, ``--version``, ``scan``, ``plot``, ``report --html`` and the
kernels import. And nothing in the checkout shadows an installed distribution for Python started at its root."""

import importlib.metadata
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
    """The files a build reads, as a clean checkout has them (the ``lorafft/kernels`` link kept as a link; no caches,
    no build/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, target / name, symlinks=True, ignore=ignore)
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
    assert "lorafft/report.schema.json" in names  # read by every report reader (lorafft.report.check_schema)
    assert "lorafft = lorafft.__main__:main" in entry_points


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


def _top_level_folders() -> list[str]:
    """The checkout's top-level folders that Python started at its root could import by name (not ``lorafft``)."""
    return sorted(name for name in os.listdir(ROOT) if name.isidentifier() and name != "lorafft"
                  and os.path.isdir(os.path.join(ROOT, name)))


def _from_root(code: str, **env) -> subprocess.CompletedProcess:
    """``python -c code`` in the checkout's root: its working directory first on ``sys.path``, as ``python -m`` has."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", _top_level_folders())
def test_no_top_level_folder_shadows_an_installed_distribution(name, tmp_path):
    """A regular package named like one of our folders (``kernels``: Hugging Face's, which transformers imports),
    installed into a site directory, is what ``import name`` gets from the root; ``lorafft.kernels.sketch`` still
    imports from the checkout."""
    assert "kernels" in _top_level_folders()
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED = True\n")
    (site / f"{name}-1.0.dist-info").mkdir()
    (site / f"{name}-1.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    code = (f"import {name}, lorafft.kernels.sketch as k; print({name}.__file__); print(k.__file__); "
            f"assert {name}.INSTALLED")
    done = _from_root(code, PYTHONPATH=str(site))
    assert done.returncode == 0, done.stderr
    installed, kernels = done.stdout.split()
    assert installed == str(site / name / "__init__.py")
    assert kernels == os.path.join(ROOT, "lorafft", "kernels", "sketch.py")


def test_transformers_peft_and_our_kernels_import_from_the_root():
    """What failed on a fresh machine: transformers 5 imports Hugging Face's ``kernels``, and the checkout's own
    folder of that name must not be what it finds."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (the stand-in test above covers the name)")
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is None:
        pytest.skip("this transformers has no hub_kernels integration")
    code = ("import transformers.integrations.hub_kernels, kernels; from transformers import Trainer; import peft; "
            "import lorafft.kernels.sketch; print(kernels.__file__)")
    done = _from_root(code)
    assert done.returncode == 0, done.stderr
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert os.path.samefile(done.stdout.strip(), installed), done.stdout
