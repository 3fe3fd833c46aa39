"""Package layout: ``lorafft/`` is the package; ``kernels/`` (the Triton kernels) installs as ``lorafft.kernels``,
never as a top-level ``kernels`` (another distribution owns that name). Metadata lives in pyproject.toml."""

from setuptools import setup

setup(
    packages=["lorafft", "lorafft.io", "lorafft.plots", "lorafft.kernels"],
    package_dir={"lorafft": "lorafft", "lorafft.kernels": "kernels"},
)
