"""FP8 checkpoints (dequantized in the reader) and mixture-of-experts weights (per expert and stacked)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafft
from lorafft import io, synthetic
from lorafft.errors import InputError
from lorafft.io.safetensors import SafetensorsShard
from lorafft.pairing import Scope, layer_and_module

from lorafft_fixtures import checkpoints

# --------------------------------------------------------------------------------------------------------------
# Helpers


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, block: int = 128) -> torch.Tensor:
    """Element by element: W[i, j] = q[i, j] * s[group of (i, j)], the product formed in fp64 (exact for two fp32
    factors) and rounded once to fp32, which is what an fp32 multiply gives."""
    rows, cols = q.shape
    i = torch.arange(rows)[:, None].expand(rows, cols)
    j = torch.arange(cols)[None, :].expand(rows, cols)
    s = scale.double()
    if scheme == "tensor":
        per_element = s.reshape(-1)[0].expand(rows, cols)
    elif scheme == "channel":
        per_element = s.reshape(-1)[i]
    else:
        per_element = s[i // block, j // block]
    return (q.double() * per_element).float()


def random_fp8(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Random finite float8_e4m3fn values spread over its whole range (sign, exponents, subnormals)."""
    bits = torch.randint(0, 256, (rows, cols), generator=generator, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # 0x7F / 0xFF are NaN in e4m3fn: replace by 1.5
    return bits.view(torch.float8_e4m3fn)


def fp64_counts(W0: torch.Tensor, Wt: torch.Tensor, k: int = 10, eps: float = 0.5):
    """Oracle, as in test_exactness: (intruder count, max |cos|) of the top-k left singular vectors of Wt against
    every left singular vector of W0, both from reduced fp64 SVDs."""
    base = torch.linalg.svd(W0.double(), full_matrices=False).U
    tuned = torch.linalg.svd(Wt.double(), full_matrices=False).U[:, :k]
    max_cos = (base.T @ tuned).abs().amax(dim=0)
    return int((max_cos < eps).sum()), max_cos


def intruder(shape, generator) -> torch.Tensor:
    """A rank-1 LoRA update (α = 2, r = 1) whose singular value 1.5·σ1 makes it a new top direction."""
    a, b = synthetic.lora_update(*shape, 1, generator=generator, lora_alpha=2.0, sigma=1.5 * synthetic.SIGMA1)
    return 2.0 * (b @ a)


SCHEMES = ["tensor", "channel", "block"]
SCALE_NAME = {"tensor": "_scale", "channel": "_scale", "block": "_scale_inv"}

# --------------------------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("scheme, shape, scale_shape", [
    ("tensor", (5, 7), ()),
    ("tensor", (5, 7), (1,)),
    ("channel", (37, 19), (37, 1)),
    ("channel", (37, 19), (37,)),
    ("block", (300, 200), (3, 2)),   # neither side a multiple of 128
    ("block", (256, 385), (2, 4)),   # one partial column of tiles, one element wide
    ("block", (7, 5), (1, 1)),       # smaller than one tile
])
def test_dequantize_equals_independent_computation(scheme, shape, scale_shape):
    g = torch.Generator().manual_seed(hash((scheme, shape)) % 2**31)
    q = random_fp8(*shape, g)
    scale = torch.rand(scale_shape, generator=g) * 4 + 1e-3
    got = io.dequantize(q, scale, scheme)
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, reference_dequantize(q, scale, scheme))
    assert q.dtype == torch.float8_e4m3fn  # inputs untouched
    w = torch.randn(shape, generator=g)  # a float weight is copied, never scaled in place
    before = w.clone()
    io.dequantize(w, scale, scheme)
    assert torch.equal(w, before)


@pytest.mark.parametrize("scheme, scale_shape", [("tensor", (2,)), ("channel", (36, 1)), ("channel", (1, 37)),
                                                 ("block", (1, 1)), ("block", (3, 2, 1))])
def test_dequantize_rejects_scale_of_wrong_shape(scheme, scale_shape):
    with pytest.raises(ValueError, match="scale"):
        io.dequantize(torch.zeros(37, 130, dtype=torch.float8_e4m3fn), torch.ones(scale_shape), scheme)


# --------------------------------------------------------------------------------------------------------------
# FP8 checkpoints through the reader


def small_model(generator) -> dict[str, torch.Tensor]:
    """Three matrices whose sides are not multiples of 128, an embedding (kept unquantized) and a norm."""
    return {
        "model.embed_tokens.weight": synthetic.random_weight(50, 136, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": synthetic.random_weight(136, 136, generator=generator),
        "model.layers.0.mlp.up_proj.weight": synthetic.random_weight(200, 136, generator=generator),
        "model.layers.0.mlp.down_proj.weight": synthetic.random_weight(136, 200, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.ones(136),
    }


def raw_dequantized(directory) -> dict[str, torch.Tensor]:
    """Every stored tensor of an FP8 checkpoint directory, FP8 ones dequantized by ``reference_dequantize``."""
    raw = {}
    for file in sorted(directory.glob("*.safetensors")):
        raw.update(load_file(file))
    out = {}
    for name, tensor in raw.items():
        if name.endswith(("_scale", "_scale_inv")):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            suffix = "_scale" if name + "_scale" in raw else "_scale_inv"
            scale = raw[name + suffix]
            scheme = "block" if suffix == "_scale_inv" else ("tensor" if scale.numel() == 1 else "channel")
            tensor = reference_dequantize(tensor, scale, scheme)
        out[name] = tensor
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp8_checkpoint_reads_dequantized_and_hides_scales(tmp_path, scheme):
    model = small_model(torch.Generator().manual_seed(1))
    directory = checkpoints.write_fp8_checkpoint(model, tmp_path / "fp8", scheme=scheme, max_shard_bytes=40_000)
    assert (directory / "model.safetensors.index.json").is_file()  # sharded: a scale may sit in another shard
    expected = raw_dequantized(directory)
    with io.open_checkpoint(directory) as ckpt:
        assert ckpt.names() == sorted(model)
        scales = [name + SCALE_NAME[scheme] for name in model if "layers.0" in name and name.endswith("proj.weight")]
        assert len(scales) == 3 and set(ckpt.stored_names()) == set(model) | set(scales)
        for name, original in model.items():
            got = ckpt.get(name)
            assert ckpt.shape(name) == tuple(got.shape) == tuple(original.shape)
            assert ckpt.dtype(name) == got.dtype == torch.float32
            assert torch.equal(got, expected[name]), name
            if "proj" in name:  # quantized: close to the original, not equal
                error = (got - original).abs().max() / original.abs().max()
                assert 0 < error < 0.07, (name, float(error))
        weight = "model.layers.0.mlp.up_proj.weight"
        assert ckpt.file_of(weight) == str(directory / load_index(directory)[weight])
        assert ckpt.get(weight + SCALE_NAME[scheme]).dtype == torch.float32  # stored names stay readable
        assert ckpt.is_view(weight) and not ckpt.is_view("model.embed_tokens.weight")


def load_index(directory) -> dict[str, str]:
    import json

    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scan_of_fp8_base_equals_scan_of_its_dequantized_fp32(tmp_path, scheme):
    g = torch.Generator().manual_seed(2)
    model = small_model(g)
    directory = checkpoints.write_fp8_checkpoint(model, tmp_path / "fp8", scheme=scheme)
    dequantized = raw_dequantized(directory)
    tuned = {}
    for name, W in dequantized.items():
        if W.ndim == 2:
            W = W + synthetic.full_finetune_update(W, generator=g)
            if name.endswith("up_proj.weight"):
                W = W + intruder(W.shape, g)
        tuned[name] = W
    fp8_report = lorafft.scan(directory, tuned, eps=(0.5, 0.9))
    fp32_report = lorafft.scan(dequantized, tuned, eps=(0.5, 0.9))
    assert [r.name for r in fp8_report.rows] == [r.name for r in fp32_report.rows] == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight"]
    for a, b in zip(fp8_report.rows, fp32_report.rows):
        assert a.counts == b.counts and a.max_cos == b.max_cos and a.singular_values == b.singular_values
    assert fp8_report.totals() == fp32_report.totals()
    assert fp8_report.totals()["0.5"] == 1  # the rank-1 update on up_proj, nothing else
    up = next(r for r in fp8_report.rows if "up_proj" in r.name)
    count, max_cos = fp64_counts(dequantized[up.name], tuned[up.name])
    assert up.counts["0.5"] == count == 1
    assert max(abs(a - b) for a, b in zip(up.max_cos, max_cos.tolist())) < 1e-4


@pytest.mark.parametrize("suffix, scale_shape", [("_scale", (7,)), ("_scale", (136, 2)), ("_scale_inv", (136, 1)),
                                                 ("_scale_inv", (1, 1)), ("_scale_inv", (2, 1))])
def test_scale_of_wrong_shape_is_one_line_input_error(tmp_path, suffix, scale_shape):
    path = tmp_path / "model.safetensors"
    save_file({"layer.weight": torch.zeros(136, 200, dtype=torch.float8_e4m3fn),
               "layer.weight" + suffix: torch.ones(scale_shape)}, str(path))
    for call in (lambda: io.open_checkpoint(tmp_path).names(),
                 lambda: lorafft.scan(tmp_path, {"layer.weight": torch.zeros(136, 200)})):
        with pytest.raises(InputError) as excinfo:
            call()
        message = str(excinfo.value)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        assert f"'layer.weight{suffix}'" in message and "'layer.weight'" in message, message
        assert str(list(scale_shape)) in message, message


def test_integer_scale_and_two_scales_are_input_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    weight = torch.zeros(4, 6, dtype=torch.float8_e4m3fn)
    save_file({"w.weight": weight, "w.weight_scale": torch.ones(4, 1, dtype=torch.int32)}, str(path))
    with pytest.raises(InputError, match="dtype torch.int32"):
        io.open_checkpoint(path).names()
    save_file({"w.weight": weight, "w.weight_scale": torch.ones(1), "w.weight_scale_inv": torch.ones(1, 1)}, str(path))
    with pytest.raises(InputError, match="ambiguous"):
        io.open_checkpoint(path).names()


def test_nan_or_inf_check_applies_to_dequantized_values(tmp_path):
    path = tmp_path / "model.safetensors"
    weight = torch.full((3, 4), 448.0).to(torch.float8_e4m3fn)  # finite as stored
    save_file({"big.weight": weight.clone(), "big.weight_scale": torch.tensor([1e37]),
               "nan.weight": weight.clone(), "nan.weight_scale": torch.tensor([[1.0], [float("nan")], [1.0]]),
               "fine.weight": weight, "fine.weight_scale": torch.tensor(2.0)}, str(path))
    ckpt = io.open_checkpoint(path)
    assert torch.equal(ckpt.get("fine.weight"), torch.full((3, 4), 896.0))
    for name in ("big.weight", "nan.weight"):
        with pytest.raises(InputError, match=f"{path}: tensor '{name}' contains NaN or Inf"):
            ckpt.get(name)


def test_fp8_without_scale_and_scale_of_non_fp8_weight_are_left_as_stored():
    fp8 = torch.ones(3, 4).to(torch.float8_e4m3fn)
    ckpt = io.open_checkpoint({"a.weight": fp8, "b.weight": torch.ones(3, 4), "b.weight_scale": torch.ones(3, 1)})
    assert ckpt.names() == ["a.weight", "b.weight", "b.weight_scale"]
    assert ckpt.dtype("a.weight") == ckpt.get("a.weight").dtype == torch.float8_e4m3fn
    assert torch.equal(ckpt.get("b.weight"), torch.ones(3, 4))
    raw = io.open_checkpoint({"a.weight": fp8, "a.weight_scale": torch.ones(1)}, views=False)
    assert raw.names() == ["a.weight", "a.weight_scale"] and raw.get("a.weight").dtype == torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------------------
# Mixture of experts


@pytest.mark.parametrize("name, layer, module", [
    ("model.layers.0.mlp.experts.3.w1.weight", 0, "mlp.experts.3.w1"),
    ("model.layers.7.block_sparse_moe.experts.3.w1.weight", 7, "block_sparse_moe.experts.3.w1"),
    ("model.layers.2.mlp.experts.gate_up_proj.5", 2, "mlp.experts.gate_up_proj.5"),
    ("model.layers.4.mlp.shared_experts.down_proj.weight", 4, "mlp.shared_experts.down_proj"),
    ("experts.3.w1.weight", None, "experts.3.w1"),
    ("experts.down_proj.3", None, "experts.down_proj.3"),
    ("model.layers.3.self_attn.q_proj.weight", 3, "self_attn.q_proj"),
])
def test_layer_and_module_never_take_an_expert_index_for_the_layer(name, layer, module):
    assert layer_and_module(name) == (layer, module)


@pytest.mark.parametrize("name, admitted", [
    ("model.layers.0.mlp.experts.gate_up_proj_bias", False), ("model.layers.0.mlp.experts.down_proj_bias", False),
    ("model.layers.0.self_attn.q_proj.bias", False), ("model.layers.0.mlp.experts.gate_up_proj.3", True),
    ("model.layers.0.mlp.router.weight", True), ("model.layers.0.attn.biased_proj.weight", True),
])
def test_biases_are_never_in_scope(name, admitted):
    assert Scope().admits(name) is admitted and Scope(include=("layers",)).admits(name) is admitted


E, H, I = 4, 64, 48


def test_stacked_experts_are_read_one_matrix_per_expert(tmp_path):
    state = checkpoints.moe_state_dict(hidden=H, intermediate=I, experts=E)
    directory = synthetic.write_checkpoint(state, tmp_path / "moe", max_shard_bytes=200_000)
    with io.open_checkpoint(directory) as ckpt:
        names = ckpt.names()
        stacked = [f"model.layers.{layer}.mlp.experts.{p}" for layer in (1, 2) for p in ("gate_up_proj", "down_proj")]
        assert not set(stacked) & set(names) and set(stacked) <= set(ckpt.stored_names())
        assert len(names) == len(state) - 4 + 4 * E
        for layer, transposed in ((1, True), (2, False)):
            for param, shape in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
                name = f"model.layers.{layer}.mlp.experts.{param}"
                for e in range(E):
                    expected = state[name][e].T if transposed else state[name][e]
                    assert ckpt.shape(f"{name}.{e}") == shape and ckpt.dtype(f"{name}.{e}") == torch.float32
                    assert torch.equal(ckpt.get(f"{name}.{e}"), expected)
                    assert ckpt.file_of(f"{name}.{e}") == ckpt.file_of(name)
                assert torch.equal(ckpt.get(name), state[name])  # the stored tensor stays readable
                assert ckpt.is_view(f"{name}.0") and not ckpt.is_view(name)
        assert not ckpt.is_view("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    # the layout can be given outright: everything read as stored
    with io.open_checkpoint(directory, expert_layout="out_in") as ckpt:
        assert ckpt.shape("model.layers.1.mlp.experts.gate_up_proj.0") == (H, 2 * I)
    with io.open_checkpoint(state, expert_layout="in_out") as ckpt:
        assert ckpt.shape("model.layers.2.mlp.experts.gate_up_proj.0") == (H, 2 * I)


def test_stacked_expert_reads_only_its_slice(tmp_path, monkeypatch):
    state = checkpoints.moe_state_dict(hidden=H, intermediate=I, experts=E)
    directory = synthetic.write_checkpoint(state, tmp_path / "moe")
    ckpt = io.open_checkpoint(directory)
    monkeypatch.setattr(SafetensorsShard, "tensor", lambda *a: pytest.fail("whole stacked tensor read"))
    name = "model.layers.2.mlp.experts.down_proj"
    assert torch.equal(ckpt.get(f"{name}.1"), state[name][1])


def test_moe_scan_pairs_expert_by_expert_and_matches_fp64(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = checkpoints.moe_state_dict(hidden=H, intermediate=I, experts=E, seed=3)
    # analysed [out, in] matrices of the intruded experts, by (stored name, expert or None)
    intruded = {("model.layers.0.block_sparse_moe.experts.1.w1.weight", None),
                ("model.layers.1.mlp.experts.gate_up_proj", 2),   # stored [E, in, out]
                ("model.layers.2.mlp.experts.down_proj", 3)}      # stored [E, out, in]
    tuned = {}
    for name, W in base.items():
        if W.ndim == 2:
            W = W + synthetic.full_finetune_update(W, generator=g)
            if (name, None) in intruded:
                W = W + intruder(W.shape, g)
        elif W.ndim == 3:
            transposed = name.startswith("model.layers.1.")
            W = W.clone()
            for e in range(E):
                matrix = W[e].T if transposed else W[e]  # a view: updates land in W
                matrix += synthetic.full_finetune_update(matrix, generator=g)
                if (name, e) in intruded:
                    matrix += intruder(matrix.shape, g)
        tuned[name] = W
    base_dir = synthetic.write_checkpoint(base, tmp_path / "base", max_shard_bytes=200_000)
    tuned_dir = synthetic.write_checkpoint(tuned, tmp_path / "tuned")
    report = lorafft.scan(base_dir, tuned_dir)

    rows = {row.name: row for row in report.rows}
    per_expert = {f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight" for e in range(E) for w in (1, 2, 3)}
    stacked = {f"model.layers.{layer}.mlp.experts.{p}.{e}" for layer in (1, 2) for p in ("gate_up_proj", "down_proj")
               for e in range(E)}
    assert set(rows) == per_expert | stacked and len(report.rows) == len(rows)
    for name, row in rows.items():
        assert row.tuned_name == name and (row.layer, row.module) == layer_and_module(name)
        assert row.layer == int(name.split(".")[2]) and (".experts." in f".{row.module}")
        down = "down_proj" in name or ".w2." in name
        assert tuple(row.shape) == ((H, I) if down else (2 * I, H) if "gate_up" in name else (I, H))
    assert rows["model.layers.1.mlp.experts.gate_up_proj.2"].module == "mlp.experts.gate_up_proj.2"
    assert rows["model.layers.0.block_sparse_moe.experts.1.w1.weight"].module == "block_sparse_moe.experts.1.w1"

    def analysed(state, name, e):
        if e is None:
            return state[name]
        return state[name][e].T if name.startswith("model.layers.1.") else state[name][e]

    checked = intruded | {("model.layers.1.mlp.experts.down_proj", 0), ("model.layers.2.mlp.experts.gate_up_proj", 1)}
    for name, e in checked:
        row = rows[name if e is None else f"{name}.{e}"]
        count, max_cos = fp64_counts(analysed(base, name, e), analysed(tuned, name, e))
        assert row.counts["0.5"] == count == (1 if (name, e) in intruded else 0), row.name
        assert max(abs(a - b) for a, b in zip(row.max_cos, max_cos.tolist())) < 1e-4, row.name
    assert report.totals()["0.5"] == 3
