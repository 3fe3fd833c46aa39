"""Package layout: ``lorafft/`` and every package under it, found by ``find_packages`` (no hand list to drift);
``kernels/`` (the Triton kernels) installs as ``lorafft.kernels``, never as a top-level ``kernels`` (another
distribution owns that name). Metadata lives in pyproject.toml; tests/test_packaging.py builds and checks the wheel."""

from setuptools import find_packages, setup

KERNELS = "lorafft.kernels"

setup(
    # the exclude drops a development symlink lorafft/kernels -> ../kernels where one exists
    packages=find_packages(include=["lorafft", "lorafft.*"], exclude=[KERNELS, KERNELS + ".*"])
    + [KERNELS] + [f"{KERNELS}.{name}" for name in find_packages("kernels")],
    package_dir={KERNELS: "kernels"},
)
