"""The loader's data movement: FP8 weights read as stored with their scales (the Triton path), the CUDA copy stream
(its branch not taken on the CPU; on a GPU the scan equals the CPU's), the device batch budget, and
``lorafft cache build --device``."""

import re

import pytest
import torch
from safetensors.torch import load_file

import lorafft
from lorafft import io, loading, pairing
from lorafft.cli import main
from lorafft.options import DEFAULT_MAX_BATCH_BYTES
from lorafft.scan import _recorded_budget

from lorafft_fixtures import checkpoints
from test_fp8_moe import reference_dequantize

pytestmark = pytest.mark.usefixtures("krylov_path")  # the kernels run in the Krylov products

ATTENTION = r"layers\.[01]\.self_attn\.(q|o)_proj"  # four 256 x 256 matrices: one batch, Krylov path (256 > 3 x 20)


def _fp8_full(trio, directory, scheme: str):
    """The trio's full fine-tune with its attention projections stored float8_e4m3fn with ``scheme`` scales."""
    state = {}
    for file in sorted(trio.full.glob("*.safetensors")):
        state.update(load_file(file))
    return checkpoints.write_fp8_checkpoint(state, directory, scheme=scheme,
                                            quantize=lambda name, t: re.search(ATTENTION, name) is not None)


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_get_stored_is_the_float8_weight_and_its_scale(tmp_path, scheme):
    """``get_stored`` returns the stored float8 tensor and its scale laid out as the kernels read it; the weight
    times the scale, formed element by element in fp64, is what ``get`` returns (the dequantised view)."""
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    q, scale = checkpoints.quantize_fp8(weight, scheme)
    suffix = checkpoints.FP8_SCALE_SUFFIX[scheme]
    checkpoint = io.open_checkpoint({"a.weight": q, "a.weight" + suffix: scale})
    stored, layout = checkpoint.get_stored("a.weight")
    assert stored.dtype == torch.float8_e4m3fn and torch.equal(stored.view(torch.uint8), q.view(torch.uint8))
    assert layout.shape == {"tensor": (), "channel": (300,), "block": (3, 2)}[scheme]
    assert torch.equal(checkpoint.get("a.weight"), reference_dequantize(q, scale, scheme))
    assert checkpoint.names() == ["a.weight"]  # the scale stays hidden
    plain, none = io.open_checkpoint({"b.weight": weight}).get_stored("b.weight")
    assert none is None and torch.equal(plain, weight)


def test_mixed_schemes_fall_back_to_fp32():
    """A batch mixing scale layouts is dequantised to fp32 for that batch, equal to the
    dequantising reader; one layout stacks the float8 tensors and their scales."""
    g = torch.Generator().manual_seed(2)
    state = {}
    for name, scheme in (("a", "channel"), ("b", "block"), ("c", "channel")):
        q, scale = checkpoints.quantize_fp8(torch.randn(160, 144, generator=g), scheme)
        state[f"{name}.weight"], state[f"{name}.weight" + checkpoints.FP8_SCALE_SUFFIX[scheme]] = q, scale
    checkpoint = io.open_checkpoint(state)
    pairs = {name: pairing.Pair(f"{name}.weight", f"{name}.weight", (160, 144)) for name in "abc"}
    mixed, scale = loading.native_stack([checkpoint.get_stored(f"{n}.weight") for n in "ab"], [pairs["a"], pairs["b"]])
    assert scale is None and mixed.dtype == torch.float32
    assert torch.equal(mixed, torch.stack([checkpoint.get("a.weight"), checkpoint.get("b.weight")]))
    same, scale = loading.native_stack([checkpoint.get_stored(f"{n}.weight") for n in "ac"], [pairs["a"], pairs["c"]])
    assert same.dtype == torch.float8_e4m3fn and scale.values.shape == (2, 160) and scale.layout == "channel"
    float8 = [checkpoint.get_stored(f"{n}.weight") for n in "ac"]
    assert torch.equal(same.view(torch.uint8), torch.stack([t for t, _ in float8]).view(torch.uint8))
    assert torch.equal(scale.values, torch.stack([s for _, s in float8]))


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_full_finetune_reaches_the_kernel_as_stored(trio, tmp_path, monkeypatch, scheme):
    """With the Triton backend (the interpreter here) an FP8 full fine-tune is analysed as stored: the sketch
    kernel receives float8 weights with their scales, and the report equals the torch backend's, which dequantises
    on the host."""
    pytest.importorskip("triton")
    from lorafft.kernels import sketch as sketch_module

    tuned = _fp8_full(trio, tmp_path / "fp8", scheme)
    seen, original = [], sketch_module.sketch

    def spy(W, X, **kwargs):
        seen.append((W.dtype, None if kwargs.get("scale") is None else tuple(kwargs["scale"].shape)))
        return original(W, X, **kwargs)

    monkeypatch.setattr(sketch_module, "sketch", spy)
    native = lorafft.scan(trio.base, tuned, include=[ATTENTION], eps=(0.5, 0.9), backend="triton")
    reference = lorafft.scan(trio.base, tuned, include=[ATTENTION], eps=(0.5, 0.9), backend="torch")
    layout = {"tensor": (4,), "channel": (4, 256), "block": (4, 2, 2)}[scheme]
    assert seen and set(seen) == {(torch.float8_e4m3fn, layout)}
    assert [r.name for r in native.rows] == [r.name for r in reference.rows] and len(native.rows) == 4
    for mine, theirs in zip(native.rows, reference.rows):
        assert mine.counts == theirs.counts and mine.argmax == theirs.argmax
        assert max(abs(a - b) for a, b in zip(mine.max_cos, theirs.max_cos)) <= 1e-5
        assert mine.singular_values == pytest.approx(theirs.singular_values, rel=1e-6)
        assert mine.delta_magnitude == pytest.approx(theirs.delta_magnitude, rel=1e-6)


def test_cpu_loader_takes_no_cuda_branch(trio, monkeypatch):
    """On the CPU nothing is pinned and no CUDA stream is made: the batches are the tensors as read."""
    def refuse(*args, **kwargs):
        raise AssertionError("CUDA branch taken on the CPU")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    with loading.open_base(trio.base) as base, loading.open_tuned(trio.full) as full:
        pairs, _ = pairing.find_pairs(base, full, pairing.Scope((re.compile(ATTENTION),), (), False))
        loader = loading.BatchLoader(base, [full], [{p.name: p for p in pairs}], native=True, fp8_stored=True)
        batches = pairing.shape_batches(pairs, lambda shape: 2)
        for position, loaded in loader.batches(batches):
            names = [pair.name for pair in batches[position]]
            assert torch.equal(loaded.W0, torch.stack([base.get(name) for name in names]))
            assert torch.equal(loaded.tuned[0], torch.stack([full.get(name) for name in names]))
            assert loaded.scales == [None] and loaded.W0.device.type == "cpu"


@pytest.mark.gpu
def test_cuda_scan_equals_cpu_scan(trio):
    """Through pinned buffers and the copy stream (and the Triton kernels by default), the GPU's rows are the
    CPU's: same counts and argmax, max |cos| within 1e-5."""
    cpu = lorafft.scan(trio.base, [trio.full, trio.lora], eps=(0.5, 0.9), device="cpu")
    gpu = lorafft.scan(trio.base, [trio.full, trio.lora], eps=(0.5, 0.9), device="cuda")
    assert [(r.name, r.checkpoint) for r in gpu.rows] == [(r.name, r.checkpoint) for r in cpu.rows]
    for mine, theirs in zip(gpu.rows, cpu.rows):
        assert mine.counts == theirs.counts and mine.argmax == theirs.argmax
        assert max(abs(a - b) for a, b in zip(mine.max_cos, theirs.max_cos)) <= 1e-5
    assert gpu.options["max_batch_bytes"] != DEFAULT_MAX_BATCH_BYTES  # from the device's free memory


def test_cpu_default_budget_is_recorded(trio):
    """On the CPU the default stays ``DEFAULT_MAX_BATCH_BYTES`` exactly, as the report records."""
    report = lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn\.k_proj"], device="cpu")
    assert report.options["max_batch_bytes"] == DEFAULT_MAX_BATCH_BYTES


def test_resume_reads_the_journals_budget(trio, tmp_path):
    """A resumed GPU scan cuts the batches its journal's scan cut: the recorded ``max_batch_bytes`` is read back
    from the journal header (here one written with a custom budget); no journal, or a damaged one, gives None."""
    journal = tmp_path / "scan.journal"
    report = lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn\.k_proj"], journal=journal,
                          max_batch_bytes=12345678)
    assert report.options["max_batch_bytes"] == 12345678 == _recorded_budget(journal)
    assert _recorded_budget(tmp_path / "missing.journal") is None
    (tmp_path / "bad.journal").write_text('{"lorafft_journal": 1, "options": {"max_batch_bytes": "a lot"}}\n')
    assert _recorded_budget(tmp_path / "bad.journal") is None


def test_cache_build_device(trio, tmp_path, capsys):
    """``--device cpu`` builds the cache the default builds, bit for bit; ``--device cuda`` without CUDA is a
    one-line error and exit 2."""
    include = ["--include", r"layers\.0\.", "--quiet"]
    assert main(["cache", "build", str(trio.base), "--out", str(tmp_path / "default"), *include]) == 0
    assert main(["cache", "build", str(trio.base), "--out", str(tmp_path / "cpu"), "--device", "cpu", *include]) == 0
    files = sorted(p.name for p in (tmp_path / "default").glob("*.safetensors"))
    assert len(files) == 7 and files == sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    for file in files:
        default, cpu = load_file(tmp_path / "default" / file), load_file(tmp_path / "cpu" / file)
        assert all(torch.equal(default[key], cpu[key]) for key in ("basis", "sigma"))
    capsys.readouterr()
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the refusal needs a machine without it")
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "build", str(trio.base), "--out", str(tmp_path / "gpu"), "--device", "cuda"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "CUDA is not available" in error[-1] and not (tmp_path / "gpu").exists()
