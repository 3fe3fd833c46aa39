"""The Triton backend end to end: a scan through the kernels (under the CPU interpreter here, on CUDA with a GPU)
gives the torch backend's report."""

import pytest
import torch

import lorafft
from lorafft import linalg

pytestmark = pytest.mark.usefixtures("krylov_path")  # the kernels run in the Krylov products

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


def _half_state(directory, include: str) -> dict:
    """The matching tensors of a checkpoint directory, rounded to fp16 (a half-precision checkpoint)."""
    from safetensors.torch import load_file
    import re

    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update({name: t.half() for name, t in load_file(file).items() if re.search(include, name)})
    return state


def test_half_weights_reach_the_kernel_as_stored(trio, monkeypatch):
    """With the Triton backend a fp16 checkpoint is analysed as stored (no fp32 copy; the sketch kernel reads fp16
    and accumulates in fp32) and gives the report of the same weights upcast to fp32 through torch."""
    from lorafft.kernels import sketch as sketch_module

    include = r"layers\.0\.(self_attn\.q_proj|mlp\.down_proj)\.weight"
    base, full = _half_state(trio.base, include), _half_state(trio.full, include)
    seen = []
    original = sketch_module.sketch

    def spy(W, X, **kwargs):
        seen.append(W.dtype)
        return original(W, X, **kwargs)

    monkeypatch.setattr(sketch_module, "sketch", spy)
    native = lorafft.scan(base, full, eps=(0.5, 0.9), backend="triton")
    monkeypatch.undo()
    upcast = lorafft.scan(base, full, eps=(0.5, 0.9), backend="torch")
    assert seen and set(seen) == {torch.float16}
    assert len(native.rows) == len(upcast.rows) == 2
    for mine, theirs in zip(native.rows, upcast.rows):
        assert mine.counts == theirs.counts and mine.argmax == theirs.argmax
        assert mine.max_cos == pytest.approx(theirs.max_cos, abs=1e-5)
        assert mine.singular_values == pytest.approx(theirs.singular_values, rel=1e-6)
