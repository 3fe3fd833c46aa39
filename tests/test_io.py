"""Tests for lorafft.io: every checkpoint layout, exact round trips, and one test per bad-input rule."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import lorafft.io.safetensors
from lorafft.errors import InputError
from lorafft.io import writer
from lorafft.io import Checkpoint, is_adapter, open_adapter, open_checkpoint

from lorafft_fixtures.bad_files import Exploit, expect_input_error, write_raw_safetensors


def reference_tensors() -> dict[str, torch.Tensor]:
    """Small tensors in the dtypes fine-tunes ship; random bits so a lossy round trip would show."""
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.q.weight": torch.randn(4, 3, generator=g),
        "layers.0.k.weight": torch.randn(3, 2, generator=g).bfloat16(),
        "layers.1.q.weight": torch.randn(2, 5, generator=g).half(),
        "layers.1.step": torch.tensor([7, -1], dtype=torch.int64),
    }


def split(tensors):
    """Two shards: layer 0 and layer 1."""
    first = {k: v for k, v in tensors.items() if k.startswith("layers.0")}
    return first, {k: v for k, v in tensors.items() if k not in first}


def write_index(path, weight_map):
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


# --------------------------------------------------------------------------------------------------------------
# Layouts


def layout_single_safetensors(d, t):
    save_file(t, str(d / "model.safetensors"))
    return d, dict.fromkeys(t, d / "model.safetensors")


def layout_sharded_safetensors(d, t):
    weight_map = {}
    for i, part in enumerate(split(t), 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file(part, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    write_index(d / "model.safetensors.index.json", weight_map)
    return d, {k: d / v for k, v in weight_map.items()}


def layout_single_bin(d, t):
    torch.save(t, d / "pytorch_model.bin")
    return d, dict.fromkeys(t, d / "pytorch_model.bin")


def layout_sharded_bin(d, t):
    weight_map = {}
    for i, part in enumerate(split(t), 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save(part, d / name)
        weight_map.update(dict.fromkeys(part, name))
    write_index(d / "pytorch_model.bin.index.json", weight_map)
    return d, {k: d / v for k, v in weight_map.items()}


def layout_safetensors_file(d, t):
    save_file(t, str(d / "weights.safetensors"))
    return d / "weights.safetensors", dict.fromkeys(t, d / "weights.safetensors")


def layout_pt_file(d, t):
    torch.save(t, d / "weights.pt")
    return d / "weights.pt", dict.fromkeys(t, d / "weights.pt")


def layout_legacy_pth_file(d, t):
    torch.save(t, d / "weights.pth", _use_new_zipfile_serialization=False)  # not a zip: cannot be mmapped
    return d / "weights.pth", dict.fromkeys(t, d / "weights.pth")


def layout_wrapped_state_dict(d, t):
    torch.save({"state_dict": t, "epoch": 3}, d / "ckpt.pt")
    return d / "ckpt.pt", dict.fromkeys(t, d / "ckpt.pt")


def layout_index_path(d, t):
    source, files = layout_sharded_safetensors(d, t)
    return source / "model.safetensors.index.json", files


def layout_state_dict(d, t):
    return dict(t), dict.fromkeys(t, "<state dict>")


LAYOUTS = [
    layout_single_safetensors, layout_sharded_safetensors, layout_single_bin, layout_sharded_bin,
    layout_safetensors_file, layout_pt_file, layout_legacy_pth_file, layout_wrapped_state_dict, layout_index_path,
    layout_state_dict,
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__.removeprefix("layout_"))
def test_layout_round_trips_exactly(tmp_path, layout):
    saved = reference_tensors()
    source, files = layout(tmp_path, saved)
    with open_checkpoint(source) as ckpt:
        assert ckpt.path == ("<state dict>" if isinstance(source, dict) else str(source))
        assert ckpt.names() == sorted(saved)
        for name, expected in saved.items():
            assert ckpt.file_of(name) == str(files[name])
            assert ckpt.shape(name) == tuple(expected.shape)
            assert ckpt.dtype(name) == expected.dtype
            got = ckpt.get(name)
            assert got.dtype == expected.dtype and got.device.type == "cpu"
            assert torch.equal(got, expected)


def test_directory_prefers_safetensors_over_bin(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.file_of("w") == str(tmp_path / "model.safetensors")
        assert torch.equal(ckpt.get("w"), torch.ones(2))


def test_safetensors_shape_and_dtype_read_no_data(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(3, 4, dtype=torch.float8_e4m3fn)}, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(lorafft.io.safetensors, "safe_open", no_data)
    assert ckpt.shape("w") == (3, 4)
    assert ckpt.dtype("w") == torch.float8_e4m3fn
    with pytest.raises(AssertionError):
        ckpt.get("w")


def test_release_and_close_keep_checkpoint_usable(tmp_path):
    saved = reference_tensors()
    source, files = layout_sharded_bin(tmp_path, saved)
    ckpt = open_checkpoint(source)
    name = "layers.0.q.weight"
    assert torch.equal(ckpt.get(name), saved[name])
    ckpt.release(ckpt.file_of(name))
    assert torch.equal(ckpt.get(name), saved[name])
    ckpt.close()
    assert torch.equal(ckpt.get("layers.1.q.weight"), saved["layers.1.q.weight"])


def test_unknown_name_is_a_key_error(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        open_checkpoint({"w": torch.ones(1)}).get("nope")


# --------------------------------------------------------------------------------------------------------------
# Bad paths and directories


def test_missing_path(tmp_path):
    expect_input_error(lambda: open_checkpoint(tmp_path / "absent"), tmp_path / "absent", "no such file or directory")


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    expect_input_error(lambda: open_checkpoint(tmp_path), tmp_path, "no checkpoint found (looked for model.safetensors")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"x")
    expect_input_error(lambda: open_checkpoint(tmp_path / "w.h5"), tmp_path / "w.h5", "unsupported file type")


def test_state_dict_with_non_tensor():
    expect_input_error(lambda: open_checkpoint({"w": [1.0, 2.0]}), "<state dict>", "'w' is not a tensor (got list)")


# --------------------------------------------------------------------------------------------------------------
# Bad safetensors files: each header rule has its own message


def good_safetensors(path):
    save_file({"a": torch.ones(2, 2), "b": torch.ones(3)}, str(path))
    return path


def test_safetensors_truncated(tmp_path):
    path = good_safetensors(tmp_path / "m.safetensors")
    os.truncate(path, path.stat().st_size - 4)  # "b" (F32 [3]) is last: its data is bytes 16..28
    expect_input_error(lambda: open_checkpoint(path), path,
                       "truncated: tensor 'b' ends at byte 28 but the file has 24 data bytes")


def test_safetensors_shorter_than_header_length(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    expect_input_error(lambda: open_checkpoint(path), path, "not a safetensors file: 3 bytes")


def test_safetensors_absurd_header_length(tmp_path):
    path = good_safetensors(tmp_path / "m.safetensors")
    path.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])
    expect_input_error(lambda: open_checkpoint(path), path, "truncated or corrupt header: header length 1099511627776 "
                                                            "exceeds the 100 MB limit")


def test_safetensors_header_longer_than_file(tmp_path):
    path = good_safetensors(tmp_path / "m.safetensors")
    size = path.stat().st_size
    path.write_bytes(size.to_bytes(8, "little") + path.read_bytes()[8:])
    expect_input_error(lambda: open_checkpoint(path), path, f"truncated or corrupt header: header length {size} "
                                                            f"but only {size - 8} bytes follow")


@pytest.mark.parametrize("header, fragment", [
    (b"{not json", "header is not valid JSON"),
    (b'{"a": "\xff"}', "header is not valid JSON"),
    (b"[1, 2]", "header is not a JSON object (got list)"),
], ids=["bad-json", "bad-utf8", "not-object"])
def test_safetensors_header_not_json_object(tmp_path, header, fragment):
    path = tmp_path / "m.safetensors"
    write_raw_safetensors(path, header, b"")
    expect_input_error(lambda: open_checkpoint(path), path, fragment)


F32_2X2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data_bytes, fragment", [
    ({"x": {"shape": [2, 2], "data_offsets": [0, 16]}}, 16, "tensor 'x': header entry has no dtype"),
    ({"x": [0, 16]}, 16, "tensor 'x': header entry is not a JSON object"),
    ({"x": {**F32_2X2, "dtype": "Q4"}}, 16, "tensor 'x': unknown dtype 'Q4'"),
    ({"x": {**F32_2X2, "shape": [2, -2]}}, 16, "tensor 'x': shape must be a list of non-negative integers"),
    ({"x": {**F32_2X2, "shape": [2.0, 2]}}, 16, "tensor 'x': shape must be a list of non-negative integers"),
    ({"x": {**F32_2X2, "data_offsets": [16, 0]}}, 16, "tensor 'x': data_offsets must be [begin, end] integers"),
    ({"x": {**F32_2X2, "data_offsets": [0]}}, 16, "tensor 'x': data_offsets must be [begin, end] integers"),
    ({"x": {**F32_2X2, "data_offsets": [0, 12]}}, 12, "tensor 'x': 12 bytes for F32 [2, 2] (needs 16)"),
    ({"x": F32_2X2, "y": {**F32_2X2, "data_offsets": [16, 32]}}, 16,
     "truncated: tensor 'y' ends at byte 32 but the file has 16 data bytes"),
    ({"x": F32_2X2, "y": {**F32_2X2, "data_offsets": [8, 24]}}, 24, "tensors 'x' and 'y' overlap"),
    ({"x": {**F32_2X2, "data_offsets": [4, 20]}}, 20, "data bytes 0..4 (before tensor 'x') belong to no tensor"),
    ({"x": F32_2X2}, 20, "the last 4 data bytes belong to no tensor"),
    ({"__metadata__": {"format": 1}, "x": F32_2X2}, 16, "__metadata__ must map strings to strings"),
], ids=["missing-dtype", "entry-not-object", "unknown-dtype", "negative-dim", "float-dim", "begin-after-end",
        "one-offset", "wrong-byte-count", "offsets-outside-file", "overlap", "gap", "trailing-bytes",
        "bad-metadata"])
def test_safetensors_bad_header_entry(tmp_path, header, data_bytes, fragment):
    path = tmp_path / "m.safetensors"
    write_raw_safetensors(path, header, bytes(data_bytes))
    expect_input_error(lambda: open_checkpoint(path), path, fragment)


def test_safetensors_valid_raw_header_with_metadata_is_read(tmp_path):
    """The hand-built files above differ from this one only in the rule they break."""
    path = tmp_path / "m.safetensors"
    expected = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    write_raw_safetensors(path, {"__metadata__": {"format": "pt"}, "x": F32_2X2}, expected.numpy().tobytes())
    assert torch.equal(open_checkpoint(path).get("x"), expected)


# --------------------------------------------------------------------------------------------------------------
# Bad indexes


def test_index_names_missing_shard(tmp_path):
    _, files = layout_sharded_safetensors(tmp_path, reference_tensors())
    os.remove(files["layers.1.q.weight"])
    index = tmp_path / "model.safetensors.index.json"
    expect_input_error(lambda: open_checkpoint(tmp_path), index,
                       "shard 'model-00002-of-00002.safetensors' named in the index does not exist")


@pytest.mark.parametrize("layout, index_name", [
    (layout_sharded_safetensors, "model.safetensors.index.json"),
    (layout_sharded_bin, "pytorch_model.bin.index.json"),
])
def test_index_lists_tensor_missing_from_shard(tmp_path, layout, index_name):
    _, files = layout(tmp_path, reference_tensors())
    index = tmp_path / index_name
    data = json.loads(index.read_text())
    shard = files["layers.0.q.weight"]
    data["weight_map"]["ghost"] = shard.name
    index.write_text(json.dumps(data))
    message = f"tensor 'ghost' listed in {index_name} is not in this shard"
    if shard.suffix == ".safetensors":  # headers are read at open, so the lie is caught there
        expect_input_error(lambda: open_checkpoint(tmp_path), shard, message)
        return
    ckpt = open_checkpoint(tmp_path)
    assert "ghost" in ckpt.names()
    assert ckpt.file_of("ghost") == str(shard)
    for touch in (ckpt.get, ckpt.shape):
        expect_input_error(lambda: touch("ghost"), shard, message)


@pytest.mark.parametrize("text, fragment", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object, got list"),
    ('{"metadata": {}}', "not a shard index (no 'weight_map' object)"),
    ('{"weight_map": {"w": "../model.safetensors"}}', "weight_map entry for 'w' is not a file name"),
    ('{"weight_map": {"w": ["a.safetensors"]}}', "weight_map entry for 'w' is not a file name"),
], ids=["bad-json", "not-object", "no-weight-map", "path-escape", "not-string"])
def test_bad_index_file(tmp_path, text, fragment):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    expect_input_error(lambda: open_checkpoint(index), index, fragment)


# --------------------------------------------------------------------------------------------------------------
# Bad .bin files


def test_corrupt_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference_tensors(), path)
    os.truncate(path, path.stat().st_size // 2)
    expect_input_error(lambda: open_checkpoint(tmp_path), path, "cannot read PyTorch checkpoint: ")


def test_garbage_bin(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"definitely not a pickle" * 10)
    expect_input_error(lambda: open_checkpoint(path), path, "cannot read PyTorch checkpoint: ")


def test_bin_with_code_is_refused_not_run(tmp_path):
    path, marker = tmp_path / "evil.bin", tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "x": Exploit(marker)}, path)
    expect_input_error(lambda: open_checkpoint(path), path,
                       "cannot read PyTorch checkpoint: refused by the weights_only unpickler")
    assert not marker.exists()


@pytest.mark.parametrize("obj, fragment", [
    ([torch.ones(1)], "expected a dict of tensors, got list"),
    ({"w": torch.ones(1), "lr": 0.1}, "'lr' is not a tensor (got float)"),
    ({1: torch.ones(1)}, "tensor name 1 is not a string"),
], ids=["not-dict", "non-tensor", "non-string-name"])
def test_bin_not_a_dict_of_tensors(tmp_path, obj, fragment):
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    expect_input_error(lambda: open_checkpoint(path), path, fragment)


# --------------------------------------------------------------------------------------------------------------
# NaN / Inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_weight(tmp_path, dtype, bad):
    weight = torch.ones(3, 4)
    weight[1, 2] = bad
    path = tmp_path / "model.safetensors"
    save_file({"fine": torch.ones(2, dtype=dtype), "w": weight.to(dtype)}, str(path))
    ckpt = open_checkpoint(tmp_path)
    assert torch.equal(ckpt.get("fine"), torch.ones(2, dtype=dtype))
    expect_input_error(lambda: ckpt.get("w"), path, "tensor 'w' contains NaN or Inf")


def test_nan_in_fp8_e4m3(tmp_path):
    weight = torch.zeros(4, dtype=torch.float8_e4m3fn)
    weight.view(torch.uint8)[2] = 0x7F  # e4m3fn has no Inf; 0x7F is its NaN
    ckpt = open_checkpoint({"w": weight})
    expect_input_error(lambda: ckpt.get("w"), "<state dict>", "tensor 'w' contains NaN or Inf")


# --------------------------------------------------------------------------------------------------------------
# Adapters


def make_adapter(d, config='{"r": 8, "lora_alpha": 16, "target_modules": ["q"]}'):
    (d / "adapter_config.json").write_text(config)
    return d


def test_adapter(tmp_path):
    lora = {"base_model.model.layers.0.q.lora_A.weight": torch.randn(8, 3),
            "base_model.model.layers.0.q.lora_B.weight": torch.zeros(4, 8)}
    save_file(lora, str(make_adapter(tmp_path) / "adapter_model.safetensors"))
    assert is_adapter(tmp_path) and not is_adapter(tmp_path / "adapter_model.safetensors")
    adapter = open_adapter(tmp_path)
    assert adapter.path == str(tmp_path)
    assert adapter.config == {"r": 8, "lora_alpha": 16, "target_modules": ["q"]}
    assert isinstance(adapter.tensors, Checkpoint)
    assert adapter.tensors.names() == sorted(lora)
    for name, expected in lora.items():
        assert torch.equal(adapter.tensors.get(name), expected)


def test_adapter_bin_weights(tmp_path):
    torch.save({"lora_A.weight": torch.ones(2, 3)}, make_adapter(tmp_path) / "adapter_model.bin")
    tensors = open_adapter(tmp_path).tensors
    assert tensors.file_of("lora_A.weight") == str(tmp_path / "adapter_model.bin")
    assert torch.equal(tensors.get("lora_A.weight"), torch.ones(2, 3))


def test_adapter_without_weights(tmp_path):
    make_adapter(tmp_path)
    expect_input_error(lambda: open_adapter(tmp_path), tmp_path, "no adapter_model.safetensors or adapter_model.bin")


@pytest.mark.parametrize("config, fragment", [
    ('{"r": 8,', "not valid JSON"),
    ('["r", 8]', "expected a JSON object, got list"),
], ids=["bad-json", "not-object"])
def test_adapter_bad_config(tmp_path, config, fragment):
    make_adapter(tmp_path, config)
    save_file({"w": torch.ones(1)}, str(tmp_path / "adapter_model.safetensors"))
    expect_input_error(lambda: open_adapter(tmp_path), tmp_path / "adapter_config.json", fragment)


def test_adapter_dir_without_config(tmp_path):
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert not is_adapter(tmp_path)
    expect_input_error(lambda: open_adapter(tmp_path), tmp_path, "not a PEFT adapter directory")


# --------------------------------------------------------------------------------------------------------------
# The writer


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    writer.write_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with writer.atomic_path(target) as temporary:
            with open(temporary, "w") as handle:
                handle.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["report.json"]


def test_new_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        with writer.new_directory(str(out)) as temporary:
            writer.write_json(os.path.join(temporary, "a.json"), {"a": 1})
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="cannot create the output directory"):
        with writer.new_directory(str(tmp_path / "taken")) as temporary:
            writer.write_json(os.path.join(temporary, "a.json"), {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["taken"] and os.listdir(tmp_path / "taken") == ["keep.txt"]
    with writer.new_directory(str(out)) as temporary:
        writer.write_json(os.path.join(temporary, "a.json"), {"a": 1})
    assert json.loads((out / "a.json").read_text()) == {"a": 1} and sorted(os.listdir(tmp_path)) == ["out", "taken"]


def test_copy_checkpoint_replaces_only_the_named_tensors(tmp_path):
    saved = reference_tensors()
    (tmp_path / "in").mkdir()
    source, files = layout_sharded_safetensors(tmp_path / "in", saved)
    (source / "config.json").write_text('{"model_type": "x"}')
    (source / "extra").mkdir()
    name = "layers.1.q.weight"
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(source) as checkpoint, pytest.warns(UserWarning, match="not copied.*extra"):
        layout = writer.checkpoint_files(checkpoint, str(source))
        written = writer.copy_checkpoint(checkpoint, layout, str(out), {name: lambda t: -t}, leave_out=("x",))
    assert sorted(written) == sorted(os.listdir(out)) == sorted(
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json"])
    untouched = files["layers.0.q.weight"].name
    assert (out / untouched).read_bytes() == (source / untouched).read_bytes()
    assert (out / "model.safetensors.index.json").read_bytes() == (source / "model.safetensors.index.json").read_bytes()
    with open_checkpoint(out) as copied:
        assert copied.stored_names() == sorted(saved)
        for key, expected in saved.items():
            assert torch.equal(copied.get(key), -expected if key == name else expected)


def test_a_checkpoint_written_over_another_replaces_it(tmp_path):
    """A sharded checkpoint, then a single-file one into the same directory: the old shards and index are gone, so
    the new tensors are what is read."""
    zeros = {f"w{i}.weight": torch.zeros(4, 4) for i in range(3)}
    writer.write_checkpoint(zeros, tmp_path, max_shard_bytes=64)
    assert (tmp_path / "model.safetensors.index.json").exists()
    writer.write_checkpoint({name: torch.ones(4, 4) for name in zeros}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with open_checkpoint(tmp_path) as checkpoint:
        assert float(checkpoint.get("w1.weight").sum()) == 16.0
