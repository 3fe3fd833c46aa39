"""The Triton backend end to end: a scan through the kernels (under the CPU interpreter here, on CUDA with a GPU)
gives the torch backend's report."""

import pytest
import torch

import lorafft
from lorafft import linalg

pytest.importorskip("triton")


def test_resolve_backend(monkeypatch):
    assert linalg.resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("LORAFFT_BACKEND", "triton")
    assert linalg.resolve_backend(torch.device("cpu")) == "triton"
    assert linalg.resolve_backend(torch.device("cpu"), "torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        linalg.resolve_backend(torch.device("cpu"), "cuda")


def test_scan_through_the_kernels_equals_torch(trio):
    include = [r"layers\.0\.(self_attn\.q_proj|mlp\.down_proj)"]  # Krylov path (min dim 256 > 3 x block 20)
    torch_report = lorafft.scan(trio.base, trio.lora, include=include, eps=(0.5, 0.9), backend="torch")
    triton_report = lorafft.scan(trio.base, trio.lora, include=include, eps=(0.5, 0.9), backend="triton")
    assert [r.name for r in triton_report.rows] == [r.name for r in torch_report.rows]
    for mine, theirs in zip(triton_report.rows, torch_report.rows):
        assert mine.iterations > 0
        assert mine.counts == theirs.counts and mine.argmax == theirs.argmax
        assert mine.max_cos == pytest.approx(theirs.max_cos, abs=1e-5)
        assert mine.singular_values == pytest.approx(theirs.singular_values, rel=1e-6)
