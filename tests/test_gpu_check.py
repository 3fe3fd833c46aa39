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
    assert gpu_check.TILE_CANDIDATES[0] == (kernel.BLOCK_R, kernel.BLOCK_K[2], kernel.NUM_WARPS,
                                            kernel.NUM_STAGES[2], kernel.NUM_STAGES[1], kernel.PREFETCH[1],
                                            kernel.CTAS_PER_SM[1])
    assert gpu_check.main(["--quick", "--only", "tiles", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) >= {"rates", "tiles"} and "sketch" not in report
    candidates = report["tiles"]["candidates"]
    assert len(candidates) == 2 and all(case["error"] <= 1e-5 for entry in candidates.values()
                                        for case in entry.values())
    assert {name: getattr(kernel, name) for name in names} == before
