"""Package layout: ``lorafft/`` and every package under it, found by ``find_packages`` (no hand list to drift);
``kernels/`` (the Triton kernels) installs as ``lorafft.kernels``, never as a top-level ``kernels``: Hugging Face's
``kernels`` distribution owns that name, and transformers imports it.

``kernels/`` has no ``__init__.py``, so that Python started at the repository root (``python -m pytest``) sees it at
most as a namespace portion, which an installed regular package always beats; ``lorafft.kernels`` is a namespace
subpackage in the wheel too. The committed link ``lorafft/kernels -> ../kernels`` gives the checkout the wheel's layout:
setuptools' editable finder cannot resolve a namespace subpackage mapped by ``package_dir`` (pypa/setuptools#4943).
Metadata lives in pyproject.toml; tests/test_packaging.py builds and checks the wheel and the import names."""

from setuptools import find_packages, setup

KERNELS = "lorafft.kernels"

setup(
    packages=find_packages(include=["lorafft", "lorafft.*"], exclude=[KERNELS, KERNELS + ".*"]) + [KERNELS],
    package_dir={KERNELS: "kernels"},
)
