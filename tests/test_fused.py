"""Fused projections (Phi-3 qkv_proj / gate_up_proj, GPT-NeoX / BLOOM / Falcon query_key_value) split into their
parts by the reader when asked (``split_fused``), laid out as the checkpoint's config.json says."""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

import lorafft
from lorafft import io, synthetic
from lorafft.errors import InputError
from lorafft.io.safetensors import SafetensorsShard

from lorafft_fixtures import checkpoints

CONFIG = checkpoints.phi3_config()  # hidden 128, 4 heads of 32, 2 key/value heads, intermediate 96
HIDDEN, Q_ROWS, KV_ROWS, INTER = 128, 4 * 32, 2 * 32, 96
QKV = "model.layers.0.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.0.mlp.gate_up_proj.weight"
PARTS = {f"model.layers.0.self_attn.qkv_proj.{p}.weight" for p in "qkv"} | {
    f"model.layers.0.mlp.gate_up_proj.{p}.weight" for p in ("gate", "up")}


def phi3_blocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts of the Phi-3 fused weights, sliced here by hand: qkv [q 128; k 64; v 64], gate_up [gate 96; up 96]."""
    qkv, gate_up = state[QKV], state[GATE_UP]
    return {"model.layers.0.self_attn.qkv_proj.q.weight": qkv[:128],
            "model.layers.0.self_attn.qkv_proj.k.weight": qkv[128:192],
            "model.layers.0.self_attn.qkv_proj.v.weight": qkv[192:256],
            "model.layers.0.mlp.gate_up_proj.gate.weight": gate_up[:96],
            "model.layers.0.mlp.gate_up_proj.up.weight": gate_up[96:192]}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    state = checkpoints.phi3_state_dict(CONFIG)
    return checkpoints.write_phi3_checkpoint(tmp_path_factory.mktemp("phi3"), state, config=CONFIG), state


def fp64_counts(W0: torch.Tensor, Wt: torch.Tensor, k: int = 10, eps: float = 0.5) -> int:
    """Oracle: intruders among the top-k left singular vectors of Wt against every left one of W0 (fp64 SVDs)."""
    base = torch.linalg.svd(W0.double(), full_matrices=False).U
    tuned = torch.linalg.svd(Wt.double(), full_matrices=False).U[:, :k]
    return int(((base.T @ tuned).abs().amax(dim=0) < eps).sum())


# --------------------------------------------------------------------------------------------------------------
# Phi-3: [q; k; v] and [gate; up]


def test_phi3_parts_are_the_row_blocks_and_the_fused_names_are_hidden(phi3):
    directory, state = phi3
    assert state[QKV].shape == (Q_ROWS + 2 * KV_ROWS, HIDDEN) and state[GATE_UP].shape == (2 * INTER, HIDDEN)
    with io.open_checkpoint(directory, split_fused=True) as ckpt:
        names = set(ckpt.names())
        assert PARTS <= names and not {QKV, GATE_UP} & names
        assert names == (set(state) - {QKV, GATE_UP}) | PARTS
        assert {QKV, GATE_UP} <= set(ckpt.stored_names()) and not PARTS & set(ckpt.stored_names())
        for name, expected in phi3_blocks(state).items():
            assert ckpt.is_view(name) and ckpt.shape(name) == tuple(expected.shape)
            assert ckpt.dtype(name) == torch.float32 and ckpt.file_of(name) == ckpt.file_of(QKV)
            assert torch.equal(ckpt.get(name), expected)
        assert torch.equal(ckpt.get(QKV), state[QKV])  # the stored tensor stays readable
        assert not ckpt.is_view("model.layers.0.self_attn.o_proj.weight")
    with io.open_checkpoint(directory) as ckpt:  # by default: analysed whole
        assert {QKV, GATE_UP} <= set(ckpt.names()) and not PARTS & set(ckpt.names())


def test_phi3_part_reads_only_its_rows(phi3, monkeypatch):
    directory, state = phi3
    ckpt = io.open_checkpoint(directory, split_fused=True)
    monkeypatch.setattr(SafetensorsShard, "tensor", lambda *a: pytest.fail("whole fused tensor read"))
    assert torch.equal(ckpt.get("model.layers.0.self_attn.qkv_proj.v.weight"), state[QKV][192:])


def test_phi3_head_dim_from_config_and_sharded_bf16(tmp_path):
    config = checkpoints.phi3_config(hidden=64, heads=4, kv_heads=1) | {"head_dim": 24}  # heads·head_dim != hidden
    state = checkpoints.phi3_state_dict(config, dtype=torch.bfloat16)
    assert state[QKV].shape == (4 * 24 + 2 * 24, 64)
    directory = checkpoints.write_phi3_checkpoint(tmp_path / "phi3", state, config=config, max_shard_bytes=20_000)
    with io.open_checkpoint(directory, split_fused=True) as ckpt:
        for part, rows in (("q", slice(0, 96)), ("k", slice(96, 120)), ("v", slice(120, 144))):
            name = f"model.layers.0.self_attn.qkv_proj.{part}.weight"
            assert ckpt.dtype(name) == torch.bfloat16 and torch.equal(ckpt.get(name), state[QKV][rows])


def test_fp8_fused_weight_is_dequantized_then_split(tmp_path, phi3):
    _, state = phi3
    # per 128x128 block: the k/v boundary (row 192) lies inside the second row of blocks
    directory = checkpoints.write_fp8_checkpoint(state, tmp_path / "fp8", scheme="block", config=CONFIG)
    stored = load_file(str(directory / "model.safetensors"))
    whole = io.dequantize(stored[QKV], stored[QKV + "_scale_inv"], "block")
    with io.open_checkpoint(directory, split_fused=True) as ckpt:
        assert QKV + "_scale_inv" not in ckpt.names() and QKV not in ckpt.names()
        for part, rows in (("q", slice(0, 128)), ("k", slice(128, 192)), ("v", slice(192, 256))):
            name = f"model.layers.0.self_attn.qkv_proj.{part}.weight"
            assert ckpt.dtype(name) == torch.float32 and ckpt.shape(name) == (rows.stop - rows.start, HIDDEN)
            assert torch.equal(ckpt.get(name), whole[rows])


# --------------------------------------------------------------------------------------------------------------
# query_key_value: GPT-NeoX, BLOOM, Falcon


def fused_per_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Falcon's new-decoder layout written out: for each group, its query heads, then its key head, then its value
    head (GPT-NeoX / BLOOM ``[heads, 3, head_dim]`` is groups = heads with one query head per group)."""
    q_groups, k_groups, v_groups = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    return torch.cat([torch.cat([q_groups[g], k_groups[g], v_groups[g]]) for g in range(groups)])


H, D = 4, 8  # heads, head_dim; hidden 32

LAYOUTS = {  # model_type, name, config, key/value heads, how the rows are stored
    "gpt_neox": ("gpt_neox.layers.0.attention.query_key_value",
                 {"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": H}, H, "groups"),
    "bloom": ("transformer.h.0.self_attention.query_key_value",
              {"model_type": "bloom", "n_embed": 32, "n_head": H}, H, "groups"),
    "falcon-40b": ("transformer.h.0.self_attention.query_key_value",
                   {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": H, "num_kv_heads": 2,
                    "new_decoder_architecture": True, "multi_query": True}, 2, "groups"),
    "falcon-7b": ("transformer.h.0.self_attention.query_key_value",  # multi-query: [q heads; k; v]
                  {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": H, "multi_query": True,
                   "new_decoder_architecture": False}, 1, "blocks"),
    "falcon-mha": ("transformer.h.0.self_attention.query_key_value",  # like GPT-NeoX
                   {"model_type": "falcon", "hidden_size": 32, "n_head": H, "multi_query": False}, H, "groups"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_query_key_value_parts_follow_the_model_code(tmp_path, layout):
    module, config, kv_heads, stored_as = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, 32, generator=g) for rows in (H * D, kv_heads * D, kv_heads * D))
    if stored_as == "blocks":
        fused = torch.cat([q, k, v])
    elif kv_heads == H:  # [heads, 3, head_dim], as GPT-NeoX's view(..., heads, 3 * head_size) reads it
        fused = torch.stack([q.view(H, D, 32), k.view(H, D, 32), v.view(H, D, 32)], dim=1).reshape(-1, 32)
    else:
        fused = fused_per_group(q, k, v, kv_heads)
    state = {f"{module}.weight": fused, f"{module}.bias": torch.randn(fused.shape[0], generator=g),
             module.replace("query_key_value", "dense.weight"): torch.randn(32, 32, generator=g)}
    directory = synthetic.write_checkpoint(state, tmp_path / layout, config=config)
    with io.open_checkpoint(directory, split_fused=True) as ckpt:
        parts = {f"{module}.{p}.weight": t for p, t in zip("qkv", (q, k, v), strict=True)}
        assert set(ckpt.names()) == set(parts) | {f"{module}.bias", module.replace("query_key_value", "dense.weight")}
        for name, expected in parts.items():
            assert ckpt.shape(name) == tuple(expected.shape) and torch.equal(ckpt.get(name), expected)


def test_neox_layout_agrees_with_an_independent_head_loop(tmp_path):
    """The GPT-NeoX rows read the other way round: head h's q, k, v are rows 3hd..3hd+d, +d..+2d, +2d..+3d."""
    module, config, _, _ = LAYOUTS["gpt_neox"]
    fused = torch.randn(3 * H * D, 32, generator=torch.Generator().manual_seed(2))
    directory = synthetic.write_checkpoint({f"{module}.weight": fused}, tmp_path / "neox", config=config)
    with io.open_checkpoint(directory, split_fused=True) as ckpt:
        for index, part in enumerate("qkv"):
            expected = torch.cat([fused[3 * h * D + index * D : 3 * h * D + (index + 1) * D] for h in range(H)])
            assert torch.equal(ckpt.get(f"{module}.{part}.weight"), expected)


# --------------------------------------------------------------------------------------------------------------
# Refusals: one-line InputErrors naming the config file (or the input without one)


def test_split_fused_needs_a_directory_with_config_json(tmp_path, phi3):
    directory, state = phi3
    with pytest.raises(InputError, match=r"--split-fused needs the checkpoint's config\.json") as error:
        io.open_checkpoint(state, split_fused=True)
    assert error.value.path == io.STATE_DICT
    with pytest.raises(InputError, match=r"config\.json") as error:
        io.open_checkpoint(directory / "model.safetensors", split_fused=True)
    assert error.value.path == str(directory / "model.safetensors")
    bare = synthetic.write_checkpoint(state, tmp_path / "bare")
    with pytest.raises(InputError, match="no such file: --split-fused") as error:
        io.open_checkpoint(bare, split_fused=True)
    assert error.value.path == str(bare / "config.json")
    io.open_checkpoint(bare).names()  # without split_fused, no config is needed


BAD_CONFIGS = {
    "no num_attention_heads": ({"num_attention_heads": None}, "has no 'num_attention_heads'"),
    "no intermediate_size": ({"intermediate_size": None}, "has no 'intermediate_size'"),
    "no model_type": ({"model_type": None}, "has no 'model_type'"),
    "llama": ({"model_type": "llama"}, "only for model_type phi3, not 'llama'"),
    "rows do not add up": ({"num_key_value_heads": 1},
                           r"has 256 rows but this config \(phi3\) gives q 128 \+ k 32 \+ v 32 = 192"),
    "not an integer": ({"num_attention_heads": "4"}, "'num_attention_heads' must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_that_cannot_split_is_an_input_error_naming_it(tmp_path, phi3, case):
    _, state = phi3
    changes, message = BAD_CONFIGS[case]
    config = {key: value for key, value in (CONFIG | changes).items() if value is not None}
    directory = checkpoints.write_phi3_checkpoint(tmp_path / "phi3", state, config=config)
    ckpt = io.open_checkpoint(directory, split_fused=True)
    with pytest.raises(InputError, match=message) as error:
        ckpt.names()
    assert error.value.path == str(directory / "config.json") and "\n" not in str(error.value)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "RefinedWeb", "hidden_size": 32, "n_head": 4, "n_head_kv": 2}, "not 'RefinedWeb'"),
    ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_kv_heads": 3,
      "new_decoder_architecture": True}, "not a multiple of num_kv_heads 3"),
    ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "multi_query": "yes"}, "true or false"),
])
def test_unknown_or_inconsistent_query_key_value_configs_are_refused(tmp_path, config, message):
    name = "transformer.h.0.self_attention.query_key_value.weight"
    directory = synthetic.write_checkpoint({name: torch.zeros(48, 32)}, tmp_path / "qkv", config=config)
    with pytest.raises(InputError, match=message):
        io.open_checkpoint(directory, split_fused=True).names()


def test_config_is_only_interpreted_for_fused_tensors_present(tmp_path):
    """A checkpoint with nothing fused opens with split_fused under any model_type: there is nothing to split."""
    state = {"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}
    directory = synthetic.write_checkpoint(state, tmp_path / "llama", config={"model_type": "llama"})
    assert io.open_checkpoint(directory, split_fused=True).names() == list(state)


# --------------------------------------------------------------------------------------------------------------
# Analysis of the parts: an update on the v rows only


@pytest.fixture(scope="module")
def phi3_pair(tmp_path_factory, phi3):
    """Base and a fine-tune whose only change is a rank-1 LoRA-like update (singular value 1.5·σ1) of the v rows."""
    base_dir, state = phi3
    g = torch.Generator().manual_seed(5)
    a, b = synthetic.lora_update(KV_ROWS, HIDDEN, 1, generator=g, lora_alpha=2.0, sigma=1.5 * synthetic.SIGMA1)
    tuned = dict(state)
    tuned[QKV] = state[QKV].clone()
    tuned[QKV][Q_ROWS + KV_ROWS :] += 2.0 * (b @ a)
    tuned_dir = checkpoints.write_phi3_checkpoint(tmp_path_factory.mktemp("tuned"), tuned, config=CONFIG)
    expected = {name: fp64_counts(W0, phi3_blocks(tuned)[name]) for name, W0 in phi3_blocks(state).items()}
    assert expected == {name: int(name.endswith(".v.weight")) for name in PARTS}
    return base_dir, tuned_dir, expected


def test_counts_of_split_views_equal_fp64_reference(phi3_pair):
    base_dir, tuned_dir, expected = phi3_pair
    base, tuned = (io.open_checkpoint(d, split_fused=True) for d in (base_dir, tuned_dir))
    with base, tuned:
        for name, count in expected.items():
            result = lorafft.analyze(base.get(name), tuned.get(name), k=10, eps=(0.5,))["left"]
            assert int(result.counts[0, 0]) == count, name


needs_scan_option = pytest.mark.skipif("split_fused" not in inspect.signature(lorafft.scan).parameters,
                                       reason="lorafft.scan has no split_fused option yet")


@needs_scan_option
def test_scan_split_fused_counts_per_part_equal_fp64_reference(phi3_pair):
    base_dir, tuned_dir, expected = phi3_pair
    report = lorafft.scan(base_dir, tuned_dir, split_fused=True, eps=0.5)
    rows = {row.name: row for row in report.rows}
    assert set(rows) == PARTS | {"model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    for name, count in expected.items():
        assert rows[name].counts == {"0.5": count} and rows[name].tuned_name == name
    assert rows["model.layers.0.self_attn.qkv_proj.v.weight"].module == "self_attn.qkv_proj.v"
    assert report.options["split_fused"] is True
    whole = {row.name for row in lorafft.scan(base_dir, tuned_dir, eps=0.5).rows}  # default: analysed whole
    assert {QKV, GATE_UP} <= whole and not PARTS & whole


@needs_scan_option
def test_scan_with_peft_adapter_leaves_fused_modules_whole(tmp_path, phi3):
    base_dir, _ = phi3
    g = torch.Generator().manual_seed(6)
    adapter = synthetic.write_peft_adapter(
        tmp_path / "lora", {"model.layers.0.self_attn.qkv_proj": synthetic.lora_update(
            Q_ROWS + 2 * KV_ROWS, HIDDEN, 1, generator=g, lora_alpha=2.0, sigma=1.5 * synthetic.SIGMA1)},
        r=1, lora_alpha=2.0, target_modules=["qkv_proj"])
    with pytest.warns(UserWarning, match="split_fused ignored"):
        report = lorafft.scan(base_dir, adapter, split_fused=True)
    assert [row.name for row in report.rows] == [QKV] and report.options["split_fused"] is False


@needs_scan_option
def test_cli_split_fused_flag(tmp_path, phi3_pair, capsys):
    from lorafft.cli import main

    base_dir, tuned_dir, _ = phi3_pair
    out = tmp_path / "report.json"
    assert main(["scan", str(base_dir), str(tuned_dir), "--split-fused", "--quiet", "--out", str(out)]) == 0
    matrices = {m["name"] for m in json.loads(out.read_text())["matrices"]}
    assert PARTS <= matrices
    assert main(["scan", str(base_dir / "model.safetensors"), str(tuned_dir), "--split-fused", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--split-fused needs the checkpoint's config.json" in err and len(err.splitlines()) == 1
