"""lorafft.intervene: W' = W0 + ΔW + (λ−1)·u σ vᵀ for the intruders (u, σ, v) of Wt, checked against fp64 SVDs of
the original files, with PEFT itself loading and merging the adapters written (PEFT is a test-only reference)."""

import dataclasses
import filecmp
import importlib
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorafft
import lorafft.cache
from lorafft.adapters import lora_modules, merged_weight
from lorafft.cli import main
from lorafft.errors import InputError
from lorafft.intervene import RECORD, intervene
from lorafft.io import open_adapter, open_checkpoint
from lorafft.pairing import NameIndex
from lorafft.synthetic import random_weight, write_checkpoint

from lorafft_fixtures import checkpoints

intervene_module = importlib.import_module("lorafft.intervene")
LAM = 0.5
RTOL = 1e-5  # fp32 accuracy, relative to the matrix's largest entry


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _tensors(directory) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as checkpoint:
        return {name: checkpoint.get(name) for name in checkpoint.names()}


def _rescaled_reference(W0, Wt, lam, *, eps=0.5, k=10, which="top"):
    """(W', ranks) from fp64 LAPACK SVDs: the intruders among Wt's top k left vectors at ε, rescaled by λ.
    W0, Wt: ``[out, in]`` in the analysed orientation."""
    W0, Wt = W0.double(), Wt.double()
    X = torch.linalg.svd(W0, full_matrices=False).U
    U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
    max_cos = (X.T @ U[:, :k]).abs().amax(dim=0)
    ranks = torch.nonzero(max_cos < eps).flatten().tolist()
    ranks = ranks[:1] if which == "top" else ranks
    update = (U[:, ranks] * S[ranks]) @ Vh[ranks]
    return Wt + (lam - 1) * update, ranks


def _assert_close(actual, expected, what):
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= RTOL * expected.abs().max().item(), f"{what}: max error {error:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapter (the synthetic trio: one intruder per adapted matrix)


@pytest.fixture(scope="module")
def lora_out(trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("intervene") / "lora"
    return out, intervene(trio.base, trio.lora, out, lam=LAM)


@pytest.fixture(scope="module")
def lora_reference(trio):
    """{base name: (W' fp64, ranks)} from the original files: W0 + s·B·A in fp64, s = α/r = 2."""
    base = _tensors(trio.base)
    adapter = load_file(trio.lora / "adapter_model.safetensors")
    reference = {}
    for key in {name.removesuffix(".lora_A.weight") for name in adapter if name.endswith(".lora_A.weight")}:
        name = key.removeprefix("base_model.model.") + ".weight"
        B, A = adapter[key + ".lora_B.weight"].double(), adapter[key + ".lora_A.weight"].double()
        Wt = base[name].double() + 2.0 * B @ A
        reference[name] = _rescaled_reference(base[name], Wt, LAM)
    return reference


def test_adapter_loads_in_peft_and_merges_to_the_formula(peft, trio, lora_out, lora_reference):
    from transformers import LlamaForCausalLM

    out, summary = lora_out
    assert summary.tuned_kind == "lora" and summary.rescaled == 14
    assert all(m.lora_rank == [1, 2] and [d.rank for d in m.rescaled] == lora_reference[m.name][1]
               for m in summary.matrices)
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((trio.lora / "adapter_config.json").read_text())
    assert {k: v for k, v in config.items() if not k.endswith("_pattern")} == \
        {k: v for k, v in original.items() if not k.endswith("_pattern")}
    assert len(config["rank_pattern"]) == 14 and set(config["rank_pattern"].values()) == {2}
    assert set(config["alpha_pattern"].values()) == {4}  # α' = s·r' = 2·2: the scaling stays 2

    model = LlamaForCausalLM.from_pretrained(trio.base)
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. PEFT's "rank_pattern keys did not match"
        merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    base = _tensors(trio.base)
    for name, tensor in base.items():
        if name in lora_reference:
            _assert_close(merged[name], lora_reference[name][0], name)
        else:
            assert torch.equal(merged[name], tensor), name

    with open_checkpoint(trio.base) as checkpoint:  # lorafft's own merge of the written files agrees
        modules = lora_modules(open_adapter(out), NameIndex(checkpoint.names()), checkpoint.shape)
        assert len(modules) == 14
        for module in modules:
            _assert_close(merged_weight(module, checkpoint.get(module.base_name)),
                          lora_reference[module.base_name][0], module.base_name)


def test_rescan_shows_lambda_sigma(trio, lora_out):
    """W' has Wt's singular triplets with σ_j replaced by λσ_j: the intruder is still there, λ times weaker."""
    out, summary = lora_out
    before = {row.name: row for row in lorafft.scan(trio.base, trio.lora, k=12).rows}
    after = {row.name: row for row in lorafft.scan(trio.base, out, k=12).rows}
    for matrix in summary.matrices:
        (dimension,) = matrix.rescaled
        old, new = before[matrix.name], after[matrix.name]
        assert old.singular_values[dimension.rank] == pytest.approx(dimension.sigma_before, rel=1e-6)
        position = min(range(12), key=lambda j: abs(new.singular_values[j] - LAM * dimension.sigma_before))
        assert new.singular_values[position] == pytest.approx(LAM * dimension.sigma_before, rel=1e-5)
        assert new.max_cos[position] == pytest.approx(dimension.max_cos, abs=1e-4)  # the same vector
        others = [s for j, s in enumerate(old.singular_values) if j != dimension.rank]
        kept = [s for j, s in enumerate(new.singular_values) if j != position]
        assert kept[:10] == pytest.approx(others[:10], rel=1e-5)  # every other singular value unchanged
        assert new.counts["0.5"] == old.counts["0.5"] == 1


def test_scope_leaves_other_modules_untouched(trio, tmp_path):
    out = tmp_path / "out"
    summary = intervene(trio.base, trio.lora, out, lam=0.0, include=[r"layers\.1\.self_attn\.q_proj"])
    assert [m.name for m in summary.matrices] == ["model.layers.1.self_attn.q_proj.weight"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 2}
    original, written = load_file(trio.lora / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert written.keys() == original.keys()
    changed = {name for name in original
               if not torch.equal(original[name].view(torch.uint8), written[name].view(torch.uint8))}
    assert changed == {f"base_model.model.model.layers.1.self_attn.q_proj.lora_{x}.weight" for x in "AB"}
    for name in changed:  # the original factors are kept bit for bit, the new rank-1 part appended
        rows = original[name].shape[0]
        kept = written[name][:rows] if name.endswith("lora_A.weight") else written[name][:, :1]
        assert torch.equal(kept, original[name])


# ---------------------------------------------------------------------------------------------------------------
# Full fine-tunes


@pytest.fixture(scope="module")
def merged_lora(trio, tmp_path_factory):
    """A full checkpoint that has intruders: the trio's base with the LoRA update merged, sharded like the base."""
    base = _tensors(trio.base)
    adapter = load_file(trio.lora / "adapter_model.safetensors")
    tuned = dict(base)
    for name in adapter:
        if name.endswith(".lora_A.weight"):
            key = name.removesuffix(".lora_A.weight")
            target = key.removeprefix("base_model.model.") + ".weight"
            tuned[target] = base[target] + 2.0 * adapter[key + ".lora_B.weight"] @ adapter[name]
    directory = tmp_path_factory.mktemp("merged")
    config = json.loads((trio.base / "config.json").read_text())
    write_checkpoint(tuned, directory, max_shard_bytes=sum(t.numel() * 4 for t in tuned.values()) // 2, config=config)
    (directory / "tokenizer.json").write_text("{}")
    return directory


def _header(file):
    with safe_open(file, framework="pt") as f:
        return f.metadata(), {name: f.get_slice(name).get_dtype() for name in f.keys()}


def test_full_finetune_same_layout_and_formula(trio, merged_lora, tmp_path):
    out = tmp_path / "out"
    summary = intervene(trio.base, merged_lora, out, lam=LAM, which="all", include=[r"layers\.0\."])
    assert summary.tuned_kind == "full" and summary.rescaled == 7
    files = sorted(os.listdir(merged_lora))
    assert sorted(os.listdir(out)) == sorted(files + [RECORD])
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert filecmp.cmp(merged_lora / name, out / name, shallow=False), name
    base, original, written = _tensors(trio.base), _tensors(merged_lora), _tensors(out)
    assert written.keys() == original.keys()
    for shard in (f for f in files if f.endswith(".safetensors")):
        assert _header(out / shard) == _header(merged_lora / shard)  # same tensors in each shard, dtypes, metadata
    unchanged_shards = 0
    for name, tensor in original.items():
        if name.startswith("model.layers.0.") and tensor.ndim == 2:
            expected, ranks = _rescaled_reference(base[name], tensor, LAM, which="all")
            assert len(ranks) == 1
            _assert_close(written[name], expected, name)
        else:
            assert torch.equal(written[name].view(torch.uint8), tensor.view(torch.uint8)), name
    for shard in (f for f in files if f.endswith(".safetensors")):
        unchanged_shards += filecmp.cmp(merged_lora / shard, out / shard, shallow=False)
    assert unchanged_shards >= 1  # shards without a changed matrix are plain copies


def test_no_intruders_changes_nothing(trio, tmp_path):
    """The full fine-tune has no intruders at ε = 0.5: every file is a byte-for-byte copy."""
    out = tmp_path / "out"
    summary = intervene(trio.base, trio.full, out, lam=LAM, which="all")
    assert summary.rescaled == 0 and len(summary.matrices) == 14
    for name in os.listdir(trio.full):
        assert filecmp.cmp(trio.full / name, out / name, shallow=False), name
    assert json.loads((out / RECORD).read_text())["rescaled_total"] == 0


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    generator = torch.Generator().manual_seed(1)
    base = {"layers.0.q.weight": random_weight(48, 64, generator=generator).to(torch.bfloat16),
            "layers.0.norm.weight": torch.ones(48, dtype=torch.bfloat16)}
    u, v = (torch.linalg.qr(torch.randn(n, 1, generator=generator)).Q for n in (48, 64))
    spike = 8.0 * u @ v.T  # a new top singular direction: an intruder
    tuned = {**base, "layers.0.q.weight": (base["layers.0.q.weight"].float() + spike).to(torch.bfloat16)}
    write_checkpoint(base, tmp_path / "base")
    write_checkpoint(tuned, tmp_path / "tuned")
    summary = intervene(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", lam=0.25)
    assert summary.rescaled == 1
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert {name: t.dtype for name, t in written.items()} == {name: torch.bfloat16 for name in base}
    expected, _ = _rescaled_reference(base["layers.0.q.weight"], tuned["layers.0.q.weight"], 0.25)
    error = (written["layers.0.q.weight"].double() - expected).abs().max().item()
    assert error <= 2 ** -8 * expected.abs().max().item()  # one bf16 rounding
    assert torch.equal(written["layers.0.norm.weight"], base["layers.0.norm.weight"])


# ---------------------------------------------------------------------------------------------------------------
# PEFT variants: DoRA, fan_in_fan_out (GPT-2 Conv1D), embeddings, rsLoRA with patterns, suffix-named modules


def _conv1d(out_features, in_features):
    from transformers.pytorch_utils import Conv1D  # weight stored [in, out]

    return Conv1D(out_features, in_features)


class Tiny(nn.Module):
    """An embedding, a top-level ``proj`` and two blocks; ``blocks.i.proj`` ends with the name ``proj``."""

    def __init__(self, conv: bool):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.proj = _conv1d(16, 16) if conv else nn.Linear(16, 16)  # one layer class per run: see lorafft.adapters
        make = (lambda: _conv1d(24, 16)) if conv else (lambda: nn.Linear(16, 24))
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": make(), "square": nn.Linear(16, 16)}) for _ in range(2))


VARIANTS = {
    "dora_embedding": (False, dict(r=2, lora_alpha=4, use_dora=True, target_modules=["embed", "proj", "square"]), ()),
    "dora_fan_in_fan_out": (True, dict(r=2, lora_alpha=4, use_dora=True, fan_in_fan_out=True,
                                       target_modules=["proj"]), ()),
    # only the top-level "proj" changes; its key must not reach "blocks.i.proj" (nor the old patterns' modules)
    "rslora_patterns_suffix": (False, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["proj", "square"],
                                           rank_pattern={"square": 2}, alpha_pattern={"blocks.1.proj": 3}),
                               (r"^proj\.",)),
}


def _storage_to_analysed(name, tensor, model):
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name.removesuffix(".weight"))
    return tensor.T if isinstance(module, Conv1D) else tensor


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_variants(peft, variant, tmp_path):
    conv, options, include = VARIANTS[variant]
    torch.manual_seed(0)
    model = Tiny(conv)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param) if "magnitude" in name else torch.randn_like(param))
    wrapped.save_pretrained(tmp_path / "adapter")
    original = {n: t.detach().clone() for n, t in wrapped.merge_and_unload().state_dict().items()}

    k, lam = 3, 0.3  # ε = 1 makes all top-k vectors "intruders": the rescaled set does not hinge on rounding
    summary = intervene(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out", lam=lam, which="all",
                        eps=1.0, k=k, include=include, embeddings=True)
    changed = {m.name for m in summary.matrices if m.rescaled}
    assert changed and all(len(m.rescaled) == k for m in summary.matrices if m.rescaled)

    torch.manual_seed(0)
    fresh = Tiny(conv)
    fresh.load_state_dict(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", RuntimeWarning)  # PEFT's unmatched rank_pattern / alpha_pattern keys
        merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").merge_and_unload().state_dict()
    for name, tensor in original.items():
        if name in changed:
            W0 = _storage_to_analysed(name, base[name], fresh)
            expected, ranks = _rescaled_reference(W0, _storage_to_analysed(name, tensor, fresh), lam, eps=1.0, k=k,
                                                  which="all")
            _assert_close(_storage_to_analysed(name, merged[name], fresh), expected, name)
        else:
            _assert_close(merged[name], tensor, name)
    if variant == "rslora_patterns_suffix":
        assert changed == {"proj.weight"}
        config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert list(config["rank_pattern"]) == [r"blocks\.0\.proj", r"blocks\.1\.proj", "proj", "square"]
        assert config["rank_pattern"]["proj"] == 4 + k


# ---------------------------------------------------------------------------------------------------------------
# Command line and bad input


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as usage_error:  # an argument argparse refuses (its type check): one line, exit 2
        code = usage_error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_adapter_and_prints_summary(trio, tmp_path, capsys):
    """The summary, each rescaled σ before and after, and what a scan of the output will show (the claims
    test_rescan_shows_lambda_sigma checks), with the command that checks it, which runs."""
    code, stdout, _ = _run(capsys, "intervene", trio.base, trio.lora, "--lambda", "0.5", "--out", tmp_path / "o",
                           "--quiet")
    assert code == 0
    assert "rescaled 14 in 14 matrices" in stdout and str(tmp_path / "o") in stdout
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
    record = json.loads((tmp_path / "o" / RECORD).read_text())
    first = next(m for m in record["matrices"] if m["rescaled"])["rescaled"][0]
    assert f"σ{first['rank']} {first['sigma_before']:.4g}->{first['sigma_after']:.4g}" in stdout
    assert "What to expect: in the output, each rescaled vector keeps its direction, so its max|cos|" in stdout
    assert "λ·σ, smaller: a rescaled vector moves down the spectrum" in stdout
    (check,) = [line for line in stdout.splitlines() if line.startswith("Check: lorafft scan ")]
    assert check == f"Check: lorafft scan {trio.base} {tmp_path / 'o'} --eps 0.5 --k 10"
    code, stdout, _ = _run(capsys, *check.split()[2:], "--quiet")
    assert code == 0 and "ε=0.5: 14" in stdout  # the λσ intruders, still among the top 10


def test_cli_says_what_to_expect_for_every_lambda(trio, lora_out):
    from lorafft.cli.intervene import expectation

    _, summary = lora_out
    for lam, words in ((0.0, "0: those directions are gone"), (2.0, "λ·σ, larger: a rescaled vector moves up"),
                       (1.0, "Nothing changed: λ = 1")):
        assert words in expectation(dataclasses.replace(summary, lam=lam))
    nothing = dataclasses.replace(summary, matrices=[dataclasses.replace(m, rescaled=[]) for m in summary.matrices])
    assert "Nothing changed: no intruder was found" in expectation(nothing)


def test_cli_reads_a_base_cache_and_writes_the_same_adapter(trio, tmp_path, capsys, monkeypatch):
    assert _run(capsys, "cache", "build", trio.base, "--out", tmp_path / "cache", "--quiet")[0] == 0
    computed = []
    monkeypatch.setattr(lorafft.cache.linalg, "base_basis", lambda *a, **k: computed.append(1))  # must not run
    code, _, _ = _run(capsys, "intervene", trio.base, trio.lora, "--lambda", "0.5", "--out", tmp_path / "cached",
                      "--base-cache", tmp_path / "cache", "--device", "cpu", "--backend", "torch", "--quiet")
    assert code == 0 and not computed
    monkeypatch.undo()
    assert _run(capsys, "intervene", trio.base, trio.lora, "--lambda", "0.5", "--out", tmp_path / "fresh",
                "--quiet")[0] == 0
    cached, fresh = (load_file(tmp_path / out / "adapter_model.safetensors") for out in ("cached", "fresh"))
    assert cached.keys() == fresh.keys()
    for name in cached:  # the same triplets to the certified fp64 tolerance (the cached basis is fp32)
        torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("problem", ["non_empty", "negative_lambda", "bin_checkpoint"])
def test_cli_bad_input(trio, tmp_path, capsys, problem):
    out, tuned, lam = tmp_path / "out", trio.lora, "0.5"
    if problem == "non_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif problem == "negative_lambda":
        lam = "-1"
    else:
        tuned = tmp_path / "bin"
        tuned.mkdir()
        torch.save(_tensors(trio.full), tuned / "pytorch_model.bin")
    code, stdout, stderr = _run(capsys, "intervene", trio.base, tuned, "--lambda", lam, "--out", out, "--quiet")
    assert code == 2 and stdout == ""
    assert stderr.startswith("lorafft: error: ") and stderr.count("\n") == 1, stderr
    assert not out.exists() or os.listdir(out) == ["keep.txt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lorafft-")]


def test_failed_write_leaves_nothing(trio, tmp_path, monkeypatch):
    def fail(*args):
        raise InputError("shard", "disk full")

    monkeypatch.setattr(intervene_module, "_write_checkpoint", fail)
    with pytest.raises(InputError, match="disk full"):
        intervene(trio.base, trio.full, tmp_path / "out", lam=LAM)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stored", ["fp8", "stacked_experts"])
def test_views_are_refused_before_any_analysis(tmp_path, capsys, monkeypatch, stored):
    """A full fine-tune whose matrices in scope are read as views (FP8 dequantized, one expert of a stacked tensor)
    cannot be written back: refused, naming the file, before the analysis or any SVD runs."""
    if stored == "fp8":
        generator = torch.Generator().manual_seed(0)
        base = {f"model.layers.0.mlp.{m}_proj.weight": random_weight(48, 32, generator=generator) for m in "ug"}
        tuned = checkpoints.write_fp8_checkpoint({n: 1.1 * w for n, w in base.items()}, tmp_path / "tuned")
    else:
        base = checkpoints.moe_state_dict(seed=0)
        tuned = write_checkpoint(checkpoints.moe_state_dict(seed=1), tmp_path / "tuned")
    monkeypatch.setattr(intervene_module._EditFinder, "find", lambda *a: pytest.fail("analysed before refusing"))
    monkeypatch.setattr(lorafft.linalg, "truncated_svd", lambda *a, **k: pytest.fail("SVD before refusing"))
    monkeypatch.setattr(lorafft.cache.linalg, "base_basis", lambda *a, **k: pytest.fail("SVD before refusing"))
    with pytest.raises(InputError, match=r"intervene cannot rewrite '([^']+)': it is stored FP8-quantized or "
                                         r"stacked per expert \(leave such tensors out with --exclude\)$") as error:
        intervene(base, tuned, tmp_path / "out", lam=LAM)
    name = error.value.problem.split("'")[1]
    with open_checkpoint(tuned) as checkpoint:
        assert checkpoint.is_view(name) and error.value.path == checkpoint.file_of(name)
    base_dir = write_checkpoint(base, tmp_path / "base")
    code, stdout, stderr = _run(capsys, "intervene", base_dir, tuned, "--lambda", "0.5", "--out", tmp_path / "o")
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "cannot rewrite" in stderr
    assert sorted(os.listdir(tmp_path)) == ["base", "tuned"]
