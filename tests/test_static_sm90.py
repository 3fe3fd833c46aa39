"""Static check of the sketch kernel for Hopper (sm_90), compiled on this CPU with Triton's bundled ptxas: no
spills, tensor-core MMA, and an issue-time ratio that keeps up with H200 HBM (``benchmarks/static_sm90.py``).

To keep the suite fast this compiles one shape (8192×28672, down_proj of Llama-70B), both orientations, of each
weight dtype; ``python benchmarks/static_sm90.py`` runs every shape and scale (the committed table)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import static_sm90  # noqa: E402

SHAPE = (8192, 28672)
VARIANTS = [static_sm90.Variant("bf16"), static_sm90.Variant("fp16"), static_sm90.Variant("fp32"),
            static_sm90.Variant("fp8e4nv", "tensor"), static_sm90.Variant("fp8e5", "channel"),
            static_sm90.Variant("fp8e4nv", "block")]


@pytest.fixture(autouse=True)
def compiled_not_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("transpose", [False, True], ids=["WX", "WtX"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_sketch_compiles_for_sm90_on_tensor_cores_without_spills(variant, transpose):
    row = static_sm90.analyse(variant, SHAPE, transpose)
    assert row["spill_bytes"] == 0
    assert sum(row["loop_ops"].get(op, 0) for op in static_sm90.MMA_OPS) > 0  # tensor cores in the main loop
    assert row["loop_ops"].get("FFMA", 0) <= 32  # no scalar fp32 product (32: the block scale's per-tile FMA)
    assert row["ratio"] < 1.0  # keeps up with HBM


KNOWN_GAP = pytest.mark.xfail(strict=True, reason="fp8 W^T X: ratio ~0.6, the widened transposed tile is re-laid "
                              "out through shared memory (LDS); known gap, see benchmarks/results/static_sm90.md")


@pytest.mark.parametrize("variant,transpose", [
    (VARIANTS[0], False), (VARIANTS[0], True), (VARIANTS[3], False), (VARIANTS[4], False),
    pytest.param(VARIANTS[3], True, marks=KNOWN_GAP), pytest.param(VARIANTS[4], True, marks=KNOWN_GAP),
], ids=["bf16-WX", "bf16-WtX", "fp8e4m3-WX", "fp8e5m2-WX", "fp8e4m3-WtX", "fp8e5m2-WtX"])
def test_sketch_ratio_target(variant, transpose):
    """The issue's target: bf16 and fp8 sketches at <= 0.5 of the HBM budget (strict xfail where not yet met, so
    the marker must go when it is)."""
    assert static_sm90.analyse(variant, SHAPE, transpose)["ratio"] <= 0.5


def test_sass_parsing_finds_the_loop():
    """The loop finder on a hand-made listing: the backward branch's range, not the straight-line code."""
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   HGMMA.64x32x16.F32.BF16 R40, gdesc[UR16], R40 ;",
        "        /*0020*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0030*/               @P0 BRA 0x10 ;",
        "        /*0040*/                   EXIT ;",
    ])
    loop = static_sm90.main_loop(static_sm90.parse_sass(sass))
    assert [op for _, op, _ in loop] == ["HGMMA", "FFMA", "BRA"]
