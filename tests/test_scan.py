"""scan() end to end on written checkpoints, against an fp64 oracle that reads the files on its own."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lorafft
from lorafft.report import Report


def _load_dir(directory):
    """All tensors of a sharded safetensors directory, read with the safetensors library alone."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / shard))
    return tensors


def _oracle(W0, Wt, k, side):
    """The paper's definition with fp64 LAPACK SVDs: max over all base vectors of |cos|, and its argmax."""
    U0, _, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    Ut, St, Vth = torch.linalg.svd(Wt.double(), full_matrices=False)
    X, Y = (U0, Ut[:, :k]) if side == "left" else (V0h.T, Vth[:k].T)
    cosines = (X.T @ Y).abs()
    return cosines.max(0).values, St


def _merged_lora(base, adapter_dir):
    """W0 + (alpha/r) B A for every adapted module, straight from the adapter files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    merged = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            merged[module + ".weight"] = base[module + ".weight"].double() + scale * B.double() @ A.double()
    return merged


def _check_rows(report, base, tuned, eps):
    assert report.rows
    for row in report.rows:
        reference, St = _oracle(base[row.name], tuned[row.name], row.k, row.side)
        assert row.singular_values == pytest.approx(St[: row.k].tolist(), rel=1e-5)
        gaps = torch.minimum((St[: row.k] - St[1 : row.k + 1]).abs(), (St[: row.k] - torch.cat([St[:1] * 2, St[: row.k - 1]])).abs())
        separated = gaps > 1e-3 * St[0]
        error = (torch.tensor(row.max_cos, dtype=torch.float64) - reference).abs()
        assert error[separated].max() < 1e-4, row.name
        if not (reference - eps).abs().lt(1e-3).any():
            assert row.counts["0.5"] == int((reference < eps).sum()), row.name


def test_scan_full_finetune_matches_fp64_and_has_no_intruders(trio):
    report = lorafft.scan(trio.base, trio.full, side="both")
    base, tuned = _load_dir(trio.base), _load_dir(trio.full)
    _check_rows(report, base, tuned, 0.5)
    names = {row.name for row in report.rows}
    expected = {n for n, t in base.items() if t.dim() == 2 and "embed" not in n and "lm_head" not in n}
    assert names == expected
    assert report.totals()["0.5"] == sum(r.counts["0.5"] for r in report.rows)
    assert report.totals()["0.5"] <= 2


def test_scan_lora_adapter_matches_fp64_and_finds_intruders(trio):
    report = lorafft.scan(trio.base, trio.lora, eps=(0.5, 0.7, 0.9))
    base = _load_dir(trio.base)
    merged = _merged_lora(base, trio.lora)
    assert {row.name for row in report.rows} == set(merged)
    _check_rows(report, base, merged, 0.5)
    assert all(row.counts["0.5"] >= 1 for row in report.rows)
    assert report.inputs["tuned_kind"] == "lora"


def test_scan_state_dicts_with_prefixes_filters_and_shape_mismatch():
    generator = torch.Generator().manual_seed(3)
    base = {f"model.layers.{i}.{m}.weight": torch.randn(40, 30, generator=generator) for i in range(2) for m in ("q", "k")}
    base["model.embed_tokens.weight"] = torch.randn(50, 30, generator=generator)
    base["model.norm.weight"] = torch.ones(30)
    tuned = {"base_model.model." + n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in base.items()}
    tuned["base_model.model.model.layers.1.k.weight"] = torch.randn(41, 30, generator=generator)
    with pytest.warns(UserWarning, match="shape"):
        report = lorafft.scan(base, tuned, k=5, exclude=[r"layers\.0\.k"])
    assert sorted(r.name for r in report.rows) == ["model.layers.0.q.weight", "model.layers.1.q.weight"]
    assert report.rows[0].tuned_name == "base_model.model.model.layers.0.q.weight"
    assert report.rows[0].layer == 0 and report.rows[0].module == "q"
    assert [s["name"] for s in report.skipped] == ["model.layers.1.k.weight"]
    with_embeddings = lorafft.scan(base, tuned, k=5, include=["embed"], embeddings=True)
    assert [r.name for r in with_embeddings.rows] == ["model.embed_tokens.weight"]
    with pytest.raises(lorafft.InputError, match="shape"):
        lorafft.scan(base, tuned, k=5, strict=True)


def test_report_round_trips_through_json_csv_and_pandas(trio, tmp_path):
    report = lorafft.scan(trio.base, trio.lora, eps=(0.5, 0.9), include=[r"layers\.0\.self_attn"])
    path = tmp_path / "report.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert set(data["totals"]) == {"0.5", "0.9"}
    assert data["inputs"]["base"] == str(trio.base)
    assert {"torch", "numpy", "safetensors", "lorafft"} <= set(data["versions"])
    row = data["matrices"][0]
    for key in ("name", "side", "shape", "k", "singular_values", "max_cos", "argmax", "error_bound", "counts"):
        assert key in row
    again = Report.from_dict(data)
    assert [r.max_cos for r in again.rows] == [r.max_cos for r in report.rows]
    csv_path = tmp_path / "report.csv"
    report.save(csv_path)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + len(report.rows) and "intruders@0.9" in lines[0]
    frame = report.to_pandas()
    assert list(frame["intruders@0.5"]) == [r.counts["0.5"] for r in report.rows]
