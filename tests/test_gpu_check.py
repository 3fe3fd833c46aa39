"""The device check's CPU rehearsal (``benchmarks/gpu_check.py --quick``, under the Triton interpreter), so the
script that gets one chance on a lent GPU cannot rot: every section runs and passes its correctness checks."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_quick_rehearsal_passes_and_writes_out(tmp_path):
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = gpu_check.SECTIONS
    assert all(report[name]["pass"] for name in sections), {n: report[n] for n in sections if not report[n]["pass"]}
    assert len(report["correctness"]["relative_errors"]) == 2 * 11  # every dtype and scale, both orientations
    assert report["correctness"]["worst"] <= 1e-5
    for section, parts in (("scan", ("lora", "full")), ("cli", ("lora", "full")), ("tracking", ("step_1", "step_2"))):
        assert all(report[section][part]["counts_and_argmax_equal"] and report[section][part]["rows"]
                   for part in parts), section
    cases = {key for row in report["sketch"]["shapes"].values() for key in row if key != "shape"}
    assert cases == {f"{label}_{o}" for label in ("bf16", "fp8e4m3", "fp32", "fp8e4m3_tensor", "fp8e4m3_channel",
                                                   "fp8e4m3_block") for o in ("WX", "WtX")}
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.count("PASS ") == len(sections)
    assert "fp8e4m3_block_WtX" in log and "torch fp32_bmm" in log  # each sketch rate printed beside torch's


def test_tile_sweep_rehearsal_restores_the_default_tiles(tmp_path):
    """``--only tiles`` times each candidate tile (here two, under the interpreter), checks each against fp64, and
    leaves the kernel's tiles as they were."""
    import lorafft.kernels.sketch as kernel

    names = ("BLOCK_R", "BLOCK_K", "NUM_WARPS", "NUM_STAGES", "PREFETCH", "CTAS_PER_SM")
    before = {name: getattr(kernel, name) for name in names}
    assert gpu_check.TILE_CANDIDATES[0] == (kernel.BLOCK_R, kernel.BLOCK_K[2], kernel.BLOCK_K[1], kernel.NUM_WARPS,
                                            kernel.NUM_STAGES[2], kernel.NUM_STAGES[1], kernel.PREFETCH[1],
                                            kernel.CTAS_PER_SM[1])
    assert gpu_check.main(["--quick", "--only", "tiles", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) >= {"rates", "tiles"} and "sketch" not in report
    candidates = report["tiles"]["candidates"]
    assert len(candidates) == 2 and all(case["error"] <= 1e-5 for entry in candidates.values()
                                        for case in entry.values())
    assert {name: getattr(kernel, name) for name in names} == before


def test_sketch_thresholds_are_issue_21s():
    """The sketch section's verdict on GPU rates (no GPU needed): bf16 >= 0.8 of the copy rate at 8192×28672 and
    >= 0.7 at 8192², fp8 e4m3 with every scale layout >= 0.6 at both, fp32 no slower than torch's fp32 bmm."""
    def rate(fraction, torch_fp32=0.5):
        return {"gpu": {"fraction_of_copy": fraction}, "torch": {"fp32_bmm": {"fraction_of_copy": torch_fp32}}}

    labels = ("bf16", "fp8e4m3", "fp8e4m3_tensor", "fp8e4m3_channel", "fp8e4m3_block", "fp32")
    rows = {shape: {f"{label}_{o}": rate(0.85) for label in labels for o in ("WX", "WtX")}
            for shape in ("down_proj", "q_proj/o_proj")}
    assert all(check["pass"] for check in gpu_check._sketch_checks(rows).values())
    for shape, key, fraction, failed in (("down_proj", "bf16_WtX", 0.79, "bf16_8192x28672"),
                                         ("q_proj/o_proj", "bf16_WX", 0.69, "bf16_8192x8192"),
                                         ("q_proj/o_proj", "fp8e4m3_block_WtX", 0.59, "fp8e4m3_8192x8192"),
                                         ("down_proj", "fp32_WX", 0.49, "fp32_no_slower_than_torch_fp32")):
        changed = {s: {k: (rate(fraction) if (s, k) == (shape, key) else v) for k, v in row.items()}
                   for s, row in rows.items()}
        verdicts = {name: check["pass"] for name, check in gpu_check._sketch_checks(changed).items()}
        assert [name for name, ok in verdicts.items() if not ok] == [failed]


def test_whole_model_rehearsal_scans_from_disk_and_compares(tmp_path):
    """``--only whole_model`` on tiny Llama shapes: checkpoints written, the cache built, four scans run as commands
    with their read floors; every field the device run is judged by is there, the scans against the cache equal those
    without it within the certified bounds, and the stages account for the wall time."""
    assert gpu_check.main(["--quick", "--only", "whole_model", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())["whole_model"]
    assert [scan["name"] for scan in report["scans"]] == ["lora cached", "lora uncached", "full cached",
                                                          "full uncached"]
    assert all(entry["pass"] and entry["rows"] > 0 and entry["rows_compared_for_counts"] > 0
               for entry in report["agreement"].values())
    for scan in report["scans"]:
        assert scan["read_floor_seconds"] > 0 and scan["peak_rss_bytes"] > scan["predicted_rss_bytes"] / 4
        assert set(scan["stages"]) >= {"read", "tuned_topk", "match", "magnitude_direction"}
        assert 0 < scan["magnitude_direction_share"] < scan["stage_share"]
    # tiny shapes: the adapter by the update path (32-wide k, v: too small for it, dense), and all by the dense fp64
    # top-k with a cache's fp32 basis
    assert report["scans"][1]["methods"] == ["dense", "update"] and report["scans"][0]["methods"] == ["dense"]
    assert json.loads((tmp_path / "whole_model.json").read_text())["scans"] == report["scans"]
