"""lorafft.adapters against PEFT itself: every module's merged weight must equal what ``merge_and_unload`` gives.

PEFT is a test-only reference (lorafft never imports it); the PEFT tests skip without it, the config checks don't.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafft.adapters import delta_weight, lora_modules, merged_weight
from lorafft.errors import InputError
from lorafft.io import open_adapter
from lorafft.pairing import NameIndex
from lorafft.synthetic import write_peft_adapter


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _conv1d(out_features, in_features):
    from transformers.pytorch_utils import Conv1D  # GPT-2's layer: weight stored [in, out]

    return Conv1D(out_features, in_features)


class Tiny(nn.Module):
    """An embedding and two blocks of Linear and/or Conv1D layers; square and non-square weights."""

    def __init__(self, kinds):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({name: make() for name, make in kinds.items()}) for _ in range(2))


LINEAR = {"proj": lambda: nn.Linear(16, 24), "square": lambda: nn.Linear(16, 16)}
CONV1D = {"conv": lambda: _conv1d(24, 16), "conv_sq": lambda: _conv1d(16, 16)}
MIXED = {"proj": lambda: nn.Linear(16, 24), "conv": lambda: _conv1d(24, 16)}  # non-square only: see adapters

CASES = {
    "plain": (LINEAR, dict(r=4, lora_alpha=8, target_modules=["embed", "proj", "square"])),
    "rslora": (LINEAR, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["embed", "proj", "square"])),
    # First matching key wins ("blocks.1.proj" before "proj"); "oj" must not match "proj" ((.*\.)? anchors it).
    "patterns": (LINEAR, dict(
        r=4, lora_alpha=8, target_modules=["embed", "proj", "square"],
        rank_pattern={"blocks.1.proj": 2, "square": 3, "embed": 5},
        alpha_pattern={"blocks.1.proj": 7, "proj": 3, "oj": 100, r"blocks\.0\.sq\w+": 5},
    )),
    "patterns_rslora": (LINEAR, dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["proj", "square"],
        rank_pattern={"square": 2}, alpha_pattern={"blocks.1.proj": 3},
    )),
    "dora": (LINEAR, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed", "proj", "square"])),
    "fan_in_fan_out": (CONV1D, dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["conv", "conv_sq"])),
    "fan_in_fan_out_dora": (CONV1D, dict(r=2, lora_alpha=4, fan_in_fan_out=True, use_dora=True,
                                         target_modules=["conv", "conv_sq"])),
    "mixed": (MIXED, dict(r=4, lora_alpha=8, target_modules=["proj", "conv"])),
}


def _peft_adapter(peft, case, directory):
    """Build, randomize and save a PEFT adapter; return (base state dict, PEFT's merged state dict)."""
    kinds, options = CASES[case]
    torch.manual_seed(0)
    model = Tiny(kinds)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    with warnings.catch_warnings():  # e.g. PEFT setting fan_in_fan_out per layer class
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:  # PEFT initializes B (embeddings: A) to zero: make every update non-zero
                param.copy_(1 + 0.2 * torch.randn_like(param) if "magnitude" in name else torch.randn_like(param))
    wrapped.save_pretrained(directory)
    merged = {name: t.detach().clone() for name, t in wrapped.merge_and_unload().state_dict().items()}
    return base, merged


def _check_against_peft(directory, base, merged, *, shape_of=True):
    shapes = (lambda name: base[name].shape) if shape_of else None
    modules = lora_modules(open_adapter(directory), NameIndex(base), shape_of=shapes)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert {m.base_name for m in modules} == changed
    for module in modules:
        ours = merged_weight(module, base[module.base_name])
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, merged[module.base_name], rtol=1e-5, atol=1e-5, msg=module.base_name)
    return modules


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft(peft, case, tmp_path):
    base, merged = _peft_adapter(peft, case, tmp_path)
    modules = _check_against_peft(tmp_path, base, merged)
    if case != "mixed":  # the config's flag alone decides the layout when the base shapes are not consulted
        _check_against_peft(tmp_path, base, merged, shape_of=False)
    if case == "patterns":
        by_name = {m.base_name: m for m in modules}
        assert by_name["blocks.1.proj.weight"].lora_A.shape[0] == 2
        assert by_name["blocks.1.proj.weight"].scaling == 7 / 2
        assert by_name["blocks.0.proj.weight"].scaling == 3 / 4
        assert by_name["blocks.0.square.weight"].scaling == 5 / 3
        assert by_name["blocks.1.square.weight"].scaling == 8 / 3
        assert by_name["embed.weight"].embedding and by_name["embed.weight"].fan_in_fan_out


def _with_adapter_name(key):
    """PEFT's in-memory name of a saved key (adapter "default")."""
    if key.endswith("lora_magnitude_vector"):
        return key + ".default.weight"
    return key.removesuffix(".weight") + ".default" + (".weight" if key.endswith(".weight") else "")


KEY_FORMATS = {  # other spellings of the same tensors: PEFT's in-memory names, and a magnitude with ".weight"
    "adapter_name": _with_adapter_name,
    "magnitude_weight": lambda k: k + ".weight" if k.endswith("lora_magnitude_vector") else k,
}


@pytest.mark.parametrize("spelling", sorted(KEY_FORMATS))
def test_key_formats(peft, spelling, tmp_path):
    base, merged = _peft_adapter(peft, "dora", tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({KEY_FORMATS[spelling](k): v for k, v in load_file(file).items()}, file)
    _check_against_peft(tmp_path, base, merged)


# --- config and key checks (no PEFT needed) ----------------------------------------------------------------------

BASE = {
    "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 6),
    "model.layers.0.mlp.down_proj.weight": torch.zeros(6, 5),
}


def _adapter(directory, rank=2, **config_changes):
    g = torch.Generator().manual_seed(0)
    modules = {
        name.removesuffix(".weight"): (torch.randn(rank, t.shape[1], generator=g),
                                       torch.randn(t.shape[0], rank, generator=g))
        for name, t in BASE.items()
    }
    write_peft_adapter(directory, modules, r=rank, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key, value in config_changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    return directory


def _modules(directory, base=BASE):
    return lora_modules(open_adapter(directory), NameIndex(base), shape_of=lambda n: base[n].shape)


def test_synthetic_adapter_merge(tmp_path):
    modules = _modules(_adapter(tmp_path))
    assert [m.base_name for m in modules] == sorted(BASE)
    for m in modules:
        assert m.scaling == 2.0 and not m.fan_in_fan_out and m.magnitude is None and not m.embedding
        torch.testing.assert_close(delta_weight(m), 2.0 * m.lora_B @ m.lora_A)
        torch.testing.assert_close(merged_weight(m, torch.ones_like(BASE[m.base_name])), 1 + delta_weight(m))


@pytest.mark.parametrize("key", ["r", "lora_alpha"])
def test_config_without_key(tmp_path, key):
    with pytest.raises(InputError, match=rf"adapter_config.json: adapter config has no '{key}'$"):
        _modules(_adapter(tmp_path, **{key: None}))


@pytest.mark.parametrize("changes, problem", [
    (dict(r=3), r"adapter_model.safetensors: adapter module 'model.layers.0.\w+.\w+': .* rank r = 3"),
    (dict(rank_pattern={"down_proj": 4}), r"adapter_model.safetensors: .*'model.layers.0.mlp.down_proj'.* r = 4"),
    (dict(r=0), r"adapter_config.json: adapter config 'r' must be a positive integer, got 0"),
    (dict(peft_type="IA3"), r"adapter_config.json: adapter type is 'IA3'"),
    (dict(alpha_pattern={"q_(proj": 2}), r"adapter_config.json: .*'alpha_pattern' key 'q_\(proj' is not a regex"),
    (dict(use_dora=True), r"has no lora_magnitude_vector but the config sets use_dora"),
])
def test_bad_config(tmp_path, changes, problem):
    with pytest.raises(InputError, match=problem):
        _modules(_adapter(tmp_path, **changes))


def test_unmatched_modules(tmp_path):
    directory = _adapter(tmp_path)
    with pytest.raises(InputError, match=r"adapter_model.safetensors: adapter module 'model.layers.0.mlp.down_proj' "
                                         r"matches no tensor in the base checkpoint$"):
        _modules(directory, base={k: v for k, v in BASE.items() if "down" not in k})
    with pytest.raises(InputError, match=r"2 adapter modules \('model.layers.0.\w+.\w+', 'model.layers.0.\w+.\w+'\) "
                                         r"match no tensor"):
        _modules(directory, base={"other.weight": torch.zeros(8, 6)})


def _edit_tensors(directory, edit):
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return directory


def test_bad_tensors(tmp_path):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    directory = _edit_tensors(_adapter(tmp_path), lambda t: t.pop(f"{q}.lora_B.weight"))
    with pytest.raises(InputError, match=r"adapter module 'model.layers.0.self_attn.q_proj' has no lora_B"):
        _modules(directory)
    directory = _edit_tensors(_adapter(tmp_path), lambda t: t.update({f"{q}.lora_A.other.weight": torch.zeros(2, 6)}))
    with pytest.raises(InputError, match=r"several adapters \(<unnamed>, other\)"):
        _modules(directory)
    directory = _edit_tensors(_adapter(tmp_path), lambda t: t.update({f"{q}.lora_A.weight": torch.zeros(2, 7)}))
    with pytest.raises(InputError, match=r"updates a \[8, 7\] weight but base tensor '.*q_proj.weight' "
                                         r"has shape \[8, 6\]"):
        _modules(directory)


def test_ignored_tensors_warn(tmp_path):
    extra = {"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(3, 3),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(8)}
    directory = _edit_tensors(_adapter(tmp_path), lambda t: t.update(extra))
    with pytest.warns(UserWarning, match=r"ignoring 2 tensors .*lm_head.modules_to_save"):
        assert len(_modules(directory)) == 2


def test_merged_weight_shape_mismatch(tmp_path):
    module = _modules(_adapter(tmp_path))[0]
    with pytest.raises(InputError, match=rf"{module.base_name}: base weight has shape \[5, 6\]"):
        merged_weight(module, torch.zeros(5, 6))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_of_the_adapter_equals_scan_of_peft_merged_weights(peft, case, tmp_path):
    """End to end: scanning the adapter directory (plain LoRA kept factored as s·B·A in the analysed [out, in]
    orientation, Conv1D included; DoRA, embeddings and mixed ranks merged) gives the report of scanning the weights
    PEFT's own merge_and_unload produced. A full checkpoint's Conv1D weight is analysed as stored, [in, out], so
    its right side is the adapter scan's left side."""
    import lorafft

    base, merged = _peft_adapter(peft, case, tmp_path)
    options = dict(k=5, embeddings=True, eps=(0.5, 0.9), side="both")
    ours = lorafft.scan(base, tmp_path, **options)
    theirs = lorafft.scan(base, {name: merged[name] for name in base}, **options)
    flip = {"left": "right", "right": "left"}
    by_key = {(row.name, row.side): row for row in theirs.rows}
    assert ours.rows
    for row in ours.rows:
        conv1d = ".conv" in row.name
        expected = by_key[(row.name, flip[row.side] if conv1d else row.side)]
        assert row.counts == expected.counts, (row.name, row.side)
        assert row.max_cos == pytest.approx(expected.max_cos, abs=1e-5), (row.name, row.side)
        assert row.singular_values == pytest.approx(expected.singular_values, rel=1e-5), row.name
