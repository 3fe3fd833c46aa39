"""Many adapters of one base in one scan, each adapting its own set of modules: every base basis is computed once
for all of them, and each adapter's rows equal a scan of that adapter alone."""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafft
from lorafft import cache, linalg


def _subset(adapter, directory, pattern):
    """A copy of the PEFT ``adapter`` keeping only the modules whose names match ``pattern``."""
    shutil.copytree(adapter, directory)
    weights = directory / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if re.search(pattern, k)}, str(weights))
    return directory


@pytest.fixture(scope="module")
def adapters(trio, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return [_subset(trio.lora, folder / "attention", r"self_attn"),
            _subset(trio.lora, folder / "mlp-and-q", r"mlp|q_proj"),
            _subset(trio.lora, folder / "layer-1-down", r"layers\.1\.mlp\.down")]


def test_each_adapter_rows_equal_its_own_scan_and_bases_are_computed_once(trio, adapters, monkeypatch):
    computed = []
    base_basis = linalg.base_basis

    def counting(W0, **options):
        computed.append(W0.shape[0])
        return base_basis(W0, **options)

    monkeypatch.setattr(cache.linalg, "base_basis", counting)
    together = lorafft.scan(trio.base, adapters, eps=(0.5, 0.7))
    names = [{row.name for row in together.rows if row.checkpoint == c} for c in range(len(adapters))]
    assert sum(computed) == len(set().union(*names)) == 14  # 2 layers x 7 projections, each basis once
    monkeypatch.setattr(cache.linalg, "base_basis", base_basis)
    for checkpoint, adapter in enumerate(adapters):
        alone = {row.name: row for row in lorafft.scan(trio.base, adapter, eps=(0.5, 0.7)).rows}
        mine = {row.name: row for row in together.rows if row.checkpoint == checkpoint}
        assert mine.keys() == alone.keys()
        for name, row in mine.items():
            assert row.counts == alone[name].counts
            assert torch.allclose(torch.tensor(row.max_cos), torch.tensor(alone[name].max_cos), atol=1e-5)
    totals = together.to_dict()["totals_by_checkpoint"]
    assert [t["0.5"] for t in totals] == [sum(r.counts["0.5"] for r in together.rows if r.checkpoint == c)
                                          for c in range(len(adapters))]
    assert len(names[2]) == 1


def test_comparison_figure_draws_each_adapters_totals(trio, adapters):
    pytest.importorskip("matplotlib")
    report = lorafft.scan(trio.base, adapters, eps=(0.5, 0.9))
    figure = report.plot_checkpoint_totals()
    (ax,) = figure.axes
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert heights == [[report.totals(checkpoint=c)[key] for c in range(3)] for key in ("0.5", "0.9")]
    assert [label.get_text() for label in ax.get_xticklabels()] == [f"lora: {a.name}" for a in adapters]


def test_notebook_html_shows_the_summary_and_the_figure(trio, adapters):
    pytest.importorskip("matplotlib")
    report = lorafft.scan(trio.base, adapters[:2], eps=(0.5, 0.9))
    page = report._repr_html_()
    for checkpoint in range(2):
        totals = report.totals("left", checkpoint)
        label = f"[{checkpoint}] lora: {adapters[checkpoint].name}"  # which input, not only its index
        assert f"<tr><td class=\"text\">{label}</td><td class=\"text\">left</td>" in page
        assert all(f"<td>{totals[key]}</td>" in page for key in ("0.5", "0.9"))
    assert page.count("<img") == 1 and "Figure 4" in page
