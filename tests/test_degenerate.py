"""Degenerate matrices are said, not counted: empty weights are skipped, rank-deficient bases flag the vectors whose
intruder status depends on the arbitrary completion of the base basis (checked against fp64 numpy SVDs)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorafft
from lorafft.cli import main
from lorafft.intervene import intervene

EPS = (0.3, 0.5, 0.9)


def _expected(W0, Wt, rank, k, side):
    """fp64 oracle: max |cos| over the base's ρ defined singular vectors, the length outside their span, and the
    certain/undetermined counts per ε (the rule in lorafft.analysis._defined_match)."""
    U0, _, V0t = np.linalg.svd(W0.double().numpy(), full_matrices=False)
    Ut, _, Vtt = np.linalg.svd(Wt.double().numpy(), full_matrices=False)
    base, tuned = (U0, Ut) if side == "left" else (V0t.T, Vtt.T)
    cos = base[:, :rank].T @ tuned[:, :k]  # [ρ, k]
    best = np.abs(cos).max(axis=0) if rank else np.zeros(k)
    outside = np.sqrt(np.clip(1 - (cos**2).sum(axis=0), 0, None))
    certain = np.stack([(best < e) & (outside < e) for e in EPS], axis=-1)  # [k, E]
    unsure = [int(((best < e) & (outside >= e)).sum()) for e in EPS]
    return best, certain, unsure


def _low_rank_weight(m, n, rank, generator):
    return (torch.randn(m, rank, generator=generator, dtype=torch.float64)
            @ torch.randn(rank, n, generator=generator, dtype=torch.float64)).float()


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("side", ["left", "right"])
def test_rank_deficient_base_counts_only_certain_intruders(rank, side):
    generator = torch.Generator().manual_seed(11 + rank)
    m, n, k = 24, 40, 6
    W0 = _low_rank_weight(m, n, rank, generator) if rank else torch.zeros(m, n)
    Wt = W0 + 0.5 * torch.randn(m, n, generator=generator)
    result = lorafft.analyze(W0, Wt, k=k, eps=EPS, sides=(side,))[side]
    best, certain, unsure = _expected(W0, Wt, rank, k, side)
    counts = certain.sum(axis=0).tolist()
    assert int(result.base_rank[0]) == rank
    np.testing.assert_allclose(result.max_cos[0].numpy(), best, atol=1e-5)
    assert result.counts[0].tolist() == counts and result.undetermined[0].tolist() == unsure
    assert (result.intruders[0].numpy() == certain).all()  # per vector: what intervene rescales
    if rank == 0:  # nothing of a zero base is defined: every vector is undetermined at every ε, none counted
        assert unsure == [k] * len(EPS) and counts == [0] * len(EPS)


def test_full_rank_base_has_no_undetermined_vectors():
    generator = torch.Generator().manual_seed(3)
    W0 = torch.randn(20, 30, generator=generator)
    result = lorafft.analyze(W0, W0 + 0.1 * torch.randn(20, 30, generator=generator), k=5, eps=EPS)["left"]
    assert int(result.base_rank[0]) == 20 and result.undetermined.sum() == 0


def _checkpoint(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_zero_base_and_empty_weight_are_said_in_the_report(tmp_path, capsys):
    generator = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.zeros(16, 24), "b.weight": torch.randn(16, 24, generator=generator),
            "e.weight": torch.zeros(0, 24)}
    tuned = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
    out = tmp_path / "report.json"
    arguments = ["scan", str(_checkpoint(tmp_path / "base", base)), str(_checkpoint(tmp_path / "tuned", tuned)),
                 "--k", "4", "--out", str(out), "--quiet"]
    assert main(arguments) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["matrices"]}
    assert set(rows) == {"a.weight", "b.weight"}
    assert report["skipped"][0]["name"] == "e.weight" and "empty matrix" in report["skipped"][0]["reason"]
    assert rows["a.weight"]["base_rank"] == 0 and rows["a.weight"]["counts"] == {"0.5": 0}
    assert rows["a.weight"]["undetermined"] == {"0.5": 4}
    assert rows["b.weight"]["base_rank"] == 16 and rows["b.weight"]["undetermined"] == {"0.5": 0}
    assert "1 row has a rank-deficient base" in stdout and "ε=0.5: 4" in stdout


def test_figures_count_what_the_report_counts_on_a_rank_deficient_base(tmp_path):
    """A base of rank 4 in 32 dimensions: at every ε of a fine grid the figures' count (MatrixRow.intruders, through
    ``outside``) is the fp64 oracle's certain count, and at the scan's ε it is the report's."""
    generator = torch.Generator().manual_seed(8)
    W0 = torch.zeros(32, 32)
    W0[:4, :4] = 5 * torch.randn(4, 4, generator=generator)
    Wt = W0 + 0.3 * torch.randn(32, 32, generator=generator)
    base, tuned = _checkpoint(tmp_path / "base", {"w.weight": W0}), _checkpoint(tmp_path / "tuned", {"w.weight": Wt})
    report = lorafft.scan(base, tuned, k=10, eps=(0.5, 0.9))
    (row,) = report.rows
    assert row.base_rank == 4 and row.undetermined["0.5"] > 0 and len(row.outside) == 10
    assert [row.intruders(e) for e in (0.5, 0.9)] == [row.counts["0.5"], row.counts["0.9"]]
    U0, _, _ = np.linalg.svd(W0.double().numpy())
    Ut, _, _ = np.linalg.svd(Wt.double().numpy())
    cos = U0[:, :4].T @ Ut[:, :10]
    best, outside = np.abs(cos).max(axis=0), np.sqrt(np.clip(1 - (cos**2).sum(axis=0), 0, None))
    for e in np.linspace(0.05, 1.0, 20):
        assert row.intruders(e) == int((np.maximum(best, outside) < e).sum()), e
    assert lorafft.Report.from_dict(report.to_dict()).rows[0].outside == pytest.approx(row.outside)


def test_intervene_rescales_only_the_intruders_scan_counts(tmp_path):
    """A zero base defines none of its singular vectors: scan counts no intruder there (all undetermined), so
    intervene rescales nothing in it; the full-rank matrix beside it is rescaled where scan counts intruders."""
    generator = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.zeros(16, 24), "b.weight": torch.randn(16, 24, generator=generator)}
    tuned = {name: t + 0.3 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
    base_dir, tuned_dir = _checkpoint(tmp_path / "base", base), _checkpoint(tmp_path / "tuned", tuned)
    counts = {row.name: row.counts["0.5"] for row in lorafft.scan(base_dir, tuned_dir, k=4).rows}
    summary = intervene(base_dir, tuned_dir, tmp_path / "out", lam=0.5, which="all", k=4)
    assert {m.name: m.intruders for m in summary.matrices} == counts and counts["a.weight"] == 0
    assert {m.name: len(m.rescaled) for m in summary.matrices} == counts


def test_summary_k_is_what_was_analysed_and_identical_inputs_are_not_near(trio, capsys):
    assert main(["scan", str(trio.base), str(trio.base), "--k", "100000", "--quiet",
                 "--include", "layers\\.0\\.self_attn\\.(q|k)_proj"]) == 0
    stdout = capsys.readouterr().out
    report = lorafft.scan(trio.base, trio.base, k=100000, include=["layers\\.0\\.self_attn\\.(q|k)_proj"])
    analysed = sorted({min(row.shape) for row in report.rows})
    assert [row.k for row in report.rows] == [min(row.shape) for row in report.rows]
    assert f"k={analysed[0]}" in stdout and "k=100000" not in stdout
    assert all(abs(v - 1) < 1e-6 for row in report.rows for v in row.max_cos if v == v)
    assert "within 1e-3" not in stdout


@pytest.mark.parametrize("alpha", ["Infinity", "1e300", "NaN"])
def test_adapter_alpha_that_is_not_a_usable_number_is_refused(trio, tmp_path, alpha, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trio.lora, adapter)
    config = adapter / "adapter_config.json"
    config.write_text(re.sub(r'"lora_alpha": [^,}]+', f'"lora_alpha": {alpha}', config.read_text()))
    out = tmp_path / "r.json"
    assert main(["scan", str(trio.base), str(adapter), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("'lora_alpha' must be a positive number" in err or "beyond float32" in err)
    assert not out.exists() and not (tmp_path / "r.json.journal").exists()


def test_heatmap_and_trajectory_outline_what_the_report_counts(tmp_path):
    """On a rank-deficient base the similarity heatmap and the trajectory take the report's intruders, not every
    vector with a small max |cos| over the defined base vectors."""
    from lorafft.plots.heatmaps import similarity
    from lorafft.plots.trajectory import intruder_trajectory

    generator = torch.Generator().manual_seed(8)
    W0 = torch.zeros(32, 32)
    W0[:4, :4] = 5 * torch.randn(4, 4, generator=generator)
    Wt = W0 + 0.3 * torch.randn(32, 32, generator=generator)
    base, tuned = _checkpoint(tmp_path / "base", {"w.weight": W0}), _checkpoint(tmp_path / "tuned", {"w.weight": Wt})
    (row,) = lorafft.scan(base, tuned, k=10, eps=0.5).rows
    assert row.undetermined["0.5"] > 0  # the case in question
    drawn = similarity(base, tuned, "w.weight", n=10, eps=0.5)
    assert int(drawn.intruders.sum()) == row.counts["0.5"]
    followed = intruder_trajectory(base, [tuned], "w.weight", eps=0.5, k=10)
    assert len(followed.intruders) == row.counts["0.5"]
