"""The base-spectrum cache: same report as without it, refused when built from another model, fp32 on disk."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafft
from lorafft import linalg, synthetic
from lorafft.cache import BaseCache, fingerprint
from lorafft.cli import main


def _rows(report):
    return [(r.name, r.checkpoint, r.side, r.counts, r.argmax) for r in report.rows]


def test_cached_scan_equals_uncached_and_skips_the_base_work(trio, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", "build", str(trio.base), "--out", str(cache), "--quiet"]) == 0
    assert "14 base bases" in capsys.readouterr().out  # 7 projections x 2 layers; embeddings and lm_head left out
    fresh = lorafft.scan(trio.base, trio.lora, side="both")
    monkeypatch.setattr(linalg, "base_basis", lambda *a, **k: pytest.fail("base basis recomputed despite the cache"))
    cached = lorafft.scan(trio.base, trio.lora, side="both", base_cache=cache)
    assert _rows(cached) == _rows(fresh)
    for mine, theirs in zip(cached.rows, fresh.rows):
        assert mine.max_cos == pytest.approx(theirs.max_cos, abs=1e-6)  # fp32 basis on disk
        assert mine.base_singular_values == pytest.approx(theirs.base_singular_values, rel=1e-12)


def test_cache_written_during_a_scan_is_fp32_and_fingerprinted(trio, tmp_path):
    cache = tmp_path / "cache"
    lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.mlp"], write_base_cache=cache)
    index = json.loads((cache / "lorafft-base-cache.json").read_text())
    entries = {entry["name"]: entry for entry in index["entries"]}
    assert sorted(entries) == [f"model.layers.0.mlp.{m}_proj.weight" for m in ("down", "gate", "up")]
    entry = entries["model.layers.0.mlp.gate_proj.weight"]
    assert (entry["orientation"], entry["shape"], entry["side"], entry["dtype"]) == (
        "stored", [688, 256], "right", "torch.float32")
    tensors = load_file(cache / entry["file"])
    assert tensors["basis"].dtype == torch.float32 and tensors["basis"].shape == (256, 256)
    with lorafft.io.open_checkpoint(trio.base) as base:
        W0 = base.get("model.layers.0.mlp.gate_proj.weight")
    assert entry["fingerprint"] == fingerprint(W0)
    _, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)  # 688x256: the small side is the right one
    overlap = (tensors["basis"].double().T @ Vh.T).abs()
    assert torch.allclose(overlap.diagonal(), torch.ones(256, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(tensors["sigma"], S, rtol=1e-10)


def test_cache_from_another_model_is_refused(trio, tmp_path, capsys):
    other = synthetic.write_trio(tmp_path / "other", seed=7)
    cache = tmp_path / "cache"
    lorafft.scan(other.base, other.full, include=[r"layers\.0\.self_attn\.q"], write_base_cache=cache)
    with pytest.raises(lorafft.InputError, match="another base model"):
        lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn\.q"], base_cache=cache)
    out = tmp_path / "r.json"
    code = main(["scan", str(trio.base), str(trio.full), "--base-cache", str(cache), "--out", str(out), "--quiet"])
    assert code == 2 and not out.exists()
    assert "lorafft-base-cache.json" in capsys.readouterr().err
    assert main(["scan", str(trio.base), str(trio.full), "--base-cache", str(tmp_path / "nowhere"), "--quiet"]) == 2


def test_missing_entries_are_computed(trio, tmp_path):
    cache = tmp_path / "cache"
    lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn\.q"], write_base_cache=cache)
    report = lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn"], base_cache=cache)
    assert len(report.rows) == 4
    assert BaseCache(cache).names == {"model.layers.0.self_attn.q_proj.weight"}


@pytest.mark.parametrize("tamper", ["entries list", "no fingerprint", "path in file", "shape", "entry tensors",
                                    "orientation", "format 1", "NaN in a tail vector"])
def test_tampered_cache_is_one_line_input_error(trio, tmp_path, capsys, tamper):
    """A cache index or entry file that is not what ``cache build`` writes: one line naming the file, exit 2."""
    cache = tmp_path / "cache"
    include = [r"layers\.0\.self_attn\.q"]
    lorafft.scan(trio.base, trio.full, include=include, write_base_cache=cache)
    index_path = cache / "lorafft-base-cache.json"
    index = json.loads(index_path.read_text())
    entry, = index["entries"]
    if tamper == "entries list":
        index["entries"] = {entry["name"]: entry}
    elif tamper == "no fingerprint":
        del entry["fingerprint"]
    elif tamper == "path in file":
        entry["file"] = str(cache / entry["file"])
    elif tamper == "shape":
        entry["shape"] = [256, "256"]
    elif tamper == "orientation":
        entry["orientation"] = "sideways"
    elif tamper == "format 1":
        index["format_version"] = 1
    elif tamper == "NaN in a tail vector":  # not among the vectors checked against W0: the finite check finds it
        tensors = load_file(cache / entry["file"])
        tensors["basis"][:, -1] = float("nan")
        save_file(tensors, str(cache / entry["file"]))
    else:
        save_file({"basis": load_file(cache / entry["file"])["basis"]}, str(cache / entry["file"]))  # no sigma
    index_path.write_text(json.dumps(index))
    out = tmp_path / "r.json"
    code = main(["scan", str(trio.base), str(trio.full), "--include", *include, "--base-cache", str(cache),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and len(err) == 1, err
    assert ("lorafft-base-cache.json" if tamper not in ("entry tensors", "NaN in a tail vector")
            else entry["file"]) in err[0]
