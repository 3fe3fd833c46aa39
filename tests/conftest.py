import pytest
import torch

from lorafft.synthetic import write_trio


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; skip them on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """The synthetic Llama-shaped base / full fine-tune / rank-1 LoRA adapter, written once per test session."""
    return write_trio(tmp_path_factory.mktemp("trio"))
