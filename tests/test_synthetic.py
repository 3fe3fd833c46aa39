"""lorafft.synthetic: layouts as promised, determinism, realistic spectra, and the demo property (LoRA adds
intruder dimensions, the full fine-tune does not), measured with a plain fp64 SVD reference."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from lorafft.adapters import lora_modules, merged_weight
from lorafft.io import open_adapter, open_checkpoint
from lorafft.pairing import NameIndex
from lorafft.synthetic import (
    DECAY,
    full_finetune_update,
    lora_update,
    random_weight,
    write_checkpoint,
    write_trio,
)

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _read_dir(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``directory``, read with safetensors itself."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _max_cos(base: torch.Tensor, tuned: torch.Tensor, k: int = 10) -> torch.Tensor:
    """fp64 reference: for each of the top-k left singular vectors of ``tuned``, max |cos| over all of ``base``'s."""
    u_base = torch.linalg.svd(base.double(), full_matrices=False).U
    u_tuned = torch.linalg.svd(tuned.double(), full_matrices=False).U[:, :k]
    return (u_tuned.T @ u_base).abs().amax(dim=1)


@pytest.mark.parametrize("shape", [(256, 256), (64, 256), (688, 256)])
def test_random_weight_spectrum(shape):
    w = random_weight(*shape, generator=_generator(), sigma1=5.0)
    assert w.shape == shape and w.dtype == torch.float32
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s[:24], 5.0 * DECAY ** torch.arange(24, dtype=torch.float64), rtol=1e-5, atol=0)
    assert 0.5 < s[9] / s[0] < 0.95  # slow decay, like MiniLM's 3.94 / 5.27 = 0.75
    assert (s[1:11] / s[:10]).max() < 0.98  # gaps of a few %: small updates cannot reorder the top 10
    assert s[24] < s[23] * 0.95  # the bulk stays below the spikes


def test_random_weight_determinism_and_dtype():
    a = random_weight(48, 80, generator=_generator(1))
    assert torch.equal(a, random_weight(48, 80, generator=_generator(1)))
    assert not torch.equal(a, random_weight(48, 80, generator=_generator(2)))
    b = random_weight(48, 80, generator=_generator(1), dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b, a.to(torch.bfloat16))


def test_full_finetune_update_size():
    w = random_weight(128, 96, generator=_generator())
    delta = full_finetune_update(w, generator=_generator(1), strength=0.05)
    assert delta.shape == w.shape and delta.dtype == torch.float32
    assert delta.norm() / w.norm() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_update_singular_values(use_rslora):
    lora_a, lora_b = lora_update(64, 48, 3, generator=_generator(), lora_alpha=6, sigma=2.0, use_rslora=use_rslora)
    assert lora_a.shape == (3, 48) and lora_b.shape == (64, 3)
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    s = torch.linalg.svdvals((scaling * lora_b @ lora_a).double())
    torch.testing.assert_close(s[:3], 2.0 * DECAY ** torch.arange(3, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_write_checkpoint_layouts(tmp_path):
    g = _generator()
    state = {f"w{i}": torch.randn(16, 8, generator=g) for i in range(5)} | {"big": torch.randn(64, 16, generator=g)}
    single = write_checkpoint(state, tmp_path / "single", config={"model_type": "x"})
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((single / "config.json").read_text()) == {"model_type": "x"}

    sharded = write_checkpoint(state, tmp_path / "sharded", max_shard_bytes=1024)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) == 4  # 2 + 2 + 1 small tensors of 512 bytes, and "big" (4 KiB) alone
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    for file in files:
        with safe_open(str(sharded / file), framework="pt") as f:
            assert sorted(f.keys()) == sorted(n for n, shard in index["weight_map"].items() if shard == file)
    loaded = _read_dir(sharded)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[n], t) for n, t in state.items())


def test_trio_layout(trio):  # trio: conftest's session fixture, write_trio with its defaults
    index = json.loads((trio.base / "model.safetensors.index.json").read_text())
    base = _read_dir(trio.base)
    assert len(set(index["weight_map"].values())) >= 2
    assert index["weight_map"].keys() == base.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    config = json.loads((trio.base / "config.json").read_text())
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * 64
    assert (hidden, inter, kv, config["num_hidden_layers"]) == (256, 688, 64, 2)
    expected = {"model.embed_tokens.weight": (512, hidden), "lm_head.weight": (512, hidden),
                "model.norm.weight": (hidden,)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        expected |= {f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                     f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                     f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                     f"{p}.mlp.down_proj.weight": (hidden, inter),
                     f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,)}
    assert {name: tuple(t.shape) for name, t in base.items()} == expected

    full_index = json.loads((trio.full / "model.safetensors.index.json").read_text())
    assert full_index == index  # same names, same sharding
    full = _read_dir(trio.full)
    for name, t in base.items():
        assert torch.equal(full[name], t) == (t.ndim == 1), name

    adapter_config = json.loads((trio.lora / "adapter_config.json").read_text())
    assert {k: adapter_config[k] for k in ("peft_type", "r", "use_rslora", "fan_in_fan_out", "bias")} == \
        {"peft_type": "LORA", "r": 1, "use_rslora": False, "fan_in_fan_out": False, "bias": "none"}
    adapter = _read_dir(trio.lora)
    assert sorted(adapter) == sorted(f"base_model.model.model.layers.{layer}.{m}.lora_{ab}.weight"
                                     for layer in range(2) for m in MODULES for ab in "AB")
    modules = lora_modules(open_adapter(trio.lora), NameIndex(base), shape_of=lambda n: base[n].shape)
    assert sorted(m.base_name for m in modules) == sorted(n for n in base if n.split(".")[-2].endswith("proj"))


def test_trio_determinism(tmp_path):
    small = dict(hidden=64, intermediate=96, vocab=128, dtype=torch.bfloat16)
    first, again, other = (write_trio(tmp_path / name, seed=seed, **small) for name, seed in
                           (("a", 3), ("b", 3), ("c", 4)))
    for part in ("base", "full", "lora"):
        a, b, c = (_read_dir(getattr(t, part)) for t in (first, again, other))
        assert all(t.dtype == torch.bfloat16 for t in a.values())
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert not all(torch.equal(a[n], c[n]) for n in a)


def test_trio_demo_property(trio):
    """LoRA: an intruder (max |cos| < 0.5 among the top 10) in every adapted matrix; full fine-tune: none."""
    base, full = open_checkpoint(trio.base), open_checkpoint(trio.full)
    adapter = _read_dir(trio.lora)
    config = json.loads((trio.lora / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    for name in base.names():
        w0 = base.get(name)
        if w0.ndim != 2:
            continue
        assert (_max_cos(w0, full.get(name)) >= 0.5).all(), name
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in adapter:
            delta = scaling * adapter[f"{key}.lora_B.weight"].double() @ adapter[f"{key}.lora_A.weight"].double()
            assert (_max_cos(w0, w0.double() + delta) < 0.5).sum() == config["r"], name


def test_trio_adapter_merges_like_peft(trio):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trio.base)
    merged = peft.PeftModel.from_pretrained(model, trio.lora).merge_and_unload().state_dict()
    base = open_checkpoint(trio.base)
    modules = lora_modules(open_adapter(trio.lora), NameIndex(base.names()), shape_of=base.shape)
    assert len(modules) == 14
    for module in modules:
        torch.testing.assert_close(merged_weight(module, base.get(module.base_name)), merged[module.base_name],
                                   rtol=1e-5, atol=1e-5, msg=module.base_name)
