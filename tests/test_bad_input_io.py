"""Bad files, one case per kind, refused the same way by the public reader and by ``lorafft scan``.

The reader raises one InputError line naming the file; ``lorafft scan`` exits 2 with that one line on stderr and
writes nothing.

The reader-level rules are tested one by one in ``test_io.py``; here each kind of bad file is also taken through
the CLI, and the kinds that only JSON limits or path resolution catch (deep nesting, oversized configs, symlink loops,
``../`` in an index) are added.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lorafft.cli import main
from lorafft.io import open_adapter, open_checkpoint
from lorafft.errors import InputError
from lorafft.io.jsonfile import CONFIG_BYTES, MAX_DEPTH, parse_json

from lorafft_fixtures.bad_files import Exploit, expect_input_error, write_raw_safetensors

F32_24X16 = {"dtype": "F32", "shape": [24, 16], "data_offsets": [0, 24 * 16 * 4]}
DATA = bytes(24 * 16 * 4)


def _weights(seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layers.0.{m}.weight": torch.randn(24, 16, generator=generator) for m in ("q", "k")}


def _nested(depth: int) -> bytes:
    return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"


# Each builder writes a bad checkpoint (or adapter) into an empty directory ``d`` and returns the path to give,
# the file the error must name, and a fragment of the message.

def header_nested_100000(d):
    return d, write_raw_safetensors(d / "model.safetensors", _nested(100_000), b""), "nested more than 64 levels"


def header_nested_just_too_deep(d):
    return d, write_raw_safetensors(d / "model.safetensors", _nested(MAX_DEPTH), b""), "nested more than 64 levels"


def header_truncated(d):
    raw = json.dumps({"w": F32_24X16}).encode()
    file = d / "model.safetensors"
    file.write_bytes(len(raw).to_bytes(8, "little") + raw[:10])
    return d, file, "truncated or corrupt header: header length"


def header_length_too_short(d):
    raw = json.dumps({"w": F32_24X16}).encode()
    return d, write_raw_safetensors(d / "model.safetensors", raw, DATA, length=len(raw) - 3), "not valid JSON"


def data_truncated(d):
    save_file(_weights(), str(d / "model.safetensors"))
    os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 4)
    return d, d / "model.safetensors", "truncated: tensor"


def offsets_overlap(d):
    header = {"a": F32_24X16, "b": {**F32_24X16, "data_offsets": [8, 8 + 24 * 16 * 4]}}
    return d, write_raw_safetensors(d / "model.safetensors", header, bytes(8 + 24 * 16 * 4)), "overlap"


def offsets_outside_file(d):
    header = {"w": {**F32_24X16, "data_offsets": [24 * 16 * 4, 2 * 24 * 16 * 4]}}
    return d, write_raw_safetensors(d / "model.safetensors", header, DATA), "ends at byte 3072"


def unknown_dtype(d):
    return d, write_raw_safetensors(d / "model.safetensors", {"w": {**F32_24X16, "dtype": "F4"}}, DATA), \
        "unknown dtype 'F4'"


def shape_bytes_mismatch(d):
    header = {"w": {**F32_24X16, "shape": [24, 15]}}
    return d, write_raw_safetensors(d / "model.safetensors", header, DATA), "1536 bytes for F32 [24, 15] (needs 1440)"


def nan_in_weight(d):
    weights = _weights()
    weights["layers.0.q.weight"][3, 4] = float("nan")
    save_file(weights, str(d / "model.safetensors"))
    return d, d / "model.safetensors", "contains NaN or Inf"


def inf_in_weight(d):
    weights = _weights()
    weights["layers.0.k.weight"][0, 0] = float("-inf")
    save_file(weights, str(d / "model.safetensors"))
    return d, d / "model.safetensors", "contains NaN or Inf"


def empty_safetensors(d):
    (d / "model.safetensors").write_bytes(b"")
    return d, d / "model.safetensors", "not a safetensors file: 0 bytes"


def empty_bin(d):
    (d / "pytorch_model.bin").write_bytes(b"")
    return d, d / "pytorch_model.bin", "cannot read PyTorch checkpoint"


def pickle_payload(d):
    torch.save({**_weights(), "x": Exploit(d.parent / "pwned")}, d / "pytorch_model.bin")
    return d, d / "pytorch_model.bin", "refused by the weights_only unpickler"


def _index(d, weight_map) -> str:
    save_file(_weights(), str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / "model.safetensors.index.json"


def index_missing_shard(d):
    weight_map = dict.fromkeys(_weights(), "model-00002-of-00002.safetensors")
    return d, _index(d, weight_map), "shard 'model-00002-of-00002.safetensors' named in the index does not exist"


def index_parent_path(d):
    weight_map = dict.fromkeys(_weights(), "../model-00001-of-00001.safetensors")
    return d, _index(d, weight_map), "is not a file name: '../model-00001-of-00001.safetensors'"


def index_dot_dot(d):
    return d, _index(d, dict.fromkeys(_weights(), "..")), "is not a file name: '..'"


def index_nested_deep(d):
    index = d / "model.safetensors.index.json"
    index.write_bytes(_nested(100_000))
    return d, index, "nested more than 64 levels"


def symlink_loop_path(d):
    loop = d / "loop"
    os.symlink(loop, loop)
    return loop, loop, "symbolic link loop"


def symlink_loop_weights(d):
    os.symlink(d / "model.safetensors", d / "model.safetensors")
    return d, d / "model.safetensors", "symbolic link loop"


def _adapter(d, config_text: str):
    (d / "adapter_config.json").write_text(config_text)
    save_file({"base_model.model.layers.0.q.lora_A.weight": torch.randn(2, 16),
               "base_model.model.layers.0.q.lora_B.weight": torch.randn(24, 2)}, str(d / "adapter_model.safetensors"))
    return d, d / "adapter_config.json"


def adapter_config_nested_deep(d):
    return *_adapter(d, _nested(100_000).decode()), "nested more than 64 levels"


def adapter_config_too_large(d):
    path, config = _adapter(d, '{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    os.truncate(config, CONFIG_BYTES + 1)  # sparse: nothing is read, the size alone is refused
    return path, config, f"{CONFIG_BYTES + 1} bytes"


CASES = [header_nested_100000, header_nested_just_too_deep, header_truncated, header_length_too_short,
         data_truncated, offsets_overlap, offsets_outside_file, unknown_dtype, shape_bytes_mismatch, nan_in_weight,
         inf_in_weight, empty_safetensors, empty_bin, pickle_payload, index_missing_shard, index_parent_path,
         index_dot_dot, index_nested_deep, symlink_loop_path, symlink_loop_weights,
         adapter_config_nested_deep, adapter_config_too_large]


def _build(case, tmp_path):
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    return case(tuned_dir)


def _read_everything(path):
    opened = open_adapter(path) if (os.path.isdir(path) and (path / "adapter_config.json").exists()) else None
    with opened.tensors if opened else open_checkpoint(path) as checkpoint:
        for name in checkpoint.names():
            checkpoint.get(name)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_reader_refuses_in_one_line(case, tmp_path):
    path, named, fragment = _build(case, tmp_path)
    expect_input_error(lambda: _read_everything(path), named, fragment)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_cli_exits_2_in_one_line_writing_nothing(case, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    save_file(_weights(seed=1), str(base / "model.safetensors"))
    path, named, fragment = _build(case, tmp_path)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "report.json"
    code = main(["scan", str(base), str(path), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"lorafft: error: {named}: "), captured.err
    assert captured.err.count("\n") == 1 and fragment in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(os.listdir(tmp_path)) == before  # no report, no journal, no temporary file
    assert not (tmp_path / "pwned").exists()


def test_json_limits_are_exact():
    """Depth MAX_DEPTH parses, one more level is refused; so is a document one byte over its size limit."""
    item, arrays = parse_json(_nested(MAX_DEPTH - 1), "f.json", max_bytes=10**6)["x"], 0
    while isinstance(item, list):
        item, arrays = (item[0] if item else None), arrays + 1
    assert arrays == MAX_DEPTH - 1  # the object plus MAX_DEPTH - 1 arrays: MAX_DEPTH levels
    with pytest.raises(InputError, match="nested more than 64 levels deep"):
        parse_json(_nested(MAX_DEPTH), "f.json", max_bytes=10**6)
    document = b'{"a": 1}'
    assert parse_json(document, "f.json", max_bytes=len(document)) == {"a": 1}
    with pytest.raises(InputError, match="too large: 8 bytes, more than the 7"):
        parse_json(document, "f.json", max_bytes=len(document) - 1)
