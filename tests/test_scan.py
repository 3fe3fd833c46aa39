"""scan() end to end on written checkpoints, against an fp64 oracle that reads the files on its own."""

import importlib
import io
import json
import math
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

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
        gaps = torch.minimum((St[: row.k] - St[1 : row.k + 1]).abs(),
                             (St[: row.k] - torch.cat([St[:1] * 2, St[: row.k - 1]])).abs())
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
    assert report.inputs["tuned_kind"] == ["lora"]
    for row in report.rows:  # the base's own top singular values ride along
        reference = torch.linalg.svdvals(base[row.name].double())[: row.k]
        assert row.base_singular_values == pytest.approx(reference.tolist(), rel=1e-6)


def test_scan_state_dicts_with_prefixes_filters_and_shape_mismatch():
    generator = torch.Generator().manual_seed(3)
    base = {f"model.layers.{i}.{m}.weight": torch.randn(40, 30, generator=generator)
            for i in range(2) for m in ("q", "k")}
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


def test_a_tuned_name_matching_several_base_tensors_pairs_with_none():
    """A multimodal base with one projection name under two towers, and a fine-tune without the tower prefix: which
    base tensor it tunes is ambiguous, so neither pairs (skipped with the reason, warned); the unambiguous one does."""
    generator = torch.Generator().manual_seed(4)
    base = {f"{tower}.layers.0.q_proj.weight": torch.randn(12, 12, generator=generator)
            for tower in ("language_model.model", "vision_tower.encoder")}
    base["language_model.model.layers.0.k_proj.weight"] = torch.randn(12, 12, generator=generator)
    tuned = {"layers.0.q_proj.weight": base["language_model.model.layers.0.q_proj.weight"] + 0.1,
             "layers.0.k_proj.weight": base["language_model.model.layers.0.k_proj.weight"] + 0.1}
    with pytest.warns(UserWarning, match="ambiguous"):
        report = lorafft.scan(base, tuned, k=3)
    assert [r.name for r in report.rows] == ["language_model.model.layers.0.k_proj.weight"]
    assert sorted(s["name"] for s in report.skipped) == sorted(n for n in base if "q_proj" in n)
    assert lorafft.pairing.NameIndex(["b.weight", "x.a.b.weight"]).resolve("a.b.weight") is None


def test_a_bad_journal_path_is_an_input_error(trio, tmp_path):
    for journal in (tmp_path / "missing" / "j.journal", tmp_path):
        with pytest.raises(lorafft.InputError):
            lorafft.scan(trio.base, trio.full, include=["layers\\.0\\.self_attn\\.q"], journal=journal)


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


def test_trajectory_scan_pays_for_the_base_once_and_matches_single_scans(trio, monkeypatch):
    from lorafft import linalg

    calls = []
    original = linalg.base_basis
    monkeypatch.setattr(linalg, "base_basis", lambda W0, **kw: calls.append(W0.shape) or original(W0, **kw))
    include = [r"layers\.1\.mlp"]
    both = lorafft.scan(trio.base, [trio.full, trio.lora], include=include)
    first = [r for r in both.rows if r.checkpoint == 0]
    assert len(calls) == len(lorafft.pairing.group_by_shape(first, lambda r: r.shape))
    monkeypatch.setattr(linalg, "base_basis", original)
    assert both.checkpoints == [str(trio.full), str(trio.lora)]
    for checkpoint, tuned in enumerate((trio.full, trio.lora)):
        single = lorafft.scan(trio.base, tuned, include=include)
        rows = [r for r in both.rows if r.checkpoint == checkpoint]
        assert [r.name for r in rows] == [r.name for r in single.rows]
        for mine, theirs in zip(rows, single.rows):
            assert mine.max_cos == pytest.approx(theirs.max_cos, abs=1e-6)
        assert both.totals(checkpoint=checkpoint) == single.totals()
    assert both.to_dict()["totals_by_checkpoint"][1]["0.5"] == both.totals(checkpoint=1)["0.5"] > 0
    assert "per checkpoint" in both.summary()


def test_delta_ranks_low_rank_and_dense_match_fp64(trio):
    include = [r"layers\.0\.self_attn\.(q|k)_proj"]
    base = _load_dir(trio.base)
    for tuned, reference in ((trio.lora, _merged_lora(base, trio.lora)), (trio.full, _load_dir(trio.full))):
        report = lorafft.scan(trio.base, tuned, include=include, delta_ranks=True)
        assert len(report.rows) == 2
        for row in report.rows:
            sigma = torch.linalg.svdvals(reference[row.name].double() - base[row.name].double())
            sigma = sigma[sigma > sigma[0] * 1e-10]
            p = sigma / sigma.sum()
            assert row.delta_effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
            assert row.delta_stable_rank == pytest.approx(float((sigma**2).sum() / sigma[0] ** 2), rel=1e-6)
    assert lorafft.scan(trio.base, trio.lora, include=include).rows[0].delta_effective_rank is None


def test_random_reference_matches_the_floor_and_a_direct_simulation(trio):
    row = lorafft.scan(trio.base, trio.full, include=[r"layers\.0\.self_attn\.q_proj"]).rows[0]
    d = row.shape[0]
    assert row.random_floor == pytest.approx(d**-0.5)
    reference = row.random_reference
    assert row.random_floor < reference["p5"] < reference["p50"] < reference["p99"] < 0.5
    generator = torch.Generator().manual_seed(123)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    y = torch.randn(d, 4000, generator=generator, dtype=torch.float64)
    maxima = (Q.T @ (y / y.norm(dim=0))).abs().amax(dim=0)
    assert float(maxima.median()) == pytest.approx(row.random_reference["p50"], abs=3e-3)


def test_device_cpu_is_the_default_here_and_cuda_is_refused_without_a_gpu(trio):
    include = [r"layers\.0\.self_attn\.q_proj"]
    default = lorafft.scan(trio.base, trio.lora, include=include)
    on_cpu = lorafft.scan(trio.base, trio.lora, include=include, device="cpu")
    assert [r.max_cos for r in on_cpu.rows] == [r.max_cos for r in default.rows]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            lorafft.scan(trio.base, trio.lora, include=include, device="cuda")


@pytest.mark.gpu
def test_scan_on_the_gpu_equals_the_cpu_scan(trio):
    """The same report on CUDA (Triton kernels, weights moved a batch at a time) as on the CPU (torch)."""
    cpu = lorafft.scan(trio.base, trio.lora, eps=(0.5, 0.9), side="both", device="cpu")
    gpu = lorafft.scan(trio.base, trio.lora, eps=(0.5, 0.9), side="both", device="cuda")
    assert [(r.name, r.side) for r in gpu.rows] == [(r.name, r.side) for r in cpu.rows]
    for mine, theirs in zip(gpu.rows, cpu.rows):
        assert mine.counts == theirs.counts and mine.argmax == theirs.argmax
        assert mine.max_cos == pytest.approx(theirs.max_cos, abs=1e-5)


def test_dlpack_arrays_are_analysed_without_a_copy(trio):
    """Arrays of other libraries (CuPy on a GPU; NumPy here, the same DLPack protocol) go in as they are: analyze
    and an in-memory state dict give the torch tensors' results, and the weights are not copied."""
    import numpy as np

    from lorafft.arrays import as_tensor

    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(96, 80, generator=g, dtype=torch.float64).numpy()
    Wt = W0 + 0.3 * np.outer(np.linspace(-1, 1, 96), np.linspace(1, 2, 80))
    assert as_tensor(W0).data_ptr() == W0.ctypes.data
    from_numpy = lorafft.analyze(W0, Wt, k=5)["left"]
    from_torch = lorafft.analyze(torch.from_numpy(W0), torch.from_numpy(Wt), k=5)["left"]
    assert torch.equal(from_numpy.max_cos, from_torch.max_cos) and torch.equal(from_numpy.counts, from_torch.counts)
    reference, _ = _oracle(torch.from_numpy(W0), torch.from_numpy(Wt), 5, "left")
    assert (from_numpy.max_cos[0] - reference).abs().max() < 1e-6

    base, full = _load_dir(trio.base), _load_dir(trio.full)
    name = "model.layers.0.self_attn.q_proj.weight"
    arrays = lorafft.scan({name: base[name].numpy()}, {name: full[name].numpy()})
    tensors = lorafft.scan({name: base[name]}, {name: full[name]})
    assert arrays.rows[0].max_cos == tensors.rows[0].max_cos
    with pytest.raises(lorafft.InputError, match="is not a tensor"):
        lorafft.scan({name: base[name].tolist()}, {name: full[name]})


def test_lora_adapters_are_analysed_factored_and_dora_merged(trio, monkeypatch, tmp_path):
    """A plain LoRA adapter is never merged into a dense tuned matrix (its update stays s·B·A through every
    product), and analyze(W0, lora=(B, A, s)) equals analyze(W0, W0 + s·B·A)."""
    from lorafft import adapters

    merged = []
    original = adapters.merged_weight
    monkeypatch.setattr(adapters, "merged_weight", lambda *a, **kw: merged.append(1) or original(*a, **kw))
    report = lorafft.scan(trio.base, trio.lora, include=[r"layers\.0\."])
    assert report.rows and not merged

    # the same adapter as DoRA (magnitudes m): merged, (m / ||W0 + ΔW||_row) (W0 + ΔW), checked against fp64
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((trio.lora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    tensors = load_file(trio.lora / "adapter_model.safetensors")
    base = _load_dir(trio.base)
    g = torch.Generator().manual_seed(3)
    for key in [key for key in tensors if ".lora_A." in key]:
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        rows = base[module + ".weight"].shape[0]
        tensors[key.split(".lora_A.")[0] + ".lora_magnitude_vector"] = 1 + 0.2 * torch.rand(rows, generator=g)
    save_file(tensors, dora / "adapter_model.safetensors")
    dora_report = lorafft.scan(trio.base, dora, include=[r"layers\.0\."])
    assert merged
    expected = {}
    for name, Wt in _merged_lora(base, trio.lora).items():
        key = "base_model.model." + name.removesuffix(".weight") + ".lora_magnitude_vector"
        expected[name] = tensors[key].double()[:, None] * Wt / Wt.norm(dim=1, keepdim=True)
    _check_rows(dora_report, base, expected, 0.5)

    g = torch.Generator().manual_seed(9)
    W0 = torch.randn(2, 300, 260, generator=g)
    B, A = torch.randn(2, 300, 3, generator=g), torch.randn(2, 3, 260, generator=g) * 0.2
    factored = lorafft.analyze(W0, lora=(B, A, 1.5), k=8)["left"]
    formed = lorafft.analyze(W0, W0 + 1.5 * B @ A, k=8)["left"]
    assert torch.equal(factored.counts, formed.counts) and torch.equal(factored.argmax, formed.argmax)
    assert (factored.max_cos - formed.max_cos).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not both"):
        lorafft.analyze(W0, W0, lora=(B, A, 1.5))
    with pytest.raises(ValueError, match="lora must be"):
        lorafft.analyze(W0, lora=(B.mT, A, 1.5))


class _Terminal(io.StringIO):
    """A stderr a person watches."""

    def isatty(self):
        return True


def test_progress_bar_by_default_only_where_someone_watches(trio, monkeypatch):
    """``progress=None``: a bar on a terminal's stderr or in a Jupyter kernel, none when stderr is a file or a
    capture (logs, tests); True and False decide."""
    scan_module = importlib.import_module("lorafft.scan")  # lorafft.scan is the function
    include = [r"layers\.0\.self_attn\.q_proj"]
    for stream, expected in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert scan_module.someone_watching() is expected
        lorafft.scan(trio.base, trio.lora, include=include)
        assert ("lorafft scan" in stream.getvalue()) is expected
    lorafft.scan(trio.base, trio.lora, include=include, progress=False)
    assert "lorafft scan" not in sys.stderr.getvalue()

    class Kernel:
        config = {"IPKernelApp": {}}

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=Kernel))
    assert scan_module.someone_watching()  # a notebook (tqdm.auto draws its widget there)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not scan_module.someone_watching()  # IPython imported, no kernel: a plain script
