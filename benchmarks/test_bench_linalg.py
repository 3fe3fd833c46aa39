"""pytest-benchmark suites for the CPU path (run apart from the tests: ``pytest benchmarks/``).

Each primitive on one synthetic pair per shape, so regressions show as ratios within one run.
The reference-algorithm comparison with the README's table is ``benchmarks/compare_reference.py``.
"""

import pytest
import torch

import lorafft
from lorafft import linalg, synthetic

SHAPES = [(1024, 1024), (1024, 2752), (2752, 1024)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def pair(request):
    generator = torch.Generator().manual_seed(0)
    W0 = synthetic.random_weight(*request.param, generator=generator)
    A, B = synthetic.lora_update(*request.param, 1, generator=generator, lora_alpha=2.0,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    return W0.unsqueeze(0), (W0 + 2.0 * B @ A).unsqueeze(0)


def test_base_basis(benchmark, pair):
    W0, _ = pair
    basis = benchmark(linalg.base_basis, W0)
    assert basis.sigma.shape[-1] == min(W0.shape[-2:])


def test_truncated_svd(benchmark, pair):
    _, Wt = pair
    result = benchmark(linalg.truncated_svd, Wt, 10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.error_bound).all()


def test_analyze(benchmark, pair):
    W0, Wt = pair
    result = benchmark(lorafft.analyze, W0, Wt, k=10)
    assert result["left"].counts.sum() >= 1


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W^T"])
@pytest.mark.parametrize("columns", [11, 16])
def test_thin_fp32_product(benchmark, columns, transposed):
    """One 4096² fp32 weight times a thin block as torch multiplies it, unpadded: why ``linalg.thin_matmul`` pads
    fp32 blocks to 16 columns (compare the 11- and 16-column timings of one orientation)."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(1, 4096, 4096, generator=generator)
    W = W.mT if transposed else W
    X = torch.randn(1, 4096, columns, generator=generator)
    product = benchmark(torch.matmul, W, X)
    torch.testing.assert_close(product, linalg.thin_matmul(W, X), rtol=1e-4, atol=1e-3)
